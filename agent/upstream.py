"""What every upstream shares: the protocol, routing, lanes, batches, acks and replay requests.

An upstream is a consumer of the log with one cursor per stream it forwards. Its `Feed` reads
its share of the log: lanes in priority order (alerts first, then the agent's own events, then
aggregates, then readings; none starved), routed (streams, sensor globs, alert severities) and
batched (count, bytes, linger). The cursor of a stream moves only once the upstream acknowledged
everything up to it (invariant 2); an event the route leaves out is handled as it is read, and
moves the cursor with the batch it came in.

Batching works as Nagle's algorithm does for TCP: an idle upstream (nothing sent and not yet
acknowledged) sends what is committed at once, however little; while messages are in flight,
the next batch gathers until it is full (`batch_size`), an acknowledgement leaves the upstream
idle, or it has waited `linger`. A trickle of readings so goes out as it is committed, and a
flood fills big batches behind the ones in flight. Alerts never wait. The HTTP upstream, whose
requests are answered fast but cost both ends far more than a message, also counts as busy for
`linger` after each answered request (`Feed.rested`), so a steady flow becomes a few large
requests a second rather than one per log commit.

Cursor moves are submitted to the log without waiting for their commit, so the next batch goes
out while the last one's cursor is being written; the feed keeps its own read positions, ahead
of the committed cursors. What was sent and not acknowledged when the agent stops is sent again
next time, and the receiver drops it by id (invariant 3).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import re
import ssl
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from math import isfinite
from operator import attrgetter
from pathlib import Path
from typing import Any, Protocol

import orjson

from agent.clock import CORRECTIONS
from agent.config import UpstreamBaseConfig, UpstreamConfig
from agent.events import LANES, Event, NewEvent, Stream
from agent.log import CursorUpdate, EventLog

log = logging.getLogger(__name__)

#: A lane with events waiting is sent at least once every this many batches (alerts first).
STARVE_AFTER = 4
#: On shutdown, how long acknowledgements of what is in flight may still take.
STOP_GRACE = 2.0
#: How often a running upstream looks for a replay request (`edge-agent replay`).
REPLAY_POLL = 0.5
#: The most of a refused response kept in status and in the deadletter event.
RESPONSE_TEXT = 500


class UpstreamError(Exception):
    """An upstream did not take a batch (or could not be reached): retried after a pause."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class UpstreamStatus:
    """What `status` shows for an upstream.

    `sent`: events acknowledged; `filtered`: events its route leaves out (handled, not sent);
    `deadlettered`: events refused for good and recorded in `deadletter`; `inflight`: messages
    sent and not acknowledged yet; `connected` is None for upstreams without a connection.
    """

    sent: int = 0
    batches: int = 0
    failures: int = 0
    filtered: int = 0
    deadlettered: int = 0
    inflight: int = 0
    max_inflight: int = 0
    connected: bool | None = None
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None
    replays: int = 0

    def failed(self, error: str) -> None:
        """Count a failed attempt and keep its error for `status`."""
        self.failures += 1
        self.last_error = error
        self.last_error_time = time.time()


class Upstream(Protocol):
    """A forwarder: a consumer of the log that delivers events somewhere and then moves its
    cursors. `run` is called once per agent run and never concurrently with itself."""

    @property
    def name(self) -> str:
        """The configured name."""
        ...

    @property
    def cfg(self) -> UpstreamBaseConfig:
        """The validated config it was built from."""
        ...

    @property
    def consumer(self) -> str:
        """The cursors' consumer name in the log: `upstream:<name>`."""
        ...

    @property
    def status(self) -> UpstreamStatus:
        """Live figures for `status`."""
        ...

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Forward until `stop` is set; what is not acknowledged by then stays in the log."""
        ...


def build_upstream(cfg: UpstreamConfig, agent_name: str, data_dir: Path | None = None) -> Upstream:
    """The runtime object for an upstream's config (`data_dir`: where replay requests land)."""
    if cfg.type == "http":
        from agent.upstream_http import HttpUpstream

        return HttpUpstream(cfg, agent_name, data_dir=data_dir)
    from agent.upstream_mqtt import MqttUpstream

    return MqttUpstream(cfg, agent_name, data_dir=data_dir)


# --------------------------------------------------------------------------- routing


class Route:
    """Which events of its streams an upstream takes, in the style of an event bus rule."""

    def __init__(self, cfg: UpstreamBaseConfig) -> None:
        self.streams: tuple[Stream, ...] = tuple(s for s in LANES if s.value in cfg.streams)
        globs = cfg.sensor_globs
        self._all_sensors = "*" in globs
        self._sensors = re.compile("|".join(f"(?:{fnmatch.translate(g)})" for g in globs))
        self._severities = frozenset(cfg.severities)
        self._all_severities = self._severities >= {"info", "warning", "critical"}

    @property
    def selective(self) -> bool:
        """Whether any event of its streams can be left out."""
        return not (self._all_sensors and self._all_severities)

    def wants(self, event: Event) -> bool:
        """Whether this upstream takes `event`. Events without a sensor (gaps, the agent's
        own events, bad input) always pass the sensor globs; severities apply to alerts."""
        if (
            event.sensor is not None
            and not self._all_sensors
            and self._sensors.match(event.sensor) is None
        ):
            return False
        if event.stream == Stream.ALERTS and not self._all_severities:
            severity = (event.data or {}).get("severity")
            return severity in self._severities
        return True


class Lanes:
    """Picks the stream to send next: alerts always first, then by priority, but a lane passed
    over STARVE_AFTER times gets a turn, so a steady flow of readings cannot keep dead-letter
    events (last in line) from ever leaving."""

    def __init__(self) -> None:
        self._passed_over: dict[Stream, int] = {}

    def pick(self, pending: Sequence[Stream]) -> Stream | None:
        """The lane to send from, among those with events waiting (in priority order)."""
        if not pending:
            return None
        if Stream.ALERTS in pending:
            choice = Stream.ALERTS
        else:
            starved = [s for s in pending if self._passed_over.get(s, 0) >= STARVE_AFTER]
            choice = starved[0] if starved else pending[0]
        for s in pending:
            self._passed_over[s] = 0 if s == choice else self._passed_over.get(s, 0) + 1
        return choice


# --------------------------------------------------------------------------- batches


@dataclass(slots=True)
class Batch:
    """Events of one stream to deliver together, and the seq range they account for.

    `events` are the ones the route takes; the range `first_seq..last_seq` also covers those it
    left out, so acknowledging the batch moves the cursor to `last_seq`.
    """

    stream: Stream
    events: list[Event]
    first_seq: int
    last_seq: int
    read: int = 0  # events read from the log for it, taken or not

    def cut(self, n: int) -> Batch:
        """The first `n` events (at least one) as a batch of their own, ending at the n-th."""
        n = max(1, n)
        if n >= len(self.events):
            return self
        return Batch(self.stream, self.events[:n], self.first_seq, self.events[n - 1].seq)

    def halves(self) -> tuple[Batch, Batch]:
        """Two batches covering this one's range (for bisecting a refused batch)."""
        mid = len(self.events) // 2
        first = Batch(self.stream, self.events[:mid], self.first_seq, self.events[mid - 1].seq)
        second = Batch(self.stream, self.events[mid:], first.last_seq + 1, self.last_seq)
        return first, second


def fit(docs: list[Any], max_bytes: int) -> tuple[str, int]:
    """The JSON array of the first of `docs` that fit in `max_bytes` (at least one), and how
    many those are. One `json.dumps` when all fit, which is the common case."""
    text = json.dumps(docs, separators=(",", ":"))
    if len(text) <= max_bytes or len(docs) <= 1:
        return text, len(docs)
    # ensure_ascii (the default) makes characters and bytes the same count.
    total, n = 2, 0
    for doc in docs:
        size = len(json.dumps(doc, separators=(",", ":"))) + (1 if n else 0)
        if n and total + size > max_bytes:
            break
        total += size
        n += 1
    return json.dumps(docs[:n], separators=(",", ":")), n


def join_fit(parts: list[str], max_bytes: int) -> tuple[str, int]:
    """The JSON array of the first of the encoded `parts` that fit in `max_bytes` (at least
    one), and how many those are."""
    total = 1 + sum(map(len, parts)) + len(parts)
    n = len(parts)
    if total > max_bytes and n > 1:
        total, n = 1, 0
        for part in parts:
            if n and total + len(part) + 1 > max_bytes:
                break
            total += len(part) + 1
            n += 1
    return "[" + ",".join(parts[:n]) + "]", n


class WireEncoder:
    """Events as the JSON text of their wire form (README, "Upstream wire format").

    ASCII only (non-ASCII is escaped), so a text's length is its size in bytes. Readings, the
    bulk, take a fast path that writes the same text `json.dumps(event.to_wire(log_id))` would,
    without building the dict: everything but the seq and the three floats is the same for every
    reading of a sensor, so it is encoded once into literal parts (a bounded cache); the times
    are formatted once for a run of readings that share them (an input batch shares its receive
    time, a message of many readings its device time), and joined with those parts once per
    sensor in the run; what is left per reading is one f-string of its seq and value (a
    %-template, which is parsed again at every use, cost twice as much), both formatted for the
    whole batch at once (`_number_texts`).
    """

    CACHED = 10_000

    def __init__(self, log_id: str) -> None:
        self.log_id = log_id
        self._templates: dict[tuple[str, str, str, str | None], tuple[str, ...]] = {}

    def _template(self, key: tuple[str, str, str, str | None]) -> tuple[str, ...]:
        """The literal parts around seq, seq, time, recv_time and value."""
        stream, kind, sensor, unit = key
        parts = (
            f'{{"id":"{self.log_id}:{stream}:',
            f'","stream":{json.dumps(stream)},"seq":',
            f',"kind":{json.dumps(kind)},"time":',
            ',"recv_time":',
            f',"sensor":{json.dumps(sensor)},"value":',
            "}" if unit is None else f',"unit":{json.dumps(unit)}}}',
        )
        if len(self._templates) < self.CACHED:
            self._templates[key] = parts
        return parts

    def event(self, e: Event) -> str:
        """One event's wire JSON."""
        return self.events((e,))[0]

    def events(self, events: Sequence[Event]) -> list[str]:
        """Each event's wire JSON."""
        n = len(events)
        numbers = _number_texts(events)  # seqs, then values
        out: list[str] = []
        append = out.append
        templates = self._templates
        last_recv = last_time = 0.0
        recv_text = time_text = "0.0"
        # Per sensor key, for the current times: (head, seq separator, middle, tail).
        run: dict[tuple[str, str, str, str | None], tuple[str, str, str, str]] = {}
        for e, seq_text, value_text in zip(events, numbers[:n], numbers[n:], strict=True):
            value, sensor, when, recv = e.value, e.sensor, e.time, e.recv_time
            if (
                sensor is None
                or value is None
                or e.data is not None
                or e.raw is not None
                # One call for three: a sum is finite only if all are (or, rarely, overflows
                # to inf, which only sends a finite event the slow way).
                or not isfinite(value + when + recv)
            ):
                append(json.dumps(e.to_wire(self.log_id), separators=(",", ":")))
                continue
            if recv != last_recv or not recv:  # 0.0 == -0.0, but they print differently
                last_recv, recv_text = recv, repr(recv)
                run = {}
            if when != last_time or not when:
                last_time, time_text = when, repr(when)
                run = {}
            key = (e.stream, e.kind, sensor, e.unit)
            parts = run.get(key)
            if parts is None:
                p = templates.get(key) or self._template(key)
                parts = run[key] = (p[0], p[1], f"{p[2]}{time_text}{p[3]}{recv_text}{p[4]}", p[5])
            head, sep, middle, tail = parts
            append(f"{head}{seq_text}{sep}{seq_text}{middle}{value_text}{tail}")
        return out


_SEQ = attrgetter("seq")
_VALUE = attrgetter("value")


def _number_texts(events: Sequence[Event]) -> list[str]:
    """Each event's seq, then each event's value, as `json.dumps` writes them.

    orjson formats them all in one call: `repr` of a float, which json uses, cost 5-8 times as
    much and was a third of encoding. orjson writes the same digits, but a number below 1e-4
    differently (1e-05 as 0.00001, 1e-07 as 1e-7): those, rare in readings, take `repr`. A
    value orjson does not take (None is null; NaN and infinities, null too, go the slow way
    anyway) makes the whole batch take `repr`.
    """
    if not events:
        return []
    try:
        data = orjson.dumps([*map(_SEQ, events), *map(_VALUE, events)])
    except orjson.JSONEncodeError:
        return [*map(str, map(_SEQ, events)), *map(repr, map(_VALUE, events))]
    texts = data[1:-1].decode().split(",")
    if b"e-" in data or b"0.0000" in data:  # a quick test on the whole: may be a false alarm
        n = len(events)
        for i, e in enumerate(events):
            value = e.value
            if type(value) is float and 0.0 < abs(value) < 1e-4:
                texts[n + i] = repr(value)
    return texts


def batch_body(log_id: str, agent: str, events_json: str) -> bytes:
    """The agent's JSON batch (README, "Upstream wire format") around an encoded event array."""
    head = f'{{"log_id":{json.dumps(log_id)},"agent":{json.dumps(agent)},"sent_at":{time.time()}'
    return f'{head},"events":{events_json}}}'.encode()


# --------------------------------------------------------------------------- the feed


class Feed:
    """An upstream's share of the log: what to send next, and its cursors.

    `positions` are where reading continues (after what was sent); `acked` where the cursors
    are (after what was acknowledged). They differ while batches are in flight; `reset` takes
    the positions back after a failure, so the unacknowledged events are sent again.
    Used by one task only.
    """

    def __init__(
        self,
        cfg: UpstreamBaseConfig,
        consumer: str,
        status: UpstreamStatus,
        data_dir: Path | None = None,
    ) -> None:
        self.cfg = cfg
        self.consumer = consumer
        self.status = status
        self.route = Route(cfg)
        self.streams = self.route.streams
        self.lanes = Lanes()
        self.positions: dict[Stream, int] = {}
        self.acked: dict[Stream, int] = {}
        self.log: EventLog | None = None
        self._replay_file = replay_request_path(data_dir, cfg.name) if data_dir else None
        self._replay_checked = 0.0
        self._last_commit: asyncio.Future[Any] | None = None
        self._ahead: tuple[Stream, int, asyncio.Future[list[Event]]] | None = None
        self._stopping: tuple[asyncio.Event, asyncio.Future[Any]] | None = None
        # While a batch gathers behind messages in flight: when it goes regardless (linger).
        self._gather_until: float | None = None
        #: Monotonic time until which the upstream counts as busy though nothing is in flight
        #: (set by the HTTP upstream after each answered request).
        self.rested = 0.0

    async def open(self, event_log: EventLog) -> None:
        """Register the cursors and start from them (applying a replay asked for meanwhile)."""
        self.log = event_log
        await event_log.register(self.consumer, self.streams)
        for s in self.streams:
            self.positions[s] = self.acked[s] = event_log.cursor(self.consumer, s)
        await self.take_replay(force=True)

    def _log(self) -> EventLog:
        assert self.log is not None, "open the feed first"
        return self.log

    def stopped(self, stop: asyncio.Event) -> asyncio.Future[Any]:
        """A future that ends when `stop` is set, shared by every wait of this feed: never
        cancel it. A task of its own for each wait (a few per batch, many batches a second)
        cost more than the waiting."""
        held = self._stopping
        if held is None or held[0] is not stop or (held[1].done() and not stop.is_set()):
            held = self._stopping = (stop, asyncio.ensure_future(stop.wait()))
        return held[1]

    def pending(self) -> list[Stream]:
        """Lanes with committed events past their position, in priority order."""
        event_log = self._log()
        return [s for s in self.streams if event_log.head(s) > self.positions[s]]

    async def next(
        self,
        stop: asyncio.Event,
        *,
        linger: bool = True,
        wake: asyncio.Event | None = None,
        within: float = 1.0,
    ) -> Batch | None:
        """The next batch, from the lane whose turn it is; None when there is nothing to send
        within `within` seconds, or `stop` or `wake` is set meanwhile.

        With `linger`, a batch that is not full waits while the upstream has messages in
        flight (`status.inflight`), at most `cfg.linger` in all (see the module docstring).
        The caller sets `wake` when an acknowledgement arrives: the wait then ends with None,
        so the caller can settle it and ask again (the linger deadline is kept meanwhile).
        """
        event_log = self._log()
        pending = self.pending()
        if not pending:
            self._gather_until = None
            waiters: list[asyncio.Future[Any]] = []
            if wake is not None:
                waiters.append(asyncio.ensure_future(wake.wait()))
            if not (stop.is_set() or (wake is not None and wake.is_set())):
                waiters.append(
                    asyncio.ensure_future(event_log.wait_any(self.streams, self.positions, within))
                )
                await asyncio.wait(
                    [self.stopped(stop), *waiters], return_when=asyncio.FIRST_COMPLETED
                )
            for w in waiters:
                w.cancel()
            return None
        if linger and self._gathering(pending, stop):
            if not await self._gather(stop, wake, within):
                return None
            pending = self.pending()
        self._gather_until = None
        stream = self.lanes.pick(pending)
        assert stream is not None
        after = self.positions[stream]
        size = self.cfg.batch_size
        events = await self._read_ahead(stream, after)
        if (
            events is not None
            and len(events) < size
            and event_log.head(stream) > after + len(events)
        ):
            # Read ahead when little more was committed: more is now. Sending it as it was
            # made a small request before each full one, and spent the linger on it.
            events = None
        if events is None:
            events = await event_log.read(stream, after, size)
        if not events:
            gone = min(event_log.head(stream), event_log.tail(stream) - 1)
            if gone > after:
                # The disk quota dropped all of them (a gap event says so): handled.
                return Batch(stream, [], after + 1, gone)
            return None
        if event_log.head(stream) > events[-1].seq:
            # A backlog: read the next batch while this one is on its way (the database
            # works in its own thread).
            read = asyncio.ensure_future(event_log.read(stream, events[-1].seq, size))
            read.add_done_callback(_quiet)
            self._ahead = (stream, events[-1].seq, read)
        taken = [e for e in events if self.route.wants(e)] if self.route.selective else events
        self.status.filtered += len(events) - len(taken)
        # Events received before an NTP step in this run go out re-dated (every format).
        taken = [CORRECTIONS.apply(e) for e in taken] if CORRECTIONS.active else taken
        return Batch(stream, taken, after + 1, events[-1].seq, read=len(events))

    def _gathering(self, pending: Sequence[Stream], stop: asyncio.Event) -> bool:
        """Whether the next batch should wait to fill: messages are in flight, no lane has a
        full batch waiting, no alert waits, and the linger deadline (if one runs) is ahead."""
        busy = self.status.inflight > 0 or time.monotonic() < self.rested
        if self.cfg.linger <= 0 or not busy or stop.is_set():
            return False
        if Stream.ALERTS in pending:
            return False
        event_log, size = self._log(), self.cfg.batch_size
        if any(event_log.head(s) - self.positions[s] >= size for s in pending):
            return False
        until = self._gather_until
        return until is None or time.monotonic() < until

    async def _gather(self, stop: asyncio.Event, wake: asyncio.Event | None, within: float) -> bool:
        """Wait for the batch to fill: True when it should go now (full, an alert, the linger
        deadline), False when woken first (or after `within`), to be asked again."""
        now = time.monotonic()
        if self._gather_until is None:
            self._gather_until = now + self.cfg.linger
            if self.status.inflight <= 0:  # busy only until rested
                self._gather_until = min(self._gather_until, self.rested)
        left = self._gather_until - now
        if wake is not None and wake.is_set():
            return False
        event_log, size = self._log(), self.cfg.batch_size
        # A full batch in any lane, or an alert: the alert lane is woken by any new event.
        full = {
            s: self.positions[s] + (0 if s == Stream.ALERTS else size - 1) for s in self.streams
        }
        waiters: list[asyncio.Future[Any]] = [
            asyncio.ensure_future(event_log.wait_any(self.streams, full)),
        ]
        if wake is not None:
            waiters.append(asyncio.ensure_future(wake.wait()))
        try:
            await asyncio.wait(
                [self.stopped(stop), *waiters],
                timeout=min(left, within),
                return_when=asyncio.FIRST_COMPLETED,
            )
            filled = waiters[0].done()
        finally:
            for w in waiters:
                w.cancel()
        return filled or stop.is_set() or time.monotonic() >= self._gather_until

    async def _read_ahead(self, stream: Stream, after: int) -> list[Event] | None:
        """The batch read ahead, if it is the one wanted now (else it is dropped)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        if ahead[:2] != (stream, after):
            ahead[2].cancel()
            return None
        try:
            return await ahead[2]
        except asyncio.CancelledError:
            raise
        except Exception:  # read again in the open, where an error means something
            return None

    def sent(self, batch: Batch) -> None:
        """`batch` is on its way: reading continues after it."""
        self.positions[batch.stream] = max(self.positions[batch.stream], batch.last_seq)

    def reset(self) -> None:
        """Go back to the acknowledged positions: what was in flight is sent again."""
        self.positions.update(self.acked)

    async def ack(
        self,
        moves: Iterable[tuple[Stream, int]],
        events: dict[Stream, list[NewEvent]] | None = None,
    ) -> None:
        """Move cursors (and append `events`, such as deadletter records, in the same commit).

        Submitted, not awaited: the commit joins the log's next group commit while the next
        batch is on its way. Cursors only ever move forward here.
        """
        updates = []
        for stream, seq in moves:
            if seq > self.acked[stream]:
                self.acked[stream] = seq
                self.positions[stream] = max(self.positions[stream], seq)
                updates.append(CursorUpdate(self.consumer, stream, seq))
        if updates or events:
            self._last_commit = await self._log().submit(events=events, cursors=updates)

    async def flush(self, within: float = STOP_GRACE) -> None:
        """Stopping: drop what was read ahead, and wait (a bounded time) until the cursor
        moves submitted so far are committed."""
        if self._ahead is not None:
            self._ahead[2].cancel()
            self._ahead = None
        if self._stopping is not None:
            self._stopping[1].cancel()
            self._stopping = None
        future = self._last_commit
        if future is not None and not future.done():
            with contextlib.suppress(TimeoutError, Exception):
                await asyncio.wait_for(asyncio.shield(future), within)

    def replay_waiting(self) -> bool:
        """Whether a replay request waits (looked for at most every REPLAY_POLL seconds)."""
        path = self._replay_file
        now = time.monotonic()
        if path is None or now - self._replay_checked < REPLAY_POLL:
            return False
        self._replay_checked = now
        return path.exists()

    async def take_replay(self, *, force: bool = False) -> dict[Stream, int]:
        """Apply a pending `edge-agent replay` request for this upstream, if there is one.

        Checked at most every REPLAY_POLL seconds unless `force`. Returns the streams rewound,
        with their new cursors; the caller forgets what it had in flight.
        """
        path = self._replay_file
        now = time.monotonic()
        if path is None or (not force and now - self._replay_checked < REPLAY_POLL):
            return {}
        self._replay_checked = now
        request = read_replay_request(path)
        if request is None:
            return {}
        event_log = self._log()
        done: dict[Stream, int] = {}
        for name, seq in request.items():
            stream = Stream(name)
            if stream in self.streams:
                done[stream] = await event_log.rewind(self.consumer, stream, seq=seq)
                self.positions[stream] = self.acked[stream] = done[stream]
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        if done:
            self.status.replays += 1
            log.info(
                "upstream %s: replaying from %s",
                self.cfg.name,
                ", ".join(f"{s.value} seq {seq + 1}" for s, seq in done.items()),
            )
        return done


def _quiet(future: asyncio.Future[Any]) -> None:
    """Retrieve a read-ahead's error (read again in the open), so none goes unretrieved."""
    if not future.cancelled():
        future.exception()


# --------------------------------------------------------------------------- deadletter


def deadletter_event(
    upstream: str,
    consumer: str,
    stream: Stream,
    seqs: tuple[int, int],
    count: int,
    status: int | str,
    response: str,
) -> NewEvent:
    """The `deadletter` record of events (`count` of them, in the seq range `seqs` of
    `stream`) an upstream refused for good, with its answer."""
    now = time.time()
    return NewEvent(
        kind="deadletter",
        time=now,
        recv_time=now,
        mono=time.monotonic(),
        data={
            "reason": "upstream_rejected",
            "detail": f"{status}: {response}"[:RESPONSE_TEXT],
            "source": consumer,
            "upstream": upstream,
            "status": status,
            "response": response[:RESPONSE_TEXT],
            "stream": stream.value,
            "first_seq": seqs[0],
            "last_seq": seqs[1],
            "count": count,
        },
    )


# --------------------------------------------------------------------------- TLS


def tls_context(
    ca_file: Path | None, cert_file: Path | None, key_file: Path | None, what: str
) -> ssl.SSLContext:
    """A client context with verification always on, TLS 1.2 at least, and the client
    certificate when given; `UpstreamError` naming the file that cannot be used."""
    try:
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    except (OSError, ssl.SSLError) as exc:
        raise UpstreamError(f"{what}: ca_file {ca_file}: {_file_error(exc)}") from exc
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cert_file is not None:
        try:
            context.load_cert_chain(str(cert_file), str(key_file) if key_file else None)
        except (OSError, ssl.SSLError) as exc:
            raise UpstreamError(
                f"{what}: cert_file {cert_file} / key_file {key_file}: {_file_error(exc)}"
            ) from exc
    return context


def describe_tls_error(exc: BaseException) -> str | None:
    """What a refused TLS handshake means, in words that say what to check; None if `exc`
    is not a TLS error."""
    cause: BaseException | None = exc
    # The ssl module's error, as raised (the HTTP client, paho) or wrapped by aiohttp (the
    # webhook action: `certificate_error`, or as the cause).
    for _ in range(8):
        if cause is None or hasattr(cause, "verify_code"):
            break
        if isinstance(cause, ssl.SSLError) and not hasattr(cause, "certificate_error"):
            break
        cause = getattr(cause, "certificate_error", None) or cause.__cause__
    if isinstance(cause, ssl.SSLCertVerificationError):
        detail = (cause.verify_message or str(cause)).rstrip(".")
        if cause.verify_code in (62, 64):  # X509_V_ERR_HOSTNAME_MISMATCH, _IP_ADDRESS_MISMATCH
            hint = "the server's certificate does not name the host of the url"
        elif cause.verify_code == 10:  # X509_V_ERR_CERT_HAS_EXPIRED
            hint = "the server's certificate is out of date (or this device's clock is wrong)"
        else:
            hint = "is ca_file the CA that signed the server's certificate?"
        return f"TLS: server certificate refused: {detail} ({hint})"
    if isinstance(cause, ssl.SSLError):
        return f"TLS handshake failed: {cause.reason or cause}"
    return None


def _file_error(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    if isinstance(exc, ssl.SSLError):
        return f"not a usable PEM file ({exc.reason or exc})"
    return str(exc)


# --------------------------------------------------------------------------- replay requests


def replay_request_path(data_dir: Path, upstream: str) -> Path:
    """Where `edge-agent replay` leaves a request for a running agent's upstream."""
    return Path(data_dir) / "replay" / f"{upstream}.json"


def write_replay_request(data_dir: Path, upstream: str, cursors: dict[Stream, int]) -> Path:
    """Ask a running agent's upstream to rewind its cursors (atomically replaced)."""
    path = replay_request_path(data_dir, upstream)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"cursors": {s.value: seq for s, seq in cursors.items()}}))
    os.replace(tmp, path)
    return path


def read_replay_request(path: Path) -> dict[str, int] | None:
    """The cursors a replay request asks for, by stream name; None when there is none."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("ignoring an unreadable replay request %s: %s", path, exc)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    cursors = doc.get("cursors") if isinstance(doc, dict) else None
    if not isinstance(cursors, dict):
        return None
    known = {s.value for s in Stream}
    return {
        k: int(v)
        for k, v in cursors.items()
        if k in known and isinstance(v, int) and not isinstance(v, bool) and v >= 0
    }


# --------------------------------------------------------------------------- acks in flight


@dataclass(slots=True)
class Flight:
    """A message in flight: the seq range of `stream` it accounts for."""

    stream: Stream
    first: int
    last_seq: int
    sent: float
    events: int = 0
    done: bool = False
    refused: str | None = None  # why the receiver refused it (MQTT 5 PUBACK reason)


@dataclass(slots=True)
class AckWindow:
    """Messages sent and not yet acknowledged, in the order they were sent.

    A cursor may only pass an event once it and everything sent before it were acknowledged,
    but acknowledgements can complete in any order: `acked` marks one, and `settle` pops the
    acknowledged prefix and returns how far each stream's cursor can move. The window counts
    from the oldest unacknowledged message, so no more than `size` messages (and therefore
    no more than `size` MQTT packet ids, which wrap at 65,535) are ever outstanding.
    """

    size: int
    _flights: dict[int, Flight] = field(default_factory=dict)
    _next: int = 0
    _oldest: int = 0
    _settled: int = 0

    def __len__(self) -> int:
        return self._next - self._oldest

    @property
    def settled_messages(self) -> int:
        """Messages carrying events acknowledged so far (popped by `settle`)."""
        return self._settled

    @property
    def full(self) -> bool:
        """Whether sending another message would exceed the window."""
        return self._next - self._oldest >= self.size

    def add(
        self,
        stream: Stream,
        last_seq: int,
        *,
        first: int = 0,
        events: int = 0,
        done: bool = False,
    ) -> int:
        """Record a message sent (or, `done`, a range handled without one); its ticket."""
        ticket = self._next
        self._flights[ticket] = Flight(stream, first, last_seq, time.monotonic(), events, done)
        self._next += 1
        return ticket

    def acked(self, ticket: int, refused: str | None = None) -> bool:
        """Mark a message acknowledged (or `refused`, for good); False for a ticket this
        window does not hold (any more)."""
        flight = self._flights.get(ticket)
        if flight is None or flight.done:
            return False
        flight.done = True
        flight.refused = refused
        return True

    def settle(self) -> tuple[dict[Stream, int], int, list[Flight]]:
        """Pop the acknowledged prefix: the cursor each stream may move to, the number of
        events those messages carried, and those of them that were refused."""
        moves: dict[Stream, int] = {}
        events = 0
        refused = []
        while self._oldest < self._next:
            flight = self._flights[self._oldest]
            if not flight.done:
                break
            moves[flight.stream] = max(moves.get(flight.stream, 0), flight.last_seq)
            events += flight.events
            if flight.refused is not None:
                refused.append(flight)
            if flight.events:
                self._settled += 1
            del self._flights[self._oldest]
            self._oldest += 1
        return moves, events, refused

    def oldest_age(self, now: float | None = None) -> float:
        """Seconds the oldest unacknowledged message has waited (0 when none)."""
        for flight in self._flights.values():
            if not flight.done:
                return (time.monotonic() if now is None else now) - flight.sent
        return 0.0

    def clear(self) -> None:
        """Forget everything in flight (the connection that carried it is gone)."""
        self._flights.clear()
        self._oldest = self._next
