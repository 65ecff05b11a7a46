"""The MQTT upstream (paho-mqtt 2.x): events published at QoS 1; a cursor moves on PUBACK.

The client runs on the event loop, without a paho network thread (`agent/mqttloop.py`); its
callbacks only mark tickets acknowledged and wake the sender.

Acknowledgements: every message gets a ticket in an `AckWindow`, in the order it was sent. A
PUBACK marks its ticket; a stream's cursor moves to the highest seq whose PUBACK, and every
earlier one, arrived (PUBACKs may complete out of order relative to the bookkeeping). At most
`max_inflight` messages are outstanding, counted from the oldest unacknowledged one, so packet
ids (which wrap at 65,535) are never reused while in flight. A message unacknowledged for
`timeout` means a hung broker: the connection is dropped and made again. A lost connection
forgets what was in flight; it is sent again from the cursors (the receiver drops duplicates
by id). The session is clean: nothing waits on the broker for a client that is gone.

Payload formats:
- `batch`: one message per batch, the same JSON as the HTTP body, on `edge/{agent}/{stream}`.
- `event`: one message per event, its wire object, on `edge/{agent}/{stream}/{sensor}`
  (events without a sensor, such as gaps, put their kind there).
- `thingsboard`: ThingsBoard's gateway telemetry on `v1/gateway/telemetry`:
  `{"<device>": [{"ts": <ms>, "values": {...}}]}`. The device is the part of the sensor name
  before its first dot (`board.temp1`: device `board`, key `temp1`, as `sensor_prefix` and
  MQTT `{device}` topics name them); a sensor without a dot, and events without a sensor,
  belong to a device named after the agent. Aggregates are keys `<key>_<window>_<function>`,
  alerts `alert_<rule>` (`raised`/`cleared`) and `alert_<rule>_severity`, other events
  `event` (their kind) and `<kind>_<field>` for each plain field of their data. ThingsBoard
  keys a value by device, key and ts, so a batch sent twice overwrites itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import ssl
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent import mqttloop
from agent.backoff import Backoff
from agent.config import MqttUpstreamConfig
from agent.events import Event, Stream
from agent.log import EventLog
from agent.upstream import (
    STOP_GRACE,
    AckWindow,
    Batch,
    Feed,
    UpstreamError,
    UpstreamStatus,
    WireEncoder,
    batch_body,
    deadletter_event,
    describe_tls_error,
    fit,
    join_fit,
    tls_context,
)

log = logging.getLogger(__name__)

#: Room kept in `max_bytes` for a batch message's envelope around its events.
ENVELOPE = 256


@dataclass(slots=True)
class _Message:
    stream: Stream
    topic: str
    payload: bytes
    first_seq: int
    last_seq: int
    events: int


class MqttUpstream:
    """One MQTT broker (or IoT platform), a consumer of the log with a cursor per stream.

    `run` is the only method that publishes; it is never called concurrently with itself.
    """

    def __init__(
        self, cfg: MqttUpstreamConfig, agent_name: str, *, data_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.agent_name = agent_name
        self.consumer = f"upstream:{cfg.name}"
        self.client_id = cfg.effective_client_id(agent_name)
        self.status = UpstreamStatus(connected=False)
        self.feed = Feed(cfg, self.consumer, self.status, data_dir)
        self.streams = list(self.feed.streams)
        self._backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)
        self._window = AckWindow(cfg.max_inflight)
        self._tickets: dict[int, int] = {}  # packet id -> ticket
        self._pending: deque[_Message] = deque()
        self._wake = asyncio.Event()
        self._log_id = ""
        self._encoder = WireEncoder("")

    @property
    def name(self) -> str:
        """The configured name."""
        return self.cfg.name

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Forward until `stop` is set."""
        self._wake = asyncio.Event()
        self._log_id = event_log.log_id
        self._encoder = WireEncoder(event_log.log_id)
        await self.feed.open(event_log)
        while not stop.is_set():
            link = _Link(self.cfg, self.client_id, self._on_ack, self._wake)
            try:
                await link.open(stop)
                if stop.is_set():
                    break
                self.status.connected = True
                log.info("upstream %s: connected to %s", self.cfg.name, self.cfg.url)
                await self._pump(link, stop)
            except UpstreamError as exc:
                self.status.failed(str(exc))
                delay = self._backoff.next()
                if self._backoff.failures <= 3 or self._backoff.failures % 20 == 0:
                    log.warning("upstream %s: %s; retrying in %.1fs", self.cfg.name, exc, delay)
                await link.close()
                self._forget()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
            finally:
                self.status.connected = False
                await link.close()
                self._forget()
        await self.feed.flush()

    def _forget(self) -> None:
        """The connection is gone, and with it whatever it had in flight: send it again."""
        self._window.clear()
        self._tickets.clear()
        self._pending.clear()
        self.feed.reset()
        self.status.inflight = 0

    def _on_ack(self, mid: int, refused: str | None) -> None:
        ticket = self._tickets.pop(mid, None)
        if ticket is not None and self._window.acked(ticket, refused):
            self._wake.set()

    async def _pump(self, link: _Link, stop: asyncio.Event) -> None:
        """Publish what the feed gives while the window has room; settle acknowledgements."""
        window, pending = self._window, self._pending
        replay_waiting = False
        while True:
            self._wake.clear()
            await self._settle()
            if link.lost.done():
                raise UpstreamError(link.lost.result())
            if stop.is_set():
                await self._drain(link)
                return
            if window.oldest_age() > self.cfg.timeout:
                raise UpstreamError(
                    f"no PUBACK within {self.cfg.timeout:g}s: the broker is not answering"
                )
            if not replay_waiting:
                replay_waiting = self.feed.replay_waiting()
            if replay_waiting and not window and not pending:
                # Applied only with nothing in flight, so no old PUBACK can move a cursor
                # that was just rewound.
                await self.feed.take_replay(force=True)
                replay_waiting = False
                continue
            if pending:
                while pending and not window.full:
                    self._publish(link, pending.popleft())
                if pending:
                    await self._wait(stop, link)
                continue
            if replay_waiting:
                await self._wait(stop, link)
                continue
            batch = await self.feed.next(stop, linger=self._backoff.failures == 0, wake=self._wake)
            if batch is None:
                continue
            batch, messages = self._encode(batch)
            self.feed.sent(batch)
            if not messages:  # the route took none of them: handled, in order
                window.add(batch.stream, batch.last_seq, done=True)
            pending.extend(messages)

    async def _wait(self, stop: asyncio.Event, link: _Link) -> None:
        """Until a PUBACK, a lost connection or stop; at most until the oldest message is
        overdue."""
        within = max(0.01, min(1.0, self.cfg.timeout - self._window.oldest_age()))
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait(
                [woken, self.feed.stopped(stop), link.lost],
                timeout=within,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            woken.cancel()

    async def _drain(self, link: _Link) -> None:
        """Stopping: give what is in flight a moment to be acknowledged."""
        self._pending.clear()
        deadline = time.monotonic() + min(STOP_GRACE, self.cfg.timeout)
        while self._window and not link.lost.done() and time.monotonic() < deadline:
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), deadline - time.monotonic())
            await self._settle()

    def _publish(self, link: _Link, message: _Message) -> None:
        ticket = self._window.add(
            message.stream, message.last_seq, first=message.first_seq, events=message.events
        )
        try:
            mid = link.publish(message.topic, message.payload)
        except ValueError as exc:  # a topic or payload MQTT cannot carry: never will
            self._window.acked(ticket, f"cannot publish: {exc}")
            return
        self._tickets[mid] = ticket
        inflight = len(self._window)
        self.status.inflight = inflight
        self.status.max_inflight = max(self.status.max_inflight, inflight)

    async def _settle(self) -> None:
        moves, events, refused = self._window.settle()
        self.status.inflight = len(self._window)
        if not moves:
            return
        records = []
        for flight in refused:
            local = (flight.refused or "").startswith("cannot publish")
            self.status.deadlettered += flight.events
            self.status.last_error = f"refused: {flight.refused} (dead-lettered)"
            self.status.last_error_time = time.time()
            log.error(
                "upstream %s: refused for good: %s seq %d..%d: %s",
                self.cfg.name,
                flight.stream.value,
                flight.first,
                flight.last_seq,
                flight.refused,
            )
            if flight.stream != Stream.DEADLETTER:  # never dead-letter a dead letter again
                records.append(
                    deadletter_event(
                        self.cfg.name,
                        self.consumer,
                        flight.stream,
                        (flight.first, flight.last_seq),
                        flight.events,
                        "publish" if local else "PUBACK",
                        flight.refused or "",
                    )
                )
        await self.feed.ack(moves.items(), {Stream.DEADLETTER: records} if records else None)
        sent = events - sum(f.events for f in refused)
        self.status.batches = self._window.settled_messages
        if sent:
            self.status.sent += sent
            self.status.last_success = time.time()
        self._backoff.reset()

    # ------------------------------------------------------------------ payloads

    def _encode(self, batch: Batch) -> tuple[Batch, list[_Message]]:
        """The messages for a batch (which may come back shorter, to fit `max_bytes`)."""
        if not batch.events:
            return batch, []
        fmt = self.cfg.format
        if fmt == "event":
            return batch, self._event_messages(batch)
        if fmt == "thingsboard":
            return self._thingsboard_message(batch)
        parts = self._encoder.events(batch.events)
        events_json, n = join_fit(parts, self.cfg.max_bytes - ENVELOPE)
        batch = batch.cut(n)
        topic = self.cfg.topic_template.format(
            agent=self.agent_name, log_id=self._log_id, stream=batch.stream.value
        )
        body = batch_body(self._log_id, self.agent_name, events_json)
        return batch, [_Message(batch.stream, topic, body, batch.first_seq, batch.last_seq, n)]

    def _event_messages(self, batch: Batch) -> list[_Message]:
        template, log_id, agent = self.cfg.topic_template, self._log_id, self.agent_name
        out = []
        first = batch.first_seq
        for event in batch.events:
            sensor = _topic_level(event.sensor) if event.sensor is not None else event.kind
            device, key = _device_key(event.sensor, agent)
            topic = template.format(
                agent=agent,
                log_id=log_id,
                stream=event.stream,
                kind=event.kind,
                sensor=sensor,
                device=_topic_level(device),
                key=_topic_level(key) if key is not None else event.kind,
            )
            payload = self._encoder.event(event).encode()
            out.append(_Message(batch.stream, topic, payload, first, event.seq, 1))
            first = event.seq + 1
        # The last message also accounts for the events the route left out after it.
        out[-1].last_seq = batch.last_seq
        return out

    def _thingsboard_message(self, batch: Batch) -> tuple[Batch, list[_Message]]:
        pairs = [thingsboard_entry(e, self.agent_name) for e in batch.events]
        _, n = fit(pairs, self.cfg.max_bytes - ENVELOPE)
        batch = batch.cut(n)
        doc: dict[str, list[dict[str, Any]]] = {}
        for device, entry in pairs[:n]:
            doc.setdefault(device, []).append(entry)
        payload = json.dumps(doc, separators=(",", ":")).encode()
        topic = self.cfg.topic_template.format(agent=self.agent_name)
        return batch, [_Message(batch.stream, topic, payload, batch.first_seq, batch.last_seq, n)]


def _topic_level(name: str) -> str:
    # Wildcards and NUL cannot appear in a topic name; '/' is kept (it makes levels).
    return name.replace("+", "_").replace("#", "_").replace("\0", "_") or "_"


def _device_key(sensor: str | None, agent: str) -> tuple[str, str | None]:
    """ThingsBoard device and key of a sensor name: `board.temp1` -> (`board`, `temp1`)."""
    if sensor is None:
        return agent, None
    device, dot, key = sensor.partition(".")
    if not dot or not device or not key:
        return agent, sensor
    return device, key


def thingsboard_entry(event: Event, agent: str) -> list[Any]:
    """`[device, {"ts": ms, "values": {...}}]` for one event (see the module docstring)."""
    device, key = _device_key(event.sensor, agent)
    data = event.data or {}
    values: dict[str, Any] = {}
    if event.kind == "reading" and key is not None:
        values[key] = event.value
    elif event.kind == "aggregate" and key is not None:
        window = data.get("window", "window")
        functions = data.get("values")
        if isinstance(functions, dict) and functions:
            for fn, v in functions.items():
                if v is not None:
                    values[f"{key}_{window}_{fn}"] = v
        elif event.value is not None:
            values[f"{key}_{window}"] = event.value
    elif event.kind.startswith("alert.") and "rule" in data:
        rule = data["rule"]
        values[f"alert_{rule}"] = event.kind.removeprefix("alert.")
        values[f"alert_{rule}_severity"] = data.get("severity")
        if event.value is not None:
            values[f"alert_{rule}_value"] = event.value
    else:
        prefix = event.kind.replace(".", "_")
        values["event"] = event.kind
        if key is not None and event.value is not None:
            values[key] = event.value
        for k, v in data.items():
            if v is None or isinstance(v, str | int | float | bool):
                values[f"{prefix}_{k}"] = v
    return [device, {"ts": int(event.time * 1000), "values": values}]


# --------------------------------------------------------------------------- the connection


class _PahoErrors(logging.Handler):
    """Keeps paho's last error line (why a socket died), which its callbacks do not carry."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.message: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno >= logging.WARNING:
            self.message = record.getMessage()


class _Link:
    """One connection: a paho client driven by the event loop. Used by one task."""

    def __init__(
        self,
        cfg: MqttUpstreamConfig,
        client_id: str,
        on_ack: Callable[[int, str | None], None],
        wake: asyncio.Event,
    ) -> None:
        self.cfg = cfg
        self.client_id = client_id
        self._on_ack_cb = on_ack
        self._wake = wake
        url = urlsplit(cfg.url)
        self.tls = url.scheme == "mqtts"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.tls else 1883)
        loop = asyncio.get_running_loop()
        self.lost: asyncio.Future[str] = loop.create_future()
        self._ready: asyncio.Future[str | None] = loop.create_future()
        self._client: mqtt.Client | None = None
        self._misc: asyncio.Task[None] | None = None
        self._errors = _PahoErrors()
        self._paho_log = logging.Logger(f"{__name__}.paho", logging.WARNING)
        self._paho_log.addHandler(self._errors)

    @property
    def where(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self, stop: asyncio.Event) -> None:
        """Connect and wait for the CONNACK; `UpstreamError` saying what to check if not."""
        client = self._new_client()
        loop = asyncio.get_running_loop()
        connecting = loop.run_in_executor(None, self._connect, client)
        stopping: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        try:
            await asyncio.wait([connecting, stopping], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not connecting.done():
                # Stopping, or cancelled: the thread goes on (a connect is bounded by
                # connect_timeout); whatever socket it ends with is closed, never used.
                connecting.add_done_callback(lambda _: mqttloop.close_socket(client))
        if not connecting.done():
            return
        try:
            connecting.result()
        except (OSError, ValueError) as exc:
            raise UpstreamError(f"cannot connect to {self.where}: {self._why(exc)}") from exc
        self._client = client
        sock = client.socket()
        if sock is None:
            raise UpstreamError(f"{self.where}: the connection closed while opening")
        if isinstance(sock, socket.socket):  # an SSLSocket too
            with contextlib.suppress(OSError):
                # paho leaves Nagle on: a PUBLISH would wait for the ACK of the one before.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        mqttloop.watch(client, sock, self._read, client)
        self._misc = asyncio.create_task(self._misc_loop(client), name=f"mqtt-up-{self.cfg.name}")
        stopper: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        waiters: list[asyncio.Future[Any]] = [self._ready, self.lost, stopper]
        try:
            await asyncio.wait(
                waiters,
                timeout=self.cfg.connect_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            stopper.cancel()
        if stop.is_set():
            return
        if self._ready.done():
            refused = self._ready.result()
            if refused is not None:
                raise UpstreamError(f"{self.where}: {refused}")
            return
        if self.lost.done():
            detail = self._errors.message or self.lost.result()
            hint = ""
            if self.tls and self.cfg.cert_file is None:
                hint = " (does the broker require a client certificate? set cert_file)"
            raise UpstreamError(
                f"{self.where} closed the connection before accepting it: {detail}{hint}"
            )
        raise UpstreamError(
            f"{self.where} accepted TCP but did not answer CONNECT within "
            f"{self.cfg.connect_timeout:g}s"
        )

    def _new_client(self) -> mqtt.Client:
        cfg = self.cfg
        if cfg.protocol == "5":
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2, client_id=self.client_id, protocol=mqtt.MQTTv5
            )
        else:
            client = mqtt.Client(
                CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                clean_session=True,
                protocol=mqtt.MQTTv311,
            )
        client.connect_timeout = cfg.connect_timeout
        client.enable_logger(self._paho_log)
        # Our window bounds what is in flight; paho must send all of it, never queue.
        client.max_inflight_messages_set(cfg.max_inflight)
        if cfg.token is not None:
            client.username_pw_set(cfg.token)
        elif cfg.username is not None:
            client.username_pw_set(cfg.username, cfg.password)
        if self.tls:
            context = tls_context(cfg.ca_file, cfg.cert_file, cfg.key_file, f"upstream {cfg.name}")
            if cfg.alpn:
                context.set_alpn_protocols(cfg.alpn)
            client.tls_set_context(context)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        mqttloop.SocketHooks().install(client)
        return client

    def _connect(self, client: mqtt.Client) -> None:
        """In the executor thread: the loop does not know this client before it returns."""
        if self.cfg.protocol == "5":
            client.connect(self.host, self.port, int(self.cfg.keepalive), clean_start=True)
        else:
            client.connect(self.host, self.port, int(self.cfg.keepalive))

    def _why(self, exc: BaseException) -> str:
        tls = describe_tls_error(exc)
        if tls is not None:
            if "handshake" in tls and self.cfg.cert_file is None:
                tls += " (does the broker require a client certificate? set cert_file)"
            return tls
        if isinstance(exc, TimeoutError):
            return f"no answer within {self.cfg.connect_timeout:g}s"
        if isinstance(exc, ConnectionRefusedError):
            return "connection refused (is the broker running, on this port?)"
        return str(exc) or type(exc).__name__

    def publish(self, topic: str, payload: bytes) -> int:
        """Publish at QoS 1; the packet id its PUBACK will name."""
        client = self._client
        if client is None:
            raise UpstreamError("not connected")
        info = client.publish(topic, payload, qos=1)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise UpstreamError(f"cannot publish: {mqtt.error_string(info.rc)}")
        return int(info.mid)

    def _read(self, client: mqtt.Client) -> None:
        client.loop_read()
        # TLS: one socket read may decrypt several MQTT packets; paho takes one per call and
        # the selector cannot see the rest, which would sit there until the next byte arrives.
        sock = client.socket()
        while isinstance(sock, ssl.SSLSocket) and sock.pending():
            if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            sock = client.socket()

    async def _misc_loop(self, client: mqtt.Client) -> None:
        await mqttloop.keep_alive(client, min(1.0, self.cfg.keepalive / 4))
        self._set_lost(self._errors.message or "the broker stopped answering (keepalive)")

    def _set_lost(self, why: str) -> None:
        if not self.lost.done():
            self.lost.set_result(why)
        self._wake.set()

    # paho callbacks: on the loop thread (after connect), they only resolve futures.

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if not self._ready.done():
            refused = f"the broker refused the connection: {reason}" if reason.is_failure else None
            self._ready.set_result(refused)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        self._set_lost(f"connection lost: {self._errors.message or reason}")

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        refused = str(reason) if getattr(reason, "is_failure", False) else None
        self._on_ack_cb(mid, refused)

    async def close(self) -> None:
        """Disconnect (politely, when still connected); safe to call twice."""
        client, self._client = self._client, None
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        if client is None:
            return
        if client.is_connected():
            client.disconnect()
            with contextlib.suppress(OSError):
                client.loop_write()
        mqttloop.close_socket(client)
