"""MQTT input (paho-mqtt 2.x): subscriptions whose messages are acknowledged after the commit.

The client runs on the event loop, without a paho network thread (`agent/mqttloop.py`).
`loop_misc` closes a connection whose broker answers no PINGREQ within the keepalive, and
iteration then raises `DriverError`: the runtime's reconnect loop takes over.

The read path is the driver's own for PUBLISH packets, the bulk: paho 2.x reads one packet per
`loop_read` whatever `max_packets` says, in three system calls, and builds a message object
with a lock in it (some 40 us a message on a loaded 2-core test machine: two fifths of the
agent's CPU with one reading per message), and its `ack` writes each PUBACK with a system call
of its own. The socket paho holds is a `_Wire`, which reads in large chunks into a buffer; the
driver takes the PUBLISH packets (QoS 0 and 1) out of it, and hands paho every other packet
(CONNACK, SUBACK, PINGRESP, DISCONNECT), whole, through `loop_read`, so paho keeps the session,
the keepalive and the disconnect reasons. So the messages of one socket wake-up become one
batch: one submission to the log, and once it is committed one write of all their PUBACKs.

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
a decoder whose fixed `sensor` is the topic's (one per sensor name, kept). A JSON payload of
plain objects (known names, finite numbers, epoch times: what devices send) becomes readings
straight from the parsed document (`decoders.PlainMapping`); any other takes the general way.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from agent import mqttloop
from agent.config import MqttInputConfig
from agent.events import Invalid, Reading, Rejected, Sample
from drivers.base import Batch, DriverError
from drivers.decoders import JsonDecoder, LineDecoder, decode_json, decoder_for, loads

log = logging.getLogger(__name__)

#: A batch takes messages until it holds this many, or this many readings (a message may hold
#: a hundred): one batch is one submission to the log, whose queue holds 50,000 by default.
_MAX_BATCH = 1000
_MAX_ITEMS = 5000
#: Payload bytes held (read, not yet taken by iteration) before the driver stops reading its
#: socket, whatever the window: `max_inflight` counts messages, and 4096 of the largest
#: (`max_payload`, 64 KiB) would be 256 MiB on a 1 GiB Pi; some brokers also send past the
#: window once acknowledgements flow (mosquitto 2.0.11 here). TCP then pushes back on the
#: broker, which keeps the messages.
INBOX_BYTES = 8 * 1024 * 1024
#: What one socket wake-up reads at most; TCP holds the rest back at the broker.
_READ_LIMIT = 256 * 1024
_CHUNK = 64 * 1024
#: A PUBACK packet as a big-endian uint32: type 4, remaining length 2, the packet id below.
_PUBACK = 0x40020000
#: How long `close` waits for the runtime to acknowledge batches it already took: their
#: commit is usually one group commit away, and a PUBACK sent now saves a redelivery later.
_ACK_GRACE = 0.5
#: How long `close` waits for the DISCONNECT to go out, and then for the broker to close its
#: side of the connection (which tells that it has read our last PUBACKs).
_LINGER = 1.0
#: Line decoders kept for sensor names taken from topics (they are cheap to build again), and
#: topics kept with their sensor names.
_MAX_TOPIC_DECODERS = 1024
_MAX_TOPICS = 4096
_MISSING = object()

#: A topic as it arrives, and the sensor its levels name (None when the template does not match).
_Topic = tuple[str, str | None]
#: A message waiting for iteration: its topic, payload, packet id and QoS.
_Message = tuple[_Topic, bytes, int, int]


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


class _Wire:
    """The broker connection as paho sees it (its `_sock`), with a read buffer in front.

    `fill` reads what the socket has, in large chunks, into `buf`; the driver takes the PUBLISH
    packets out of it and lets paho read the others through `recv`, never more than `allow`
    bytes (whole packets), so paho's reader is always between packets when the driver parses.
    Once the socket ended (`ended`: EOF, or `error`), `finish` lets paho read the rest and then
    find the end, which it reports as a lost connection. On the event loop thread only.
    """

    __slots__ = ("allow", "buf", "ended", "error", "finishing", "lingering", "sock")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.allow = 0
        self.ended = False
        self.error: OSError | None = None
        self.finishing = False
        # Set by the driver's `close`: paho's close then only half-closes (see `linger`).
        self.lingering = False

    def fill(self, limit: int) -> None:
        """Read what the socket holds, about `limit` bytes at most, without blocking."""
        sock, buf = self.sock, self.buf
        start = len(buf)
        tls = isinstance(sock, ssl.SSLSocket)
        while not self.ended and len(buf) - start < limit:
            try:
                chunk = sock.recv(_CHUNK)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except OSError as exc:
                self.ended, self.error = True, exc
                return
            if not chunk:
                self.ended = True
                return
            buf += chunk
            # A short read emptied the kernel's buffer: asking again would only say so. (TLS
            # hands out a record at a time, so it reads on until it would block.)
            if len(chunk) < _CHUNK and not tls:
                return

    def finish(self) -> None:
        """Let paho read all that is left, then the end."""
        self.finishing = True
        self.allow = len(self.buf)

    async def linger(self, within: float) -> None:
        """After the half close: read and drop the input until the broker closes its side, for
        `within` seconds at most; then close."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        sock = self.sock
        try:
            while not self.ended and loop.time() < deadline:
                self.buf.clear()
                self.fill(_READ_LIMIT)
                if self.ended:
                    break
                readable = loop.create_future()
                loop.add_reader(sock, _resolve, readable)
                try:
                    await asyncio.wait_for(readable, max(0.0, deadline - loop.time()))
                except TimeoutError:
                    break
                finally:
                    loop.remove_reader(sock)
        except (OSError, ValueError):
            pass  # closed meanwhile: nothing more to wait for
        finally:
            self.buf.clear()
            sock.close()

    # What paho calls (`SocketLike`).

    def recv(self, bufsize: int) -> bytes:
        n = min(bufsize, self.allow)
        if n > 0:
            buf = self.buf
            out = bytes(buf[:n])
            del buf[:n]  # cheap: a bytearray drops its head by moving its start
            self.allow -= len(out)
            return out
        if self.finishing and self.ended and not self.buf:
            if self.error is not None:
                raise self.error
            return b""  # EOF
        raise BlockingIOError

    def send(self, data: bytes | bytearray) -> int:
        return self.sock.send(data)

    def fileno(self) -> int:
        return self.sock.fileno()

    def setblocking(self, flag: bool) -> None:
        self.sock.setblocking(flag)

    def pending(self) -> int:
        return len(self.buf)

    def close(self) -> None:
        if self.lingering:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            return
        self.sock.close()


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
        self._fill = cfg.takes_topic_sensor  # a property that searches the template
        # Kv and regex lines may lack a field; a CSV record has every column.
        self._mend_by_topic = self._fill and cfg.format in ("kv", "regex")
        # The JSON fast path (`_plain_readings`), and whether it can name by the topic too.
        self._plain = self._decode.plain if isinstance(self._decode, JsonDecoder) else None
        self._plain_fill = self._plain is not None and self._plain.names_by_default
        self._paho_errors = _LastError()
        self._paho_log = logging.Logger(f"{__name__}.paho.{cfg.name}", logging.WARNING)
        self._paho_log.addHandler(self._paho_errors)
        self._closed = asyncio.Event()
        self._client: mqtt.Client | None = None
        self._wire: _Wire | None = None
        # Messages read and not taken by iteration yet; `_waiter` is iteration waiting for
        # more, for the end of the connection, or for `close`.
        self._inbox: deque[_Message] = deque()
        self._inbox_bytes = 0  # payload bytes in `_inbox`
        self._waiter: asyncio.Future[None] | None = None
        self._topics: dict[bytes, _Topic] = {}
        # Per connection: `_ready` holds None once usable, or why the broker refused it;
        # `_lost` why it became unusable (iteration raises that).
        self._ready: asyncio.Future[str | None] | None = None
        self._lost: asyncio.Future[str] | None = None
        self._disconnect_reason = ""
        self._misc: asyncio.Task[None] | None = None
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
        self._closed.clear()
        self._inbox = deque()
        self._inbox_bytes = 0
        self._wire = None
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
            mqttloop.close_socket(client)
            return
        self._client = client
        try:
            self._watch(client)
            tick = min(1.0, self.cfg.keepalive / 4)
            self._misc = asyncio.create_task(
                mqttloop.keep_alive(client, tick), name=f"mqtt-{self.name}"
            )
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
        mqttloop.SocketHooks().install(client)
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
        if not isinstance(sock, socket.socket):  # an SSLSocket too
            raise DriverError(f"{self.name}: the connection closed while opening")
        # paho has sent CONNECT and read nothing yet: from here on it reads through the wire.
        wire = self._wire = _Wire(sock)
        client._sock = wire  # paho has no public way to be handed a socket
        mqttloop.watch(client, sock, self._read, client)

    def _read(self, client: mqtt.Client) -> None:
        """The socket is readable, or the wire holds what was read before a pause."""
        wire = self._wire
        if wire is None or not _reads(client, wire):
            return  # paho closed it meanwhile
        if not self._paused:
            wire.fill(_READ_LIMIT)
        before = len(self._inbox)
        if self._take(client, wire) and wire.ended and not self._paused:
            wire.finish()  # paho reads the rest, finds the end and calls the connection lost
            client.loop_read()
        if len(self._inbox) > before:
            self._wake()

    def _take(self, client: mqtt.Client, wire: _Wire) -> bool:
        """Take the whole PUBLISH packets out of the wire's buffer and let paho read the others;
        False once paho closed the connection (a protocol error)."""
        buf = wire.buf
        size, pos = len(buf), 0
        inbox, topics = self._inbox, self._topics
        limit, v5 = self.cfg.max_inflight, self._v5
        try:
            while pos < size and not self._paused:
                first = buf[pos]
                # The remaining length: 1 to 4 bytes of 7 bits, the lowest first.
                start, length, shift = pos + 1, 0, 0
                while True:
                    if start >= size:
                        return True  # not all here yet
                    byte = buf[start]
                    start += 1
                    length |= (byte & 0x7F) << shift
                    shift += 7
                    if byte < 0x80 or shift == 28:
                        break
                end = start + length
                if byte >= 0x80:
                    end = size  # a fifth length byte is not MQTT: paho says so, and closes
                elif end > size:
                    return True  # the rest of the packet is not here yet
                taken = (first >> 4) == 3 and (first & 0x06) in (0, 2)  # PUBLISH, QoS 0 or 1
                if taken:
                    tlen = (buf[start] << 8) | buf[start + 1] if length >= 2 else 0
                    mark = start + 2 + tlen
                    name = bytes(buf[start + 2 : mark])
                    qos = (first >> 1) & 3
                    mid = 0
                    if qos and mark + 2 <= end:
                        mid = (buf[mark] << 8) | buf[mark + 1]
                        mark += 2
                    if v5:  # properties: their length, then them (none the driver uses)
                        plen = shift = 0
                        while mark < end and shift < 28:
                            byte = buf[mark]
                            mark += 1
                            plen |= (byte & 0x7F) << shift
                            shift += 7
                            if byte < 0x80:
                                break
                        mark += plen
                    # Malformed (the lengths do not add up), or no topic (an MQTT 5 alias,
                    # which the driver never allows): paho's, which knows what to say.
                    taken = length >= 2 and mark <= end and bool(name) and (mid > 0 or not qos)
                if not taken:
                    del buf[:pos]
                    wire.allow = end - pos
                    pos = 0
                    rc = client.loop_read()
                    wire.allow = 0
                    if rc != mqtt.MQTT_ERR_SUCCESS or not _reads(client, wire):
                        return False
                    size = len(buf)
                    continue
                payload = bytes(buf[mark:end])
                pos = end
                topic = topics.get(name)
                if topic is None:
                    topic = self._topic(name)
                if first & 0x09 and not self._keep(client, first, mid, qos):  # DUP or RETAIN
                    continue
                inbox.append((topic, payload, mid, qos))
                self._inbox_bytes += len(payload)
                if len(inbox) >= limit or self._inbox_bytes >= INBOX_BYTES:
                    self._pause(client)
            return True
        finally:
            if pos:
                del buf[:pos]

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
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _topic(self, name: bytes) -> _Topic:
        """A topic's text and sensor, kept: a device publishes on the same few topics."""
        if len(self._topics) >= _MAX_TOPICS:
            self._topics.clear()
        # MQTT topics are UTF-8, which brokers check; a bad one shows escaped, never raises.
        text = name.decode("utf-8", "backslashreplace")
        topic = self._topics[name] = (text, self._sensor_from_topic(text))
        return topic

    def _keep(self, client: mqtt.Client, flags: int, mid: int, qos: int) -> bool:
        """Whether a message with the DUP or RETAIN flag (`flags`, the PUBLISH's first byte)
        goes on to the log; one that does not is acknowledged now."""
        dup, retain = flags & 0x08, flags & 0x01
        if retain and not dup and self._session_present and not self._v5:
            # A stored value sent again because we resubscribed (see the module docstring).
            # A DUP one is an unacknowledged delivery coming back: that one is kept.
            self.counters["retained_skipped"] += 1
            if qos:
                _puback(client, [mid])
            return False
        if dup:
            self.counters["redelivered"] += 1
        return True

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # Only for a PUBLISH `_take` left to paho because it looked malformed and paho did not
        # think so: never in practice, and then it goes the same way.
        flags = (0x08 if msg.dup else 0) | (0x01 if msg.retain else 0)
        if flags and not self._keep(client, flags, msg.mid, msg.qos):
            return
        try:
            name = msg.topic.encode()
        except UnicodeDecodeError:  # decoded as any other, on a topic that names no sensor
            name = b"(not UTF-8)"
        self._inbox.append((self._topic(name), bytes(msg.payload), msg.mid, msg.qos))
        self._inbox_bytes += len(msg.payload)
        if len(self._inbox) >= self.cfg.max_inflight or self._inbox_bytes >= INBOX_BYTES:
            self._pause(client)
        self._wake()

    def _pause(self, client: mqtt.Client) -> None:
        # The inbox is full (max_inflight messages or INBOX_BYTES): stop reading and let TCP
        # push back on the broker until iteration has taken half of it. QoS 1 stays within the
        # broker's window (MQTT 5: our Receive Maximum) when the broker keeps to it, as nothing
        # is acknowledged before its commit; QoS 0 has no window at all.
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
            loop.call_soon(self._read, client)  # what the wire holds, the selector cannot see

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        while True:
            await self._arrival()
            batch = self._batch()
            if batch.items:
                return batch
            if batch.ack is not None:  # only empty payloads: nothing to commit first
                batch.ack()

    async def _arrival(self) -> None:
        """Until the inbox holds a message; StopAsyncIteration once closed, DriverError once
        the connection is lost (what it delivered before is taken first)."""
        while True:
            if self._closed.is_set():
                raise StopAsyncIteration
            if self._inbox:
                return
            lost = self._lost
            if lost is None:
                raise DriverError(f"{self.name}: not connected (open first)")
            if lost.done():
                raise DriverError(f"{self.name}: {lost.result()}")
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None

    def _batch(self) -> Batch:
        """The messages of the inbox (up to a bound) as one batch: their items and the
        acknowledgement of those with QoS 1 (empty payloads included: they hold no item)."""
        inbox = self._inbox
        items: list[Reading | Rejected] = []
        mids: list[int] = []
        now, mono = time.time(), time.monotonic()
        taken = 0
        while inbox and taken < _MAX_BATCH and len(items) < _MAX_ITEMS:
            topic, raw, mid, qos = inbox.popleft()
            self._inbox_bytes -= len(raw)
            taken += 1
            if qos:
                mids.append(mid)
            self._decode_message(items, topic, raw, now, mono)
        if (
            self._paused
            and len(inbox) <= self.cfg.max_inflight // 2
            and self._inbox_bytes <= INBOX_BYTES // 2
        ):
            self._resume()
        if not mids or self._client is None:
            return Batch(items, None)
        return Batch(items, self._acknowledger(self._client, mids))

    def _acknowledger(self, client: mqtt.Client, mids: list[int]) -> Callable[[], None]:
        unacked, all_acked = self._unacked, self._all_acked
        token = id(mids)
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
                _puback(client, mids)

        return ack

    # ------------------------------------------------------------------ decoding

    def _decode_message(
        self, items: list[Reading | Rejected], topic: _Topic, raw: bytes, now: float, mono: float
    ) -> None:
        """Append what one message holds to `items`: its readings, or why it is rejected."""
        text, topic_sensor = topic
        if len(raw) > self.cfg.max_payload:
            detail = f"{len(raw)} bytes on {text}"
            items.append(self._reject(raw[: self.cfg.max_payload], "oversized", detail, now, mono))
            return
        fmt = self.cfg.format
        found: list[Reading] | Invalid
        if fmt == "json":
            found = self._decode_json(raw, topic_sensor, now, mono)
        else:
            if fmt == "number":
                samples = self._decode_number(raw, topic_sensor, text)
            else:
                samples = self._decode_lines(raw, topic_sensor, text)
            found = samples if isinstance(samples, Invalid) else self._readings(samples, now, mono)
        if isinstance(found, Invalid):
            items.append(self._reject(raw, found.reason, found.detail, now, mono))
        else:
            items += found

    def _readings(self, samples: list[Sample], now: float, mono: float) -> list[Reading]:
        """Samples as the input hands them on: the event time is the receive time when the
        device sent none."""
        name = self.name
        return [
            Reading(s.sensor, s.value, s.unit, now if s.time is None else s.time, now, mono, name)
            for s in samples
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

    def _decode_json(
        self, raw: bytes, topic_sensor: str | None, now: float, mono: float
    ) -> list[Reading] | Invalid:
        """JSON readings at `json_query`, an object or a list; the topic's sensor if none."""
        cfg = self.cfg
        decode = self._decode
        assert isinstance(decode, JsonDecoder)  # what decoder_for builds for format json
        try:
            doc = loads(raw)
        except (ValueError, RecursionError):
            # The decoder names what is wrong: invalid_utf8, invalid_json, or a blank payload.
            found = decode(raw)
            return found if isinstance(found, Invalid) else self._readings(found, now, mono)
        if cfg.json_query:
            doc = _at(doc, cfg.json_query)
            if doc is _MISSING:
                return Invalid("missing_field", f"no {cfg.json_query!r}")
        fill = topic_sensor is not None and self._fill
        readings = self._plain_readings(doc, topic_sensor if fill else None, now, mono)
        if readings is not None:
            return readings
        if fill:
            items = doc if isinstance(doc, list) else [doc]
            for i, item in enumerate(items):
                if isinstance(item, int | float) and not isinstance(item, bool):
                    items[i] = item = {cfg.mapping.value: item}  # a bare number
                if isinstance(item, dict) and not _has_field(item, cfg.mapping.sensor):
                    item[cfg.mapping.sensor] = topic_sensor
            doc = doc if isinstance(doc, list) else items[0]
        found = decode.decode_doc(doc)
        return found if isinstance(found, Invalid) else self._readings(found, now, mono)

    def _plain_readings(
        self, doc: Any, sensor: str | None, now: float, mono: float
    ) -> list[Reading] | None:
        """The readings of a parsed document when it is an object or a list of them (or, named
        by the topic's `sensor`, of bare numbers) and every object is plain (see
        `PlainMapping.reading`); else None: the general way then decides, all or nothing,
        and gives the exact verdict.

        Devices send plain objects, often a hundred to a message, and checking each field the
        general way and building a Sample before its Reading cost three times what parsing
        the message did.
        """
        if self._plain is None or (sensor is not None and not self._plain_fill):
            return None
        plain, name = self._plain.reading, self.name
        if type(doc) is list:
            found = self._plain.readings(doc, now, mono, name, "", sensor)
            if found is not None:
                return found
        out: list[Reading] = []
        for obj in doc if type(doc) is list else (doc,):
            if type(obj) is not dict:
                if sensor is None or (type(obj) is not float and type(obj) is not int):
                    return None
                obj = {self.cfg.mapping.value: obj}  # a bare number, as the general way fills it
            reading = plain(obj, now, mono, name, "", sensor)
            if reading is None:
                return None
            out.append(reading)
        return out

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
        self._wake()
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
        wire = self._wire
        if client.is_connected() and wire is not None and _reads(client, wire):
            # The last PUBACKs count only once the broker has read them, and it drops what
            # it has not read when the connection ends: by a RST, which closing a socket with
            # unread input sends, or by a takeover, when the agent comes back at once under
            # the same client id. So paho's close only half-closes the socket after the
            # DISCONNECT, and the rest of the input (messages never acknowledged, which the
            # broker keeps) is read and dropped until the broker closes its side: it has then
            # read everything before the DISCONNECT.
            wire.lingering = True
            client.disconnect()
            client.loop_write()
            lost = self._lost
            if lost is not None and client.socket() is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(lost), _LINGER)
            await wire.linger(_LINGER)
        mqttloop.close_socket(client)

    async def _stop_misc(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _reads(client: mqtt.Client, wire: _Wire) -> bool:
    """Whether paho still reads through `wire` (it drops its socket when it closes it)."""
    return client.socket() is wire


def _puback(client: mqtt.Client, mids: list[int]) -> None:
    """Acknowledge the QoS 1 messages `mids` in one write.

    paho's `ack` queues each PUBACK as a packet of its own, and writes each with a system call
    of its own; these four-byte packets are the same for MQTT 3.1.1 and 5 (success, no reason
    code), so they go to paho's output queue as one, after what it queued before.
    """
    data = struct.pack(f">{len(mids)}I", *[_PUBACK | mid for mid in mids])
    client._packet_queue(mqtt.PUBACK, data, 0, 0)


def _abandon(connecting: asyncio.Future[None], client: mqtt.Client) -> None:
    if not connecting.cancelled():
        connecting.exception()  # retrieved: a failed connect nobody waits for any more is fine
    mqttloop.close_socket(client)


def _file_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM file ({exc.reason or exc})"
    return str(exc)
