"""MQTT input (paho-mqtt 2.x): subscriptions whose messages are acknowledged after the commit.

The client runs on the event loop, as aiomqtt does: paho's socket callbacks register the socket
with the loop, which calls `loop_read`/`loop_write`, and a small task calls `loop_misc` for
keepalives. No paho network thread exists, so paho is never touched from two threads.

Nothing is lost when the agent dies: QoS 1 on a persistent session (clean session off) and
`manual_ack`, so a PUBACK leaves only after the runtime has committed the message's readings
(the `Batch.ack` callback). A message the agent never acknowledged is redelivered by the broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import select
import ssl
import time
from typing import Any, Self
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttInputConfig
from agent.events import Invalid, Reading, Rejected
from drivers.base import Batch, DriverError
from drivers.decoders import decoder_for

_MAX_BATCH = 1000


def topic_pattern(template: str) -> re.Pattern[str]:
    """A regex with a named group per `{name}` of a topic template (one level each)."""
    parts = re.split(r"(\{[a-zA-Z_][a-zA-Z0-9_]*\})", template)
    out = "".join(
        f"(?P<{p[1:-1]}>[^/]+)" if p.startswith("{") and p.endswith("}") else re.escape(p)
        for p in parts
    )
    return re.compile(f"^{out}$")


class MqttDriver:
    """Readings from MQTT subscriptions. Iteration is never called concurrently with itself."""

    def __init__(self, cfg: MqttInputConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self._pattern = topic_pattern(cfg.topic_template)
        self._decode = decoder_for("csv") if cfg.format == "csv" else None
        self._client: mqtt.Client | None = None
        self._queue: asyncio.Queue[mqtt.MQTTMessage] = asyncio.Queue()
        self._connected: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._closed = asyncio.Event()
        self._misc: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ connection

    async def open(self) -> None:
        """Connect and subscribe; raises DriverError when the broker cannot be reached."""
        loop = asyncio.get_running_loop()
        self._closed.clear()
        self._queue = asyncio.Queue()
        self._connected = loop.create_future()
        self._lost = loop.create_future()
        url = urlsplit(self.cfg.url)
        if url.scheme not in ("mqtt", "mqtts"):
            raise DriverError(f"{self.name}: url must start with mqtt:// or mqtts://")
        tls = url.scheme == "mqtts"
        host, port = url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id or f"edge-agent-{self.name}",
            clean_session=False,
            protocol=mqtt.MQTTv311,
            manual_ack=True,
        )
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if tls:
            try:
                client.tls_set(
                    ca_certs=str(self.cfg.ca_file) if self.cfg.ca_file else None,
                    certfile=str(self.cfg.cert_file) if self.cfg.cert_file else None,
                    keyfile=str(self.cfg.key_file) if self.cfg.key_file else None,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (OSError, ssl.SSLError, ValueError) as exc:
                raise DriverError(f"{self.name}: TLS setup failed: {exc}") from exc
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._client = client
        try:
            # connect() blocks on DNS and the TCP/TLS handshake: keep it off the loop.
            await loop.run_in_executor(None, client.connect, host, port, int(self.cfg.keepalive))
            await asyncio.wait_for(asyncio.shield(self._connected), self.cfg.keepalive)
        except (OSError, ssl.SSLError, TimeoutError, mqtt.WebsocketConnectionError) as exc:
            await self.close()
            raise DriverError(f"{self.name}: cannot connect to {host}:{port}: {exc}") from exc
        except DriverError:
            await self.close()
            raise
        self._misc = asyncio.create_task(self._misc_loop(), name=f"mqtt-misc-{self.name}")

    async def _misc_loop(self) -> None:
        client = self._client
        while client is not None and not self._closed.is_set():
            if client.loop_misc() != mqtt.MQTT_ERR_SUCCESS:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 1.0)

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Called from connect() in the executor thread: hand the socket to the loop's thread.
        loop = self._queue_loop()
        loop.call_soon_threadsafe(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        if sock.fileno() != -1:
            asyncio.get_running_loop().add_reader(sock, self._read)

    def _read(self) -> None:
        client = self._client
        if client is not None:
            client.loop_read()

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        loop = self._queue_loop()
        with contextlib.suppress(ValueError, OSError):
            loop.remove_reader(sock)
            loop.remove_writer(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._queue_loop().call_soon_threadsafe(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        client = self._client
        if client is not None and sock.fileno() != -1:
            asyncio.get_running_loop().add_writer(sock, client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        with contextlib.suppress(ValueError, OSError):
            self._queue_loop().remove_writer(sock)

    def _queue_loop(self) -> asyncio.AbstractEventLoop:
        assert self._connected is not None
        return self._connected.get_loop()

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        fut = self._connected
        if reason.is_failure:
            if fut is not None and not fut.done():
                fut.set_exception(DriverError(f"{self.name}: broker refused: {reason}"))
            return
        client.subscribe([(t, int(self.cfg.qos)) for t in self.cfg.topics])
        if fut is not None and not fut.done():
            fut.set_result(None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        # With QoS 1 and manual ack the broker stops sending once its in-flight window of
        # unacknowledged messages is full, so this queue is bounded by the broker.
        self._queue.put_nowait(msg)

    # ------------------------------------------------------------------ iteration

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        if self._closed.is_set():
            raise StopAsyncIteration
        if self._queue.empty():
            getter = asyncio.ensure_future(self._queue.get())
            closer = asyncio.ensure_future(self._closed.wait())
            waiters: set[asyncio.Future[Any]] = {getter, closer}
            if self._lost is not None:
                waiters.add(self._lost)
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
            closer.cancel()
            if not getter.done():
                getter.cancel()
                if self._closed.is_set():
                    raise StopAsyncIteration
                raise DriverError(f"{self.name}: connection to the broker lost")
            messages = [getter.result()]
        else:
            messages = []
        while len(messages) < _MAX_BATCH and not self._queue.empty():
            messages.append(self._queue.get_nowait())
        return self._batch(messages)

    def _batch(self, messages: list[mqtt.MQTTMessage]) -> Batch:
        items: list[Reading | Rejected] = []
        now, mono = time.time(), time.monotonic()
        for msg in messages:
            items.extend(self._decode_message(msg, now, mono))
        client = self._client
        acks = [(m.mid, m.qos) for m in messages if m.qos > 0]

        def ack() -> None:
            if client is not None and client.is_connected():
                for mid, qos in acks:
                    client.ack(mid, qos)

        return Batch(items, ack if acks else None)

    def _decode_message(
        self, msg: mqtt.MQTTMessage, now: float, mono: float
    ) -> list[Reading | Rejected]:
        raw = bytes(msg.payload)
        if len(raw) > self.cfg.max_payload:
            return [
                self._reject(
                    raw[: self.cfg.max_payload],
                    "oversized",
                    f"{len(raw)} bytes on {msg.topic}",
                    now,
                    mono,
                )
            ]
        m = self._pattern.match(msg.topic)
        topic_sensor = None
        if m is not None:
            names = m.groupdict()
            topic_sensor = names.get("sensor")
            if topic_sensor is not None and names.get("device"):
                topic_sensor = f"{names['device']}.{topic_sensor}"
        if self.cfg.format == "number":
            if topic_sensor is None:
                detail = f"{msg.topic!r} does not match {self.cfg.topic_template!r}"
                return [self._reject(raw, "bad_topic", detail, now, mono)]
            result = decoder_for("json")(
                b'{"sensor":%s,"value":%s}'
                % (json.dumps(topic_sensor).encode(), raw.strip() or b'""')
            )
            if isinstance(result, Invalid) and result.reason == "invalid_json":
                result = Invalid("not_a_number", f"payload {raw[:40]!r} is not a number")
        elif self._decode is not None:
            result = self._decode(raw)
        else:
            result = decoder_for("json")(self._with_sensor(raw, topic_sensor))
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

    @staticmethod
    def _with_sensor(raw: bytes, sensor: str | None) -> bytes:
        """A JSON object without a `sensor` takes the one named by the topic."""
        if sensor is None or b'"sensor"' in raw:
            return raw
        try:
            doc = json.loads(raw)
        except ValueError:
            return raw
        if isinstance(doc, dict):
            doc["sensor"] = sensor
            return json.dumps(doc).encode()
        return raw

    def _reject(self, raw: bytes, reason: str, detail: str, now: float, mono: float) -> Rejected:
        return Rejected(raw, reason, detail, self.name, now, mono)

    # ------------------------------------------------------------------ close

    async def close(self) -> None:
        """Disconnect; safe while iteration waits, and safe to call twice."""
        self._closed.set()
        client = self._client
        if client is not None and client.is_connected():
            # Closing a TCP socket with unread input sends a RST, and the broker then discards
            # what it had not read yet, our last PUBACKs included: read everything pending
            # first (messages read now are never acked, so the broker keeps them), then let
            # the PUBACKs and the DISCONNECT go out before paho closes the socket.
            sock = client.socket()
            while sock is not None and select.select([sock], [], [], 0)[0]:
                if client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                    break
            client.disconnect()
            client.loop_write()
            if self._lost is not None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._lost), 2.0)
        self._client = None
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        if client is not None:
            with contextlib.suppress(Exception):
                client.disconnect()
            sock = client.socket()
            if sock is not None:
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock)
                loop.remove_writer(sock)
                with contextlib.suppress(OSError):
                    sock.close()
