"""The HTTP(S) upstream: posts batches of events as JSON and moves its cursors on 2xx.

Delivery is at-least-once: a batch is re-sent until the endpoint answers 2xx, and each event
carries its stable id `<log id>:<stream>:<seq>` so the receiver drops duplicates (invariant 3).
The cursor moves only after the 2xx (invariant 2).

Up to `max_inflight` requests are in flight at once, each on a keep-alive connection of its
own (opened only when the others are busy, so a trickle keeps to one). They may be answered in
any order; a stream's cursor moves past a batch only once it and every batch sent before it
were answered (`AckWindow`). Several requests in flight are what a link with a long round trip
needs (one at a time caps the rate at `batch_size` per round trip) and what lets encoding,
compression and the receiver's work overlap. The receiver may so store a batch before the one
sent just ahead of it (the backlog drains oldest first, give or take the requests in flight),
but never an alert after what was sent behind it: while alerts are in flight nothing else is
sent, so the alerts raised during an outage all arrive before the backlog does.

Answers: 2xx acknowledges the batch. 5xx, the `retry_status` codes (401, 403, 408 and 429 by
default: an expired token or a throttle is not the batch's fault), a timeout and a dropped
connection are retried after a jittered exponential pause, at least as long as `Retry-After`
asks; the other requests in flight are answered meanwhile (or given up after `timeout`), and
everything past the acknowledged prefix is sent again. Any other 4xx refuses the batch for
good: 400, 413 and 422 are bisected first, so one poisoned event is isolated instead of taking
its whole batch with it, and what is still refused alone goes to the `deadletter` stream (with
the status and the response) while the cursor moves on, so it never blocks the rest.

The requests go through `agent.httpclient` (a keep-alive connection per client, the whole
attempt bounded by `timeout`) rather than aiohttp, whose client alone would cost the agent
about 9 MiB of resident memory (issue 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import logging
import ssl
import time
from asyncio import ALL_COMPLETED, FIRST_COMPLETED
from collections import deque
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from agent import __version__
from agent.backoff import Backoff
from agent.config import HttpUpstreamConfig
from agent.events import NewEvent, Stream
from agent.httpclient import CannotConnect, HttpClient, HttpProtocolError, ServerDisconnected
from agent.log import EventLog
from agent.upstream import (
    RESPONSE_TEXT,
    STARVE_AFTER,
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
    join_fit,
    tls_context,
)

__all__ = ["STARVE_AFTER", "HttpUpstream", "UpstreamError", "UpstreamStatus"]

log = logging.getLogger(__name__)

#: Refusals that may be caused by one event of the batch: bisected before dead-lettering.
BISECT_STATUS = frozenset({400, 413, 422})
#: Room kept in `max_bytes` for the batch's envelope around its events.
ENVELOPE = 256
#: Bodies larger than this are compressed off the event loop. A steady flow sends ~1/linger
#: requests a second of a few hundred events (~50 KiB, ~0.4 ms at level 5 here): compressing
#: those inline costs less than the hand-over to a thread and back.
GZIP_INLINE = 128 * 1024


class Refused(Exception):
    """The endpoint refused a batch for good (a 4xx that is not retried)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


class HttpUpstream:
    """One HTTP ingestion endpoint, a consumer of the log with a cursor per stream.

    `run` is the only method that sends; it is never called concurrently with itself.
    """

    def __init__(
        self, cfg: HttpUpstreamConfig, agent_name: str, *, data_dir: Path | None = None
    ) -> None:
        self.cfg = cfg
        self.agent_name = agent_name
        self.consumer = f"upstream:{cfg.name}"
        self.status = UpstreamStatus()
        self.feed = Feed(cfg, self.consumer, self.status, data_dir)
        self.streams = list(self.feed.streams)
        self._backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)
        self._retry = frozenset(cfg.retry_status)
        self._encoder = WireEncoder("")
        self._window = AckWindow(cfg.max_inflight)
        self._wake = asyncio.Event()
        # Requests in flight, each on a client (connection) of its own; idle clients are
        # reused, so a trickle never opens a second connection.
        self._requests: set[asyncio.Task[_Outcome]] = set()
        self._clients: list[HttpClient] = []
        self._idle: list[HttpClient] = []
        # What each acknowledged request left to settle, by (stream, last seq) of its batch.
        self._outcomes: dict[tuple[Stream, int], _Outcome] = {}
        self._failure: BaseException | None = None
        self._alerts_inflight = 0

    @property
    def name(self) -> str:
        """The configured name."""
        return self.cfg.name

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Forward until `stop` is set."""
        self._wake = asyncio.Event()
        await self.feed.open(event_log)
        self._encoder = WireEncoder(event_log.log_id)
        try:
            while not stop.is_set():
                try:
                    await self._pump(event_log, stop)
                except UpstreamError as exc:
                    # The others in flight may still be acknowledged: their cursors move.
                    await self._quiesce(stop, self.cfg.timeout)
                    self._forget()
                    await self._failed(exc, stop)
        finally:
            for task in self._requests:
                task.cancel()
            await asyncio.gather(*self._requests, return_exceptions=True)
            self._forget()
            for client in self._clients:
                await client.close()
            self._clients.clear()
            self._idle.clear()
        await self.feed.flush()

    async def _pump(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Send what the feed gives while the window has room; settle the answers in order."""
        window = self._window
        replay_waiting = False
        while True:
            self._wake.clear()
            await self._settle()
            failure, self._failure = self._failure, None
            if failure is not None:
                raise failure
            if stop.is_set():
                await self._quiesce(stop, min(self.cfg.timeout, STOP_GRACE))
                return
            if not replay_waiting:
                replay_waiting = self.feed.replay_waiting()
            if replay_waiting:
                if window:
                    # Applied only with nothing in flight, so no old answer can move a
                    # cursor that was just rewound.
                    await self._wait(stop)
                else:
                    await self.feed.take_replay(force=True)
                    replay_waiting = False
                continue
            if window.full or self._alerts_inflight:
                await self._wait(stop)
                continue
            batch = await self.feed.next(stop, linger=self._backoff.failures == 0, wake=self._wake)
            if batch is None:
                continue
            if not batch.events:  # the route took none of them: handled, in order
                self.feed.sent(batch)
                window.add(batch.stream, batch.last_seq, done=True)
                continue
            self._send(event_log, batch)

    def _send(self, event_log: EventLog, batch: Batch) -> None:
        """Start the request for `batch` on an idle connection (or a new one)."""
        client = self._idle.pop() if self._idle else self._new_client()
        self.feed.sent(batch)
        ticket = self._window.add(
            batch.stream, batch.last_seq, first=batch.first_seq, events=len(batch.events)
        )
        if batch.stream is Stream.ALERTS:
            self._alerts_inflight += 1
        task = asyncio.create_task(self._request(client, event_log, batch))
        self._requests.add(task)
        task.add_done_callback(partial(self._answered, ticket, client, batch))
        inflight = len(self._window)
        self.status.inflight = inflight
        self.status.max_inflight = max(self.status.max_inflight, inflight)

    def _answered(
        self, ticket: int, client: HttpClient, batch: Batch, task: asyncio.Task[_Outcome]
    ) -> None:
        self._requests.discard(task)
        self._idle.append(client)
        self._wake.set()
        if batch.stream is Stream.ALERTS:
            self._alerts_inflight -= 1
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if self._failure is None:  # the first failure is the one reported
                self._failure = exc
            return
        outcome = task.result()
        if outcome.refused:
            self._outcomes[(batch.stream, batch.last_seq)] = outcome
        self._window.acked(ticket, "refused" if outcome.refused else None)
        self._backoff.reset()
        # The next request waits up to `linger` to fill unless the log has a full batch
        # (see agent/upstream.py: a request answered leaves the upstream "rested", not idle).
        self.feed.rested = time.monotonic() + self.cfg.linger
        self.status.last_success = time.time()

    async def _settle(self) -> None:
        """Move the cursors past the acknowledged prefix of what was sent, in one commit
        with the deadletter records of what in it was refused."""
        moves, events, refused = self._window.settle()
        self.status.inflight = len(self._window)
        if not moves:
            return
        records: list[NewEvent] = []
        for flight in refused:
            outcome = self._outcomes.pop((flight.stream, flight.last_seq))
            records.extend(outcome.records)
            events -= outcome.refused
        await self.feed.ack(moves.items(), {Stream.DEADLETTER: records} if records else None)
        self.status.sent += events

    async def _wait(self, stop: asyncio.Event) -> None:
        """Until an answer or stop."""
        woken = asyncio.ensure_future(self._wake.wait())
        try:
            await asyncio.wait([woken, self.feed.stopped(stop)], return_when=FIRST_COMPLETED)
        finally:
            woken.cancel()

    async def _quiesce(self, stop: asyncio.Event, within: float) -> None:
        """Give the requests in flight `within` seconds (at most STOP_GRACE once stopping)
        to be answered and settle them; past that they are cancelled, and their batches stay
        in the log (the receiver drops whatever arrives twice)."""
        deadline = time.monotonic() + within
        while self._requests:
            if stop.is_set():
                deadline = min(deadline, time.monotonic() + STOP_GRACE)
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await asyncio.wait(
                [*self._requests, self.feed.stopped(stop)],
                timeout=left,
                return_when=ALL_COMPLETED if stop.is_set() else FIRST_COMPLETED,
            )
        for task in self._requests:
            task.cancel()
        await asyncio.gather(*self._requests, return_exceptions=True)
        await self._settle()

    def _forget(self) -> None:
        """What was sent and not acknowledged is sent again."""
        self._window.clear()
        self._outcomes.clear()
        self._failure = None
        self.feed.reset()
        self.status.inflight = 0

    def _new_client(self) -> HttpClient:
        cfg = self.cfg
        headers = {"Content-Type": "application/json", "User-Agent": f"edge-agent/{__version__}"}
        if cfg.token:
            headers["Authorization"] = f"Bearer {cfg.token}"
        headers.update(cfg.headers)
        ssl_ctx: ssl.SSLContext | None = None
        if cfg.url.startswith("https://"):
            ssl_ctx = tls_context(cfg.ca_file, cfg.cert_file, cfg.key_file, f"upstream {cfg.name}")
        try:
            client = HttpClient(cfg.url, ssl_context=ssl_ctx, headers=headers, timeout=cfg.timeout)
        except ValueError as exc:  # a header value with a line break, a url it cannot use
            raise UpstreamError(f"upstream {cfg.name}: {exc}") from exc
        self._clients.append(client)
        return client

    async def _request(self, client: HttpClient, event_log: EventLog, batch: Batch) -> _Outcome:
        """Deliver a batch (and its halves, when bisected) until each part is acknowledged
        or refused for good; raises UpstreamError when an attempt fails (the whole batch is
        then sent again after the pause, its next batch chosen afresh: an alert raised
        meanwhile overtakes the backlog batch that was failing)."""
        outcome = _Outcome()
        pieces = deque([batch])
        while pieces:
            piece = pieces.popleft()
            parts = self._encoder.events(piece.events)
            events_json, n = join_fit(parts, self.cfg.max_bytes - ENVELOPE)
            if n < len(piece.events):
                rest = Batch(piece.stream, piece.events[n:], 0, piece.last_seq)
                piece = piece.cut(n)
                rest.first_seq = piece.last_seq + 1
                pieces.appendleft(rest)
            body = batch_body(event_log.log_id, self.agent_name, events_json)
            try:
                await self._post(client, await self._compressed(body))
            except Refused as refused:
                if refused.status in BISECT_STATUS and len(piece.events) > 1:
                    pieces.extendleft(reversed(piece.halves()))
                    continue
                self._deadletter(piece, refused, outcome)
                continue
            self.status.batches += 1
        return outcome

    async def _compressed(self, body: bytes) -> bytes:
        if not self.cfg.gzip:
            return body
        if len(body) > GZIP_INLINE:
            return await asyncio.to_thread(gzip.compress, body, 5)
        return gzip.compress(body, compresslevel=5)

    async def _post(self, client: HttpClient, payload: bytes) -> None:
        headers = {"Content-Encoding": "gzip"} if self.cfg.gzip else {}
        https_without_cert = self.cfg.url.startswith("https://") and self.cfg.cert_file is None
        # TLS 1.3: a server that wants a client certificate says so by cutting the connection
        # after the handshake, which reads as a plain close or reset here.
        cert_hint = " (does the server require a client certificate? set cert_file)"
        try:
            resp = await client.post(payload, headers)
        except TimeoutError as exc:
            raise UpstreamError(f"no answer within {self.cfg.timeout:g}s (timeout)") from exc
        except ServerDisconnected as exc:
            why = str(exc)
            if https_without_cert and not exc.midway:
                why += cert_hint
            raise UpstreamError(why) from exc
        except HttpProtocolError as exc:
            raise UpstreamError(f"a malformed answer: {exc}") from exc
        except CannotConnect as exc:
            raise UpstreamError(str(exc)) from exc
        except OSError as exc:  # the ssl module's errors, and the socket's
            why = describe_tls_error(exc) or f"{type(exc).__name__}: {exc}"
            refused = "CERTIFICATE_REQUIRED" in str(getattr(exc, "reason", ""))
            if https_without_cert and (refused or isinstance(exc, ConnectionResetError)):
                why += cert_hint
            raise UpstreamError(why) from exc
        if 200 <= resp.status < 300:
            return
        text = resp.text()[:RESPONSE_TEXT].strip()
        if 400 <= resp.status < 500 and resp.status not in self._retry:
            raise Refused(resp.status, text)
        retry_after = parse_retry_after(resp.headers.get("Retry-After"))
        hint = " (check the token)" if resp.status in (401, 403) else ""
        raise UpstreamError(f"HTTP {resp.status}{hint}: {text[:200]}", retry_after)

    async def _failed(self, exc: UpstreamError, stop: asyncio.Event) -> None:
        self.status.failed(str(exc))
        delay = self._backoff.next()
        if exc.retry_after is not None:
            delay = max(delay, min(exc.retry_after, self.cfg.backoff_max))
        if self._backoff.failures <= 3 or self._backoff.failures % 20 == 0:
            log.warning("upstream %s: %s; retrying in %.1fs", self.cfg.name, exc, delay)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)

    def _deadletter(self, piece: Batch, refused: Refused, outcome: _Outcome) -> None:
        """Record a part of a batch refused for good: the cursor moves past it (when the batch
        settles, in the same commit as its deadletter record)."""
        n = len(piece.events)
        self.status.deadlettered += n
        self.status.last_error = (
            f"HTTP {refused.status}: {refused.text[:200]} (batch dead-lettered)"
        )
        self.status.last_error_time = time.time()
        log.error(
            "upstream %s refused %d %s (seq %d..%d) for good: HTTP %d: %s",
            self.cfg.name,
            n,
            piece.stream.value,
            piece.events[0].seq,
            piece.last_seq,
            refused.status,
            refused.text[:200],
        )
        outcome.refused += n
        # Refused dead-letter events are not dead-lettered again, which could go on forever:
        # they stay in the log, counted and logged.
        if piece.stream != Stream.DEADLETTER:
            outcome.records.append(
                deadletter_event(
                    self.cfg.name,
                    self.consumer,
                    piece.stream,
                    (piece.events[0].seq, piece.last_seq),
                    n,
                    refused.status,
                    refused.text,
                )
            )


@dataclass(slots=True)
class _Outcome:
    """What a delivered batch leaves to settle: the events in it refused for good, and the
    deadletter records that say so."""

    refused: int = 0
    records: list[NewEvent] = field(default_factory=list)


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a `Retry-After` header: delay-seconds or an HTTP date."""
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
