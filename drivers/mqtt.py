"""MQTT input (paho-mqtt 2.x): subscriptions whose messages are acknowledged after the commit.

The client runs on the event loop, as aiomqtt does: only `connect()` (DNS, TCP and the TLS
handshake block) runs in an executor thread, and the loop takes the socket over once it returns;
from then on the loop calls `loop_read`/`loop_write` when the socket is ready and a small task
calls `loop_misc` for keepalives. No paho network thread exists, so paho is never touched from
two threads at once. `loop_misc` closes a connection whose broker answers no PINGREQ within the
keepalive, and iteration then raises `DriverError`: the runtime's reconnect loop takes over.

Nothing is lost when the agent dies: QoS 1 on a persistent session (MQTT 3.1.1 clean session
off; MQTT 5 clean start off with a session expiry interval) and `manual_ack`, so a PUBACK leaves
only after the runtime has committed the message's readings (the `Batch.ack` callback). A message
the agent never acknowledged is redelivered by the broker with the DUP flag; MQTT gives such a
message no stable identity (packet ids are reused), so a redelivered message that had been
committed before the crash is logged twice. Redeliveries are counted in `counters`.

An empty payload (how a publisher deletes a retained value) holds no reading: it is
acknowledged and nothing is logged.

Retained messages: on a resumed session the broker already delivered, live or queued, what its
retained messages hold, so the copies it sends again because the agent resubscribes are skipped
(acknowledged, counted as `retained_skipped`); MQTT 5 asks the broker not to send them at all.

Payloads go through the serial input's decoders (`drivers.decoders.decoder_for`), so `mapping`
means the same on both. What MQTT adds happens around them: `json_query` picks the readings out
of the document first; a csv, kv or regex payload is cut into lines; and a long reading without
a sensor field takes the topic's sensor, which for JSON is written into the object (under the
`mapping.sensor` key, which the decoders read before a dotted path) and for the line formats is
a decoder whose fixed `sensor` is the topic's (one per sensor name, kept).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import select
import ssl
import threading
import time
from collections.abc import Callable
from typing import Any, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent.config import MqttInputConfig
from agent.events import Invalid, Reading, Rejected, Sample
from drivers.base import Batch, DriverError
from drivers.decoders import LineDecoder, decode_json, decoder_for

log = logging.getLogger(__name__)

_MAX_BATCH = 1000
#: How long `close` waits for the runtime to acknowledge batches it already took: their
#: commit is usually one group commit away, and a PUBACK sent now saves a redelivery later.
_ACK_GRACE = 0.5
#: Line decoders kept for sensor names taken from topics (they are cheap to build again).
_MAX_TOPIC_DECODERS = 1024
_MISSING = object()


def topic_pattern(template: str) -> re.Pattern[str]:
    """A regex with a named group per `{name}` of a topic template (one level each)."""
    parts = re.split(r"(\{[a-zA-Z_][a-zA-Z0-9_]*\})", template)
    out = "".join(
        f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") and p.endswith("}") else re.escape(p)
        for p in parts
    )
    return re.compile(f"^{out}$")


def _at(doc: Any, path: str) -> Any:
    """The value at a dotted path (`data.0.temp`) of a JSON document, or `_MISSING`."""
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


def _has_field(obj: dict[str, Any], name: str) -> bool:
    """Whether a JSON object has the field `name` as the decoders read it: a key, or a dotted
    path through nested objects."""
    if name in obj:
        return True
    here: Any = obj
    for part in name.split("."):
        if not isinstance(here, dict) or part not in here:
            return False
        here = here[part]
    return True


def _lines_lack_sensor(cfg: MqttInputConfig) -> bool:
    """Whether no line can hold the sensor field: regex groups or CSV columns without it."""
    if not cfg.takes_topic_sensor:
        return False
    if cfg.format == "regex":
        return cfg.mapping.sensor not in re.compile(cfg.regex or "").groupindex
    return cfg.format == "csv" and cfg.mapping.sensor not in cfg.csv_columns


class _LastError(logging.Handler):
    """Keeps paho's last error line (why a socket died), which its callbacks do not carry."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.message = record.getMessage()
        log.debug("paho: %s", self.message)


class MqttDriver:
    """Readings from MQTT subscriptions.

    Iteration is never called concurrently with itself; `close` may be called while iteration
    waits, and twice. `open` closes a previous connection first, so there is never more than
    one client. `counters` holds `redelivered` (messages received with the DUP flag),
    `retained_skipped` and `sessions_new` (connections on which the broker had no session).
    """

    def __init__(self, cfg: MqttInputConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.counters: dict[str, int] = {"redelivered": 0, "retained_skipped": 0, "sessions_new": 0}
        self._v5 = cfg.protocol == "5"
        self._pattern = topic_pattern(cfg.topic_template)
        # None when every reading takes the topic's sensor (`_topic_decoder`), or for numbers.
        self._decode: LineDecoder | None = None
        if cfg.format != "number" and not _lines_lack_sensor(cfg):
            self._decode = decoder_for(cfg)
        self._topic_decoders: dict[str, LineDecoder | Invalid] = {}
        # Kv and regex lines may lack a field; a CSV record has every column.
        self._mend_by_topic = cfg.takes_topic_sensor and cfg.format in ("kv", "regex")
        self._paho_errors = _LastError()
        self._paho_log = logging.Logger(f"{__name__}.paho.{cfg.name}", logging.WARNING)
        self._paho_log.addHandler(self._paho_errors)
        self._closed = asyncio.Event()
        self._client: mqtt.Client | None = None
        self._queue: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        # Per connection: `_ready` holds None once usable, or why the broker refused it;
        # `_lost` why it became unusable (iteration raises that).
        self._ready: asyncio.Future[str | None] | None = None
        self._lost: asyncio.Future[str] | None = None
        self._disconnect_reason = ""
        self._misc: asyncio.Task[None] | None = None
        self._loop_thread: int | None = None
        self._paused = False
        self._session_present = False
        self._connects = 0
        # Batches of this connection handed out and not acknowledged yet; `close` waits on them.
        self._unacked: set[int] = set()
        self._all_acked = asyncio.Event()

    # ------------------------------------------------------------------ connection

    async def open(self) -> None:
        """Connect and subscribe: return once the broker accepted the connection and, on a new
        session, granted the subscriptions (a resumed session already has them).

        Raises DriverError when the broker cannot be reached, refuses the connection or a
        subscription, or the TLS handshake fails (with what to check in the message).
        """
        await self.close()
        loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._closed.clear()
        self._queue = asyncio.Queue()
        self._ready = loop.create_future()
        self._lost = loop.create_future()
        self._paused = False
        self._unacked = set()
        self._all_acked = asyncio.Event()
        self._all_acked.set()
        self._paho_errors.message = None
        self._disconnect_reason = ""
        url = urlsplit(self.cfg.url)
        tls = url.scheme == "mqtts"
        host, port = url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883)
        client = self._new_client(tls)
        connecting = loop.run_in_executor(None, self._connect, client, host, port)
        try:
            await asyncio.shield(connecting)
        except asyncio.CancelledError:
            # The thread goes on; whatever socket it ends with is closed, never used.
            connecting.add_done_callback(lambda f: _abandon(f, client))
            raise
        except (OSError, ValueError) as exc:
            why = self._why(exc)
            raise DriverError(f"{self.name}: cannot connect to {host}:{port}: {why}") from exc
        if self._closed.is_set():  # closed while connecting: iteration ends at once
            _close_socket(client)
            return
        self._client = client
        try:
            self._watch(client)
            self._misc = asyncio.create_task(self._misc_loop(client), name=f"mqtt-{self.name}")
            await self._handshake(host, port)
        except BaseException:
            await self.close()
            raise
        self._connects += 1

    def _new_client(self, tls: bool) -> mqtt.Client:
        client_id = self.cfg.client_id or f"edge-agent-{self.name}"
        if self._v5:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                protocol=mqtt.MQTTv5,
                manual_ack=True,
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=client_id,
                clean_session=False,
                protocol=mqtt.MQTTv311,
                manual_ack=True,
            )
        client.connect_timeout = self.cfg.connect_timeout
        client.enable_logger(self._paho_log)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if tls:
            client.tls_set_context(self._tls_context())
        client.on_connect = self._on_connect
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        return client

    def _tls_context(self) -> ssl.SSLContext:
        """Verification always on: the broker's chain against `ca_file` and its host name."""
        cfg = self.cfg
        try:
            context = ssl.create_default_context(cafile=str(cfg.ca_file) if cfg.ca_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise DriverError(f"{self.name}: ca_file {cfg.ca_file}: {_file_error(exc)}") from exc
        if cfg.cert_file is not None:
            key = str(cfg.key_file) if cfg.key_file else None
            try:
                context.load_cert_chain(str(cfg.cert_file), key)
            except (OSError, ssl.SSLError) as exc:
                raise DriverError(
                    f"{self.name}: cert_file {cfg.cert_file} / key_file {cfg.key_file}: "
                    f"{_file_error(exc)}"
                ) from exc
        return context

    def _connect(self, client: mqtt.Client, host: str, port: int) -> None:
        """In the executor thread: the loop does not know this client before it returns."""
        keepalive = int(self.cfg.keepalive)
        if self._v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = int(self.cfg.session_expiry)
            props.ReceiveMaximum = self.cfg.max_inflight
            client.connect(host, port, keepalive, clean_start=False, properties=props)
        else:
            client.connect(host, port, keepalive)

    def _why(self, exc: BaseException) -> str:
        """What went wrong connecting, in words that say what to check."""
        if isinstance(exc, ssl.SSLCertVerificationError):
            detail = (exc.verify_message or str(exc)).rstrip(".")
            if exc.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
                hint = "the broker's certificate does not name the host of the url"
            else:
                hint = "is ca_file the CA that signed the broker's certificate?"
            return f"TLS: broker certificate not accepted: {detail} ({hint})"
        if isinstance(exc, ssl.SSLError):
            hint = ""
            if self.cfg.cert_file is None:
                hint = " (does the broker require a client certificate? set cert_file)"
            return f"TLS handshake failed: {exc.reason or exc}{hint}"
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.cfg.connect_timeout:g}s"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused (is the broker running, on this port?)"
        return str(exc) or type(exc).__name__

    async def _handshake(self, host: str, port: int) -> None:
        """Wait for CONNACK (and SUBACK on a new session), or the end, within connect_timeout."""
        assert self._ready is not None and self._lost is not None
        closed = asyncio.ensure_future(self._closed.wait())
        waiters: set[asyncio.Future[Any]] = {self._ready, self._lost, closed}
        try:
            await asyncio.wait(
                waiters,
                timeout=self.cfg.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            closed.cancel()
        if self._closed.is_set():
            return
        if self._ready.done():
            refused = self._ready.result()
            if refused is not None:
                raise DriverError(f"{self.name}: {refused}")
            return
        if self._lost.done():
            detail = self._paho_errors.message or self._disconnect_reason
            hint = ""
            if self.cfg.url.startswith("mqtts://") and self.cfg.cert_file is None:
                hint = " (does the broker require a client certificate? set cert_file)"
            raise DriverError(
                f"{self.name}: {host}:{port} closed the connection before accepting it: "
                f"{detail}{hint}"
            )
        raise DriverError(
            f"{self.name}: {host}:{port} accepted TCP but did not complete the MQTT handshake "
            f"(CONNACK, SUBACK) within {self.cfg.connect_timeout:g}s"
        )

    def _watch(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if sock is None:
            raise DriverError(f"{self.name}: the connection closed while opening")
        loop = asyncio.get_running_loop()
        loop.add_reader(sock, self._read, client)
        if client.want_write():
            loop.add_writer(sock, client.loop_write)

    def _read(self, client: mqtt.Client) -> None:
        client.loop_read()
        # TLS: one socket read may decrypt several MQTT packets; paho takes one per call and
        # the selector cannot see the rest, which would sit there until the next byte arrives.
        sock = client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending() and not self._paused:
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            sock = client.socket()

    async def _misc_loop(self, client: mqtt.Client) -> None:
        tick = min(1.0, self.cfg.keepalive / 4)
        while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:  # noqa: ASYNC110 (close cancels it)
            await asyncio.sleep(tick)

    def _on_loop_thread(self) -> bool:
        return threading.get_ident() == self._loop_thread

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            # RuntimeError: no running loop, when paho closes from Client.__del__.
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock)
                loop.remove_writer(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # During connect() (executor thread) `_watch` registers what is queued afterwards.
        if self._on_loop_thread() and sock.fileno() != -1:
            asyncio.get_running_loop().add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._on_loop_thread():
            with contextlib.suppress(ValueError, OSError):
                asyncio.get_running_loop().remove_writer(sock)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        ready = self._ready
        if reason.is_failure:
            if ready is not None and not ready.done():
                ready.set_result(f"the broker refused the connection: {reason}")
            return
        self._session_present = bool(flags.session_present)
        if not self._session_present:
            self.counters["sessions_new"] += 1
            if self._connects:
                log.warning(
                    "input %s: the broker kept no session for client id %r: what was "
                    "published while the agent was disconnected did not wait for it",
                    self.name,
                    self.cfg.client_id or f"edge-agent-{self.name}",
                )
        self._subscribe(client)
        # A resumed session has its subscriptions, and its backlog may come before the SUBACK
        # and fill the queue, which only iteration drains: its SUBACK is checked when it comes.
        if self._session_present and ready is not None and not ready.done():
            ready.set_result(None)

    def _subscribe(self, client: mqtt.Client) -> None:
        qos = int(self.cfg.qos)
        if self._v5:
            # Retained messages only for a new subscription, not each time we resubscribe.
            options = SubscribeOptions(
                qos=qos, retainHandling=SubscribeOptions.RETAIN_SEND_IF_NEW_SUB
            )
            client.subscribe([(t, options) for t in self.cfg.topics])
        else:
            # Resubscribing on a resumed session is harmless and picks up changed topics.
            client.subscribe([(t, qos) for t in self.cfg.topics])

    def _on_subscribe(
        self, client: mqtt.Client, userdata: Any, mid: int, reasons: list[Any], properties: Any
    ) -> None:
        refused = None
        for topic, reason in zip(self.cfg.topics, reasons, strict=False):
            if reason.is_failure:
                refused = f"the broker refused the subscription to {topic!r}: {reason}"
                break
            if reason.value < self.cfg.qos:
                log.warning(
                    "input %s: the broker granted QoS %d for %r: messages may be lost",
                    self.name,
                    reason.value,
                    topic,
                )
        ready = self._ready
        if ready is not None and not ready.done():
            ready.set_result(refused)
        elif refused is not None:
            self._break(refused)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._disconnect_reason = str(reason)
        hint = ""
        if str(reason) == "Session taken over":  # MQTT 5 says so; 3.1.1 just closes
            hint = " (another client connected with the same client_id: give each its own)"
        self._break(f"connection to the broker lost: {reason}{hint}")

    def _break(self, why: str) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(why)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if msg.retain and not msg.dup and self._session_present and not self._v5:
            # A stored value sent again because we resubscribed (see the module docstring).
            # A DUP one is an unacknowledged delivery coming back: that one is kept.
            self.counters["retained_skipped"] += 1
            if msg.qos:
                client.ack(msg.mid, msg.qos)
            return
        if msg.dup:
            self.counters["redelivered"] += 1
        self._queue.put_nowait(msg)
        # QoS 1: the broker's in-flight window (MQTT 5: our Receive Maximum) already bounds
        # this queue, as nothing is acknowledged before its commit. QoS 0 has no window: stop
        # reading and let TCP push back on the broker.
        if self._queue.qsize() >= self.cfg.max_inflight:
            self._pause(client)

    def _pause(self, client: mqtt.Client) -> None:
        sock = client.socket()
        if not self._paused and sock is not None:
            self._paused = True
            asyncio.get_running_loop().remove_reader(sock)

    def _resume(self) -> None:
        client = self._client
        sock = client.socket() if client is not None else None
        if self._paused and client is not None and sock is not None:
            self._paused = False
            loop = asyncio.get_running_loop()
            loop.add_reader(sock, self._read, client)
            loop.call_soon(self._read, client)  # TLS may hold bytes the selector cannot see

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        while True:
            batch = self._batch(await self._messages())
            if batch.items:
                return batch
            if batch.ack is not None:  # only empty payloads: nothing to commit first
                batch.ack()

    async def _messages(self) -> list[mqtt.MQTTMessage]:
        if self._closed.is_set():
            raise StopAsyncIteration
        if self._queue.empty():
            lost = self._lost
            if lost is None:
                raise DriverError(f"{self.name}: not connected (open first)")
            getter = asyncio.ensure_future(self._queue.get())
            closer = asyncio.ensure_future(self._closed.wait())
            waiters: set[asyncio.Future[Any]] = {getter, closer, lost}
            try:
                await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            finally:
                closer.cancel()
                if not getter.done():
                    getter.cancel()
            if not getter.done() or getter.cancelled():
                if self._closed.is_set():
                    raise StopAsyncIteration
                raise DriverError(f"{self.name}: {lost.result() if lost.done() else 'closed'}")
            messages = [getter.result()]
        else:
            messages = []
        while len(messages) < _MAX_BATCH and not self._queue.empty():
            messages.append(self._queue.get_nowait())
        if self._paused and self._queue.qsize() <= self.cfg.max_inflight // 2:
            self._resume()
        return messages

    def _batch(self, messages: list[mqtt.MQTTMessage]) -> Batch:
        """Decoded items and the acknowledgement of their messages (empty payloads: none)."""
        items: list[Reading | Rejected] = []
        now, mono = time.time(), time.monotonic()
        for msg in messages:
            items.extend(self._decode_message(msg, now, mono))
        acks = [(m.mid, m.qos) for m in messages if m.qos > 0]
        if not acks or self._client is None:
            return Batch(items, None)
        return Batch(items, self._acknowledger(self._client, acks))

    def _acknowledger(self, client: mqtt.Client, acks: list[tuple[int, int]]) -> Callable[[], None]:
        unacked, all_acked = self._unacked, self._all_acked
        token = id(acks)
        unacked.add(token)
        all_acked.clear()

        def ack() -> None:
            if token not in unacked:
                return
            unacked.discard(token)
            if not unacked:
                all_acked.set()
            # A packet id belongs to its connection: after a reconnect the broker redelivers.
            if client.is_connected():
                for mid, qos in acks:
                    client.ack(mid, qos)

        return ack

    # ------------------------------------------------------------------ decoding

    def _decode_message(
        self, msg: mqtt.MQTTMessage, now: float, mono: float
    ) -> list[Reading | Rejected]:
        raw = bytes(msg.payload)
        if len(raw) > self.cfg.max_payload:
            detail = f"{len(raw)} bytes on {msg.topic}"
            return [self._reject(raw[: self.cfg.max_payload], "oversized", detail, now, mono)]
        topic_sensor = self._sensor_from_topic(msg.topic)
        if self.cfg.format == "number":
            result = self._decode_number(raw, topic_sensor, msg.topic)
        elif self.cfg.format == "json":
            result = self._decode_json(raw, topic_sensor)
        else:
            result = self._decode_lines(raw, topic_sensor, msg.topic)
        if isinstance(result, Invalid):
            return [self._reject(raw, result.reason, result.detail, now, mono)]
        return [
            Reading(
                s.sensor,
                s.value,
                s.unit,
                s.time if s.time is not None else now,
                now,
                mono,
                self.name,
            )
            for s in result
        ]

    def _sensor_from_topic(self, topic: str) -> str | None:
        m = self._pattern.match(topic)
        if m is None:
            return None
        names = m.groupdict()
        sensor = names.get("sensor")
        if sensor is not None and names.get("device"):
            sensor = f"{names['device']}.{sensor}"
        return sensor

    def _bad_topic(self, topic: str) -> Invalid:
        return Invalid("bad_topic", f"{topic!r} does not match {self.cfg.topic_template!r}")

    def _decode_number(self, raw: bytes, sensor: str | None, topic: str) -> list[Sample] | Invalid:
        if sensor is None:
            return self._bad_topic(topic)
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as exc:
            return Invalid("invalid_utf8", f"byte {exc.start}: {exc.reason}")
        if not text:
            return []
        return decode_json(json.dumps({"sensor": sensor, "value": text}).encode())

    def _decode_lines(
        self, raw: bytes, topic_sensor: str | None, topic: str
    ) -> list[Sample] | Invalid:
        """A payload of one or more lines, each decoded as serial decodes one line."""
        lines = raw.splitlines()
        samples: list[Sample] = []
        for i, line in enumerate(lines):
            result = self._decode_line(line, topic_sensor, topic)
            if isinstance(result, Invalid):
                if len(lines) == 1:
                    return result
                return Invalid(result.reason, f"line {i + 1}: {result.detail}")
            samples.extend(result)
        return samples

    def _decode_line(
        self, line: bytes, topic_sensor: str | None, topic: str
    ) -> list[Sample] | Invalid:
        if self._decode is None:  # no line holds the sensor field: the topic names it
            if topic_sensor is None:
                return self._bad_topic(topic)
            return self._decode_by_topic(line, topic_sensor)
        found = self._decode(line)
        # A kv or regex line without the sensor field fails as missing_field; so does one
        # without a value, which then fails the same with the topic's sensor.
        if (
            self._mend_by_topic
            and topic_sensor is not None
            and isinstance(found, Invalid)
            and found.reason == "missing_field"
        ):
            return self._decode_by_topic(line, topic_sensor)
        return found

    def _decode_by_topic(self, line: bytes, sensor: str) -> list[Sample] | Invalid:
        decode = self._topic_decoder(sensor)
        return decode if isinstance(decode, Invalid) else decode(line)

    def _topic_decoder(self, sensor: str) -> LineDecoder | Invalid:
        """The line decoder whose readings without a sensor field are named `sensor`."""
        decode = self._topic_decoders.get(sensor)
        if decode is None:
            if len(self._topic_decoders) >= _MAX_TOPIC_DECODERS:
                self._topic_decoders.clear()
            try:
                decode = decoder_for(self.cfg.model_copy(update={"sensor": sensor}))
            except ValueError as exc:  # the config loaded, so only the name can be wrong
                decode = Invalid("bad_sensor", f"from the topic: {exc}")
            self._topic_decoders[sensor] = decode
        return decode

    def _decode_json(self, raw: bytes, topic_sensor: str | None) -> list[Sample] | Invalid:
        """JSON readings at `json_query`, an object or a list; the topic's sensor if none."""
        cfg = self.cfg
        decode = self._decode
        assert decode is not None
        fill = topic_sensor is not None and cfg.takes_topic_sensor
        if not cfg.json_query and not fill:
            return decode(raw)
        try:
            doc = json.loads(raw.decode("utf-8"))
        except (ValueError, RecursionError):
            return decode(raw)  # which names what is wrong: invalid_utf8, invalid_json, blank
        if cfg.json_query:
            doc = _at(doc, cfg.json_query)
            if doc is _MISSING:
                return Invalid("missing_field", f"no {cfg.json_query!r}")
        if fill:
            items = doc if isinstance(doc, list) else [doc]
            for i, item in enumerate(items):
                if isinstance(item, int | float) and not isinstance(item, bool):
                    items[i] = item = {cfg.mapping.value: item}  # a bare number
                if isinstance(item, dict) and not _has_field(item, cfg.mapping.sensor):
                    item[cfg.mapping.sensor] = topic_sensor
            doc = doc if isinstance(doc, list) else items[0]
        try:
            text = json.dumps(doc)
        except (ValueError, RecursionError):
            return Invalid("invalid_json", "nested too deeply")
        # Encoded again for the decoder, which so applies to MQTT what it applies to serial.
        return decode(text.encode())

    def _reject(self, raw: bytes, reason: str, detail: str, now: float, mono: float) -> Rejected:
        return Rejected(raw, reason, detail, self.name, now, mono)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """End iteration and disconnect; safe while iteration waits, and safe to call twice.

        Batches already handed out get up to `_ACK_GRACE` seconds for their acknowledgements
        (their commits are in flight) before the DISCONNECT: what is acknowledged then is not
        redelivered next time.
        """
        self._closed.set()
        client, self._client = self._client, None
        if client is None:
            await self._stop_misc()
            return
        if client.is_connected():
            self._pause(client)
            if not self._all_acked.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._all_acked.wait(), _ACK_GRACE)
        await self._stop_misc()
        if client.is_connected():
            # Closing a TCP socket with unread input sends a RST, and the broker then discards
            # what it had not read yet, our last PUBACKs included: read everything pending
            # first (messages read now are never acked, so the broker keeps them), then let
            # the PUBACKs and the DISCONNECT go out before paho closes the socket.
            sock = client.socket()
            for _ in range(10 * _MAX_BATCH):  # bounded: a QoS 0 flood never ends by itself
                if sock is None or not select.select([sock], [], [], 0)[0]:
                    break
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    break
                sock = client.socket()
            client.disconnect()
            client.loop_write()
            lost = self._lost
            if lost is not None and client.socket() is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(lost), 2.0)
        _close_socket(client)

    async def _stop_misc(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None


def _abandon(connecting: asyncio.Future[None], client: mqtt.Client) -> None:
    if not connecting.cancelled():
        connecting.exception()  # retrieved: a failed connect nobody waits for any more is fine
    _close_socket(client)


def _close_socket(client: mqtt.Client) -> None:
    sock = client.socket()
    if sock is None:
        return
    with contextlib.suppress(RuntimeError):  # no running loop: never registered
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
    with contextlib.suppress(OSError):
        sock.close()


def _file_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM file ({exc.reason or exc})"
    return str(exc)
