"""The HTTP(S) upstream: posts batches of events as JSON and moves its cursors on 2xx.

Delivery is at-least-once: a batch is re-sent until the endpoint answers 2xx, and each event
carries its stable id `<log id>:<stream>:<seq>` so the receiver drops duplicates (invariant 3).
The cursor moves only after the 2xx (invariant 2). One request is in flight at a time.

Answers: 2xx acknowledges the batch. 5xx, the `retry_status` codes (401, 403, 408 and 429 by
default: an expired token or a throttle is not the batch's fault), a timeout and a dropped
connection are retried after a jittered exponential pause, at least as long as `Retry-After`
asks. Any other 4xx refuses the batch for good: 400, 413 and 422 are bisected first, so one
poisoned event is isolated instead of taking its whole batch with it, and what is still
refused alone goes to the `deadletter` stream (with the status and the response) while the
cursor moves on, so it never blocks the rest.

The requests go through `agent.httpclient` (one keep-alive connection, the whole attempt
bounded by `timeout`) rather than aiohttp, whose client alone would cost the agent about 9 MiB
of resident memory (issue 7).
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import gzip
import logging
import ssl
import time
from collections import deque
from pathlib import Path

from agent import __version__
from agent.backoff import Backoff
from agent.config import HttpUpstreamConfig
from agent.events import Stream
from agent.httpclient import CannotConnect, HttpClient, HttpProtocolError, ServerDisconnected
from agent.log import EventLog
from agent.upstream import (
    RESPONSE_TEXT,
    STARVE_AFTER,
    STOP_GRACE,
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

    @property
    def name(self) -> str:
        """The configured name."""
        return self.cfg.name

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Forward until `stop` is set."""
        await self.feed.open(event_log)
        self._encoder = WireEncoder(event_log.log_id)
        while not stop.is_set():
            try:
                async with self._client() as client:
                    await self._forward(client, event_log, stop)
            except UpstreamError as exc:  # the client cannot be made (TLS files, headers)
                await self._failed(exc, stop)
        await self.feed.flush()

    def _client(self) -> HttpClient:
        cfg = self.cfg
        headers = {"Content-Type": "application/json", "User-Agent": f"edge-agent/{__version__}"}
        if cfg.token:
            headers["Authorization"] = f"Bearer {cfg.token}"
        headers.update(cfg.headers)
        ssl_ctx: ssl.SSLContext | None = None
        if cfg.url.startswith("https://"):
            ssl_ctx = tls_context(cfg.ca_file, cfg.cert_file, cfg.key_file, f"upstream {cfg.name}")
        try:
            return HttpClient(cfg.url, ssl_context=ssl_ctx, headers=headers, timeout=cfg.timeout)
        except ValueError as exc:  # a header value with a line break, a url it cannot use
            raise UpstreamError(f"upstream {cfg.name}: {exc}") from exc

    async def _forward(self, client: HttpClient, event_log: EventLog, stop: asyncio.Event) -> None:
        while not stop.is_set():
            await self.feed.take_replay()
            batch = await self.feed.next(stop, linger=self._backoff.failures == 0)
            if batch is not None:
                await self._deliver(client, event_log, batch, stop)

    async def _deliver(
        self,
        client: HttpClient,
        event_log: EventLog,
        batch: Batch,
        stop: asyncio.Event,
    ) -> None:
        """Attempts at a batch (and at its halves, when bisected) until each part is
        acknowledged or refused for good, or an attempt fails: then the rest stays in the log
        and, after the pause, the next batch is chosen afresh (an alert raised meanwhile
        overtakes the backlog batch that was failing)."""
        pieces = deque([batch])
        while pieces and not stop.is_set():
            piece = pieces.popleft()
            if not piece.events:  # the route took none of them: handled
                await self.feed.ack([(piece.stream, piece.last_seq)])
                continue
            parts = self._encoder.events(piece.events)
            events_json, n = join_fit(parts, self.cfg.max_bytes - ENVELOPE)
            if n < len(piece.events):
                rest = Batch(piece.stream, piece.events[n:], 0, piece.last_seq)
                piece = piece.cut(n)
                rest.first_seq = piece.last_seq + 1
                pieces.appendleft(rest)
            body = batch_body(event_log.log_id, self.agent_name, events_json)
            try:
                await self._attempt(client, body, stop)
            except UpstreamError as exc:
                await self._failed(exc, stop)
                return
            except Refused as refused:
                if refused.status in BISECT_STATUS and len(piece.events) > 1:
                    pieces.extendleft(reversed(piece.halves()))
                    continue
                await self._deadletter(piece, refused)
                continue
            except _Abandoned:
                return
            self._backoff.reset()
            # The next request waits up to `linger` to fill unless the log has a full batch
            # (see agent/upstream.py: one request at a time is never "in flight").
            self.feed.rested = time.monotonic() + self.cfg.linger
            await self.feed.ack([(piece.stream, piece.last_seq)])
            self.status.sent += len(piece.events)
            self.status.batches += 1
            self.status.last_success = time.time()

    async def _attempt(self, client: HttpClient, body: bytes, stop: asyncio.Event) -> None:
        headers = {}
        if self.cfg.gzip:
            if len(body) > GZIP_INLINE:
                body = await asyncio.to_thread(gzip.compress, body, 5)
            else:
                body = gzip.compress(body, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        post = asyncio.create_task(self._post(client, body, headers))
        await asyncio.wait({post, self.feed.stopped(stop)}, return_when=asyncio.FIRST_COMPLETED)
        if not post.done():
            # Shutting down mid-request: give the answer a moment, so a batch the endpoint
            # already stored is not sent again next time; past that, the batch stays in the
            # log and the receiver drops whatever arrives twice.
            await asyncio.wait({post}, timeout=min(self.cfg.timeout, STOP_GRACE))
            if not post.done():
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError, Refused):
                    await post
                raise _Abandoned
        post.result()

    async def _post(self, client: HttpClient, payload: bytes, headers: dict[str, str]) -> None:
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

    async def _deadletter(self, batch: Batch, refused: Refused) -> None:
        """Record a batch refused for good and move on past it."""
        self.status.deadlettered += len(batch.events)
        self.status.last_error = (
            f"HTTP {refused.status}: {refused.text[:200]} (batch dead-lettered)"
        )
        self.status.last_error_time = time.time()
        log.error(
            "upstream %s refused %d %s (seq %d..%d) for good: HTTP %d: %s",
            self.cfg.name,
            len(batch.events),
            batch.stream.value,
            batch.events[0].seq,
            batch.last_seq,
            refused.status,
            refused.text[:200],
        )
        events = None
        # Refused dead-letter events are not dead-lettered again, which could go on forever:
        # they stay in the log, counted and logged.
        if batch.stream != Stream.DEADLETTER:
            record = deadletter_event(
                self.cfg.name,
                self.consumer,
                batch.stream,
                (batch.events[0].seq, batch.last_seq),
                len(batch.events),
                refused.status,
                refused.text,
            )
            events = {Stream.DEADLETTER: [record]}
        await self.feed.ack([(batch.stream, batch.last_seq)], events)


class _Abandoned(Exception):
    """The agent stopped while a request was unanswered: the batch stays in the log."""


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
