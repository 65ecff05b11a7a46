"""Where simulated lines go (stdout, an MQTT broker; the pty is in `serial_port`) and the feed
that paces them.

An `Output` takes lines in chunks. The `Feed` decides what is sent when: line i is due at
signal time `i / rate`, in real time (`realtime=True`) or as fast as the output takes it; it
applies the timed faults (an outage closes the output and skips what falls due meanwhile; a
burst holds lines back and sends them at once) and stamps each line with the device clock
(skew, clock steps). With a `Recorder` every line handed to the output is recorded.

Many lines go out per write (`Feed.MAX_LINES_PER_WRITE`): one `os.write` of a joined chunk
to the pty or stdout, which is what lets one process send well over 20,000 lines a second.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import re
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

from simulator.signals import (
    GARBAGE_LINE,
    INVALID_UTF8,
    DeviceClock,
    Line,
    LineGenerator,
    Recurring,
)

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt

    from simulator.profiles import MqttOutputConfig
    from simulator.record import Recorder


class OutputError(Exception):
    """An output cannot be opened or written to."""


class Output(Protocol):
    """Where lines go. Never called concurrently: one feed owns an output, and `close` never
    overlaps `write`. `interrupt`/`resume` bracket an outage fault."""

    name: str

    async def open(self) -> None:
        """Get ready to take lines (create the port, connect to the broker)."""

    async def write(self, lines: Sequence[Line], data: bytes) -> Sequence[Line]:
        """Send `lines` (`data` is their bytes joined); return those actually handed over."""

    async def interrupt(self) -> int:
        """Go away (an outage); return how many written bytes the reader never got."""

    async def resume(self) -> None:
        """Come back after an outage."""

    async def finish(self, within: float) -> None:
        """Wait up to `within` s for the other side to take everything written."""

    async def close(self) -> None:
        """Release everything (idempotent)."""


@dataclass(slots=True)
class FeedStats:
    """What a feed has done so far."""

    lines: int = 0  # lines written, fault lines included
    bytes: int = 0
    garbled: int = 0
    nans: int = 0
    invalid_utf8: int = 0
    oversized: int = 0
    dropped: int = 0  # readings a sensor never sent (dropouts)
    skipped: int = 0  # lines that fell due while the output was away (outages)
    discarded: int = 0  # lines still in the port when it vanished
    outages: int = 0
    bursts: int = 0
    resyncs: int = 0  # times the schedule moved forward because the reader held the feed back

    def count(self, lines: Sequence[Line]) -> None:
        self.lines += len(lines)
        for line in lines:
            if line.fault is not None:
                if line.fault == "garble":
                    self.garbled += 1
                elif line.fault == "nan":
                    self.nans += 1
                elif line.fault == "invalid_utf8":
                    self.invalid_utf8 += 1
                else:
                    self.oversized += 1

    def summary(self) -> str:
        faults = (
            f"{self.garbled} garbled, {self.invalid_utf8} invalid UTF-8, "
            f"{self.oversized} over-long, {self.nans} NaN"
        )
        extra = [
            f"{n} {what}"
            for n, what in (
                (self.dropped, "dropped out"),
                (self.outages, "outages"),
                (self.skipped, "skipped in outages"),
                (self.discarded, "discarded at outages"),
                (self.bursts, "bursts"),
                (self.resyncs, "resyncs"),
            )
            if n
        ]
        return f"sent {self.lines} lines ({faults}{''.join(', ' + e for e in extra)})"


def _first(windows: Sequence[Recurring], t: float) -> tuple[float, float] | None:
    for w in windows:
        found = w.window(t)
        if found is not None:
            return found
    return None


def _next_change(windows: Sequence[Recurring], t: float) -> float:
    """The earliest start or end of a window after t (inf when none)."""
    best = math.inf
    for w in windows:
        inside = w.window(t)
        if inside is not None:
            best = min(best, inside[1])
        start = w.next_start(t if inside is None else inside[1])
        if start is not None and start > t:
            best = min(best, start)
    return best


class Feed:
    """Sends a `LineGenerator`'s lines to an output.

    Real time: line i is due `i / rate` s after the start (plus any resync shift) and is
    stamped with the wall-clock time it was due, as the device clock reads it. When the
    reader holds the feed back by more than `max_lag` s the schedule moves forward instead of
    bursting: nothing is dropped and device times stay close to the wall clock. Not real time:
    lines go out as fast as the output takes them, stamped `start_time + i / rate`.

    Stops after `count` lines written or `duration` s of signal time, or runs until cancelled;
    `stats` is live while it runs. Timed faults act on signal time; an outage also lasts its
    duration in wall time when not in real time (a reader sees a port gone for that long).
    """

    #: Lines due at the same moment are written together, up to this many per write.
    MAX_LINES_PER_WRITE = 4096

    def __init__(
        self,
        output: Output,
        lines: LineGenerator,
        *,
        count: int | None = None,
        duration: float | None = None,
        realtime: bool = True,
        start_time: float | None = None,
        clock: DeviceClock | None = None,
        outages: Sequence[Recurring] = (),
        bursts: Sequence[Recurring] = (),
        recorder: Recorder | None = None,
        max_lag: float = 1.0,
    ) -> None:
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        if duration is not None and duration < 0:
            raise ValueError("duration must be >= 0")
        self.output = output
        self.lines = lines
        self.count = count
        self.duration = duration
        self.realtime = realtime
        self.start_time = start_time
        self.clock = clock or DeviceClock()
        self.outages = tuple(outages)
        self.bursts = tuple(bursts)
        self.recorder = recorder
        self.max_lag = max_lag
        self.stats = FeedStats()
        # (seq, bytes) of the latest lines written, to know which ones an outage destroyed.
        self._recent: collections.deque[tuple[int, int]] = collections.deque(maxlen=8192)

    def _left(self) -> float:
        """Lines still to write (inf without a count)."""
        return math.inf if self.count is None else self.count - self.stats.lines

    def _end(self) -> float:
        """The signal time at which the feed stops (inf without a duration)."""
        return math.inf if self.duration is None else self.duration

    async def run(self) -> FeedStats:
        """Feed lines until done (or cancelled); return the stats."""
        gen, stats = self.lines, self.stats
        mono0 = time.monotonic()
        epoch0 = time.time() if self.start_time is None else self.start_time
        shift = 0.0
        index = 0
        clock = None if self.clock.exact else self.clock
        windows = (*self.outages, *self.bursts)
        last_burst: tuple[float, float] | None = None
        while self._left() > 0 and gen.signal_time(index) < self._end():
            t = gen.signal_time(index)
            outage = _first(self.outages, t)
            if outage is not None:
                index = await self._outage(index, outage, mono0, shift)
                continue
            burst = _first(self.bursts, t)
            due = burst[1] if burst is not None else t
            now = 0.0
            if self.realtime:
                now = time.monotonic() - mono0
                if due + shift > now:
                    await asyncio.sleep(due + shift - now)
                    now = time.monotonic() - mono0
                elif burst is None and now - (due + shift) > self.max_lag:
                    shift = now - due
                    stats.resyncs += 1
            if burst is not None and burst != last_burst:
                stats.bursts += 1
                last_burst = burst
            # Up to the next window boundary every line is due as `t` says, or all at `due`.
            stop = min(_next_change(windows, t) if windows else math.inf, self._end())
            limit = min(self._left(), self.MAX_LINES_PER_WRITE)
            chunk: list[Line] = []
            base = epoch0 + shift
            while len(chunk) < limit:
                t = gen.signal_time(index)
                if t >= stop or (self.realtime and burst is None and t + shift > now):
                    break
                ts = base + t
                if clock is not None:
                    ts += clock.error(t)
                line = gen.line(index, ts)
                index += 1
                if line is None:
                    stats.dropped += 1
                else:
                    chunk.append(line)
            if chunk:
                await self._write(chunk)
            elif not self.realtime:
                await asyncio.sleep(0)  # let signals and other tasks in between chunks
        return stats

    async def _write(self, chunk: list[Line]) -> None:
        data = b"".join(line.data for line in chunk)
        sent = await self.output.write(chunk, data)
        sent_at = time.time()
        self.stats.count(sent)
        self.stats.bytes += len(data) if sent is chunk else sum(len(ln.data) for ln in sent)
        self._recent.extend((ln.index + 1, len(ln.data)) for ln in sent)
        if self.recorder is not None:
            self.recorder.add(sent, sent_at)
        if not self.realtime:
            await asyncio.sleep(0)

    async def _outage(
        self, index: int, window: tuple[float, float], mono0: float, shift: float
    ) -> int:
        start, end = window
        if self.realtime:
            await _sleep_until(mono0 + start + shift)
        lost = await self.output.interrupt()
        self.stats.outages += 1
        if lost > 0:
            seqs = []
            for seq, size in reversed(self._recent):
                if lost <= 0:
                    break
                seqs.append(seq)
                lost -= size
            self.stats.discarded += len(seqs)
            if self.recorder is not None:
                self.recorder.discard(seqs)
        self._recent.clear()
        after = self.lines.index_at(end)
        self.stats.skipped += after - index
        if self.realtime:
            await _sleep_until(mono0 + end + shift)
        else:
            await asyncio.sleep(end - start)
        await self.output.resume()
        return after


async def _sleep_until(mono: float) -> None:
    delay = mono - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


# --------------------------------------------------------------------------- stdout


class StdoutOutput:
    """Lines on standard output (or any file descriptor), written a chunk at a time.

    The writes block: a slow reader of the pipe slows the feed down (back-pressure).
    """

    name = "stdout"

    def __init__(self, fd: int | None = None) -> None:
        self.fd = sys.stdout.fileno() if fd is None else fd

    async def open(self) -> None:
        sys.stdout.flush()

    async def write(self, lines: Sequence[Line], data: bytes) -> Sequence[Line]:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:  # a non-blocking pipe someone else set up: wait for room
                await asyncio.sleep(0.001)
                continue
            except OSError as e:  # EPIPE: the reader has gone
                raise OutputError(f"write to stdout failed: {e}") from e
            view = view[written:]
        return lines

    async def interrupt(self) -> int:
        return 0

    async def resume(self) -> None:
        pass

    async def finish(self, within: float) -> None:
        pass

    async def close(self) -> None:
        pass


# --------------------------------------------------------------------------- MQTT

_PLACEHOLDER = re.compile(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}")
TOPIC_FIELDS = ("sensor", "device", "unit")


def check_mqtt(url: str, topic: str, payload: str) -> None:
    """Raise ValueError unless the broker URL, topic template and payload kind fit together."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise ValueError("url must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT]")
    try:
        parts.port  # noqa: B018 (raises on a bad port)
    except ValueError as e:
        raise ValueError(f"url: {e}") from None
    names = _PLACEHOLDER.findall(topic)
    unknown = [n for n in names if n not in TOPIC_FIELDS]
    if unknown:
        raise ValueError(f"topic: unknown field {{{unknown[0]}}}; use {{sensor}}, {{device}}")
    if not topic or "+" in topic or "#" in topic:
        raise ValueError("topic must be a topic name, without the wildcards + and #")
    if payload == "number" and "sensor" not in names:
        raise ValueError("payload number carries no sensor name: the topic needs {sensor}")


class MqttOutput:
    """Publishes each line to an MQTT broker with paho-mqtt 2.x, driven by the event loop.

    As in the agent's MQTT input, paho's socket is watched by the event loop (no network
    thread), so paho is only ever touched from the loop's thread. A line becomes one message:
    the line without its newline (`payload: line`) or the bare value (`payload: number`) on the
    topic made from the template. At most `max_pending` messages are unacknowledged (QoS 1, 2)
    or unwritten (QoS 0) at a time; `write` waits for room (back-pressure). An outage drops the
    connection without a DISCONNECT (as a pulled cable would) and connects again after it.
    A connection the broker drops is retried with backoff; meanwhile QoS 1/2 messages wait in
    paho and go out on reconnect, QoS 0 ones are refused and not counted as sent.
    """

    name = "mqtt"

    def __init__(self, cfg: MqttOutputConfig) -> None:
        check_mqtt(cfg.url, cfg.topic, cfg.payload)
        self.cfg = cfg
        url = urlsplit(cfg.url)
        self.tls = url.scheme == "mqtts"
        self.host = url.hostname or "127.0.0.1"
        self.port = url.port or (8883 if self.tls else 1883)
        self._client: mqtt.Client | None = None
        self._topics: dict[tuple[str, str | None], str] = {}
        self._pending = 0
        self._room = asyncio.Event()
        self._connected: asyncio.Future[None] | None = None
        self._lost: asyncio.Future[None] | None = None
        self._misc: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._away = False
        self._closed = asyncio.Event()
        self.published = 0
        self.acknowledged = 0
        self.reconnects = 0

    # -- connection

    async def open(self) -> None:
        import paho.mqtt.client as mqtt
        from paho.mqtt.enums import CallbackAPIVersion

        self._loop = asyncio.get_running_loop()
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id or f"edge-sim-{os.getpid()}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        # 0: no limit in paho, whose per-ack scan of its queue is quadratic in the limit;
        # `max_pending` bounds what is in flight instead.
        client.max_inflight_messages_set(0)
        client.max_queued_messages_set(0)
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if self.tls:
            client.tls_set()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        self._client = client
        await self._connect(first=True)
        self._misc = asyncio.create_task(self._misc_loop(), name="edge-sim-mqtt-misc")

    async def _connect(self, *, first: bool = False) -> None:
        client = self._require()
        loop = asyncio.get_running_loop()
        self._connected = loop.create_future()
        self._lost = loop.create_future()
        keepalive = int(self.cfg.keepalive)
        try:
            # connect() blocks on DNS and the TCP handshake: keep it off the loop.
            if first:
                await loop.run_in_executor(None, client.connect, self.host, self.port, keepalive)
            else:
                await loop.run_in_executor(None, client.reconnect)
            await asyncio.wait_for(asyncio.shield(self._connected), max(5.0, keepalive))
        except (OSError, TimeoutError) as e:
            raise OutputError(f"cannot connect to {self.host}:{self.port}: {e}") from e

    async def _misc_loop(self) -> None:
        # Keepalive pings; a lost connection is noticed here or by `write`, which reconnects.
        client = self._require()
        while not self._closed.is_set():
            if not self._away:
                client.loop_misc()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closed.wait(), 1.0)

    def _require(self) -> mqtt.Client:
        if self._client is None:
            raise OutputError("the MQTT output is not open")
        return self._client

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # Called from connect() in the executor thread: hand the socket to the loop's thread.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._add_reader, sock)

    def _add_reader(self, sock: Any) -> None:
        if sock.fileno() != -1 and self._client is not None:
            asyncio.get_running_loop().add_reader(sock, self._client.loop_read)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(sock)
            self._loop.remove_writer(sock)

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._add_writer, sock)

    def _add_writer(self, sock: Any) -> None:
        if self._client is not None and sock.fileno() != -1:
            asyncio.get_running_loop().add_writer(sock, self._client.loop_write)

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        assert self._loop is not None
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_writer(sock)

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        fut = self._connected
        if fut is None or fut.done():
            return
        if reason.is_failure:
            fut.set_exception(OutputError(f"the broker refused the connection: {reason}"))
        else:
            fut.set_result(None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._lost is not None and not self._lost.done():
            self._lost.set_result(None)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        self._pending -= 1
        self.acknowledged += 1
        self._room.set()

    # -- lines

    def _topic(self, line: Line) -> str:
        key = (line.sensor, line.unit)
        topic = self._topics.get(key)
        if topic is None:
            topic = self.cfg.topic.format(
                sensor=line.sensor, device=self.cfg.device, unit=line.unit or ""
            )
            self._topics[key] = topic
        return topic

    def _payload(self, line: Line) -> bytes:
        if self.cfg.payload == "line":
            return line.data[:-1] if line.data.endswith(b"\n") else line.data
        if line.fault == "garble":
            return GARBAGE_LINE.rstrip(b"\n")
        number = b"nan" if line.value is None or math.isnan(line.value) else b"%r" % line.value
        if line.fault == "invalid_utf8":
            return INVALID_UTF8 + number
        if line.fault == "oversize":
            return number + b" " * max(0, len(line.data) - len(number))
        return number

    async def write(self, lines: Sequence[Line], data: bytes) -> Sequence[Line]:
        import paho.mqtt.client as mqtt

        client = self._require()
        if not client.is_connected():
            await self._reconnect()
        qos, retain = int(self.cfg.qos), self.cfg.retain
        sent: list[Line] = []
        for line in lines:
            while self._pending >= self.cfg.max_pending:
                self._room.clear()
                await self._room.wait()
            info = client.publish(self._topic(line), self._payload(line), qos, retain)
            if info.rc == mqtt.MQTT_ERR_SUCCESS or (qos > 0 and info.rc == mqtt.MQTT_ERR_NO_CONN):
                self._pending += 1
                self.published += 1
                sent.append(line)
        return sent

    async def _reconnect(self) -> None:
        from agent.backoff import Backoff

        backoff = Backoff(0.2, 5.0)
        while True:
            try:
                await self._connect()
                self.reconnects += 1
                return
            except OutputError as e:
                delay = backoff.next()
                print(f"mqtt: {e}; retrying in {delay:.1f}s", file=sys.stderr, flush=True)
                await asyncio.sleep(delay)

    async def interrupt(self) -> int:
        client = self._require()
        self._away = True
        sock = client.socket()
        # What paho holds is written first: a cable pulled between two messages, not mid-one.
        for _ in range(400):
            if not client.want_write():
                break
            client.loop_write()
            await asyncio.sleep(0.005)
        if isinstance(sock, socket.socket):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        if self._lost is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), 5.0)
        return 0

    async def resume(self) -> None:
        self._away = False
        await self._reconnect()

    async def finish(self, within: float) -> None:
        deadline = time.monotonic() + within
        while self._pending > 0 and time.monotonic() < deadline:
            self._room.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._room.wait(), 0.1)

    async def close(self) -> None:
        client, self._client = self._client, None
        self._closed.set()
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        if client is None:
            return
        with contextlib.suppress(Exception):
            client.disconnect()
            client.loop_write()
        sock = client.socket()
        if sock is not None and self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
            with contextlib.suppress(OSError):
                sock.close()
