"""The HTTP(S) upstream: posts batches of events as JSON and moves its cursors on 2xx.

Delivery is at-least-once: a batch is re-sent until the endpoint answers 2xx, and each event
carries its stable id `<log id>:<stream>:<seq>` so the receiver drops duplicates (invariant 3).
The cursor moves only after the 2xx (invariant 2). Lanes go in priority order, so waiting
alerts are sent before waiting readings.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import ssl
import time
from dataclasses import dataclass
from typing import Any

import aiohttp

from agent.backoff import Backoff
from agent.config import HttpUpstreamConfig
from agent.events import LANES, Event, Stream
from agent.log import CursorUpdate, EventLog

log = logging.getLogger(__name__)

#: A lane with events waiting is sent at least once every this many batches (but alerts first).
STARVE_AFTER = 4
#: On shutdown, how long a request in flight may still take to be answered.
STOP_GRACE = 2.0


class UpstreamError(Exception):
    """An upstream did not take a batch."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(slots=True)
class UpstreamStatus:
    """What `status` shows for an upstream."""

    sent: int = 0
    batches: int = 0
    failures: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None


class HttpUpstream:
    """One HTTP ingestion endpoint, a consumer of the log with a cursor per stream.

    `run` is the only method that sends; it is never called concurrently with itself.
    """

    def __init__(self, cfg: HttpUpstreamConfig, agent_name: str) -> None:
        self.cfg = cfg
        self.agent_name = agent_name
        self.consumer = f"upstream:{cfg.name}"
        self.streams = [s for s in LANES if s.value in cfg.streams]
        self.status = UpstreamStatus()
        self._backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)
        self._passed_over: dict[Stream, int] = {}

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Forward until `stop` is set."""
        await event_log.register(self.consumer, self.streams)
        timeout = aiohttp.ClientTimeout(total=self.cfg.timeout)
        headers = {"Content-Type": "application/json", "User-Agent": "edge-agent"}
        if self.cfg.token:
            headers["Authorization"] = f"Bearer {self.cfg.token}"
        ssl_ctx: ssl.SSLContext | bool = True
        if self.cfg.ca_file is not None:
            ssl_ctx = ssl.create_default_context(cafile=str(self.cfg.ca_file))
        connector = aiohttp.TCPConnector(ssl=ssl_ctx, limit=1)
        async with aiohttp.ClientSession(
            timeout=timeout, headers=headers, connector=connector
        ) as session:
            while not stop.is_set():
                batch = await self._next_batch(event_log, stop, retrying=self._backoff.failures > 0)
                if not batch:
                    continue
                await self._deliver(session, event_log, batch, stop)

    async def _next_batch(
        self, event_log: EventLog, stop: asyncio.Event, *, retrying: bool = False
    ) -> list[Event]:
        cursors = {s: event_log.cursor(self.consumer, s) for s in self.streams}
        stream = self._pick([s for s in self.streams if event_log.head(s) > cursors[s]])
        if stream is not None:
            behind = event_log.head(stream) - cursors[stream]
            linger = self.cfg.linger > 0 and not retrying and not stop.is_set()
            if behind < self.cfg.batch_size and linger:
                # Let a small batch fill up a little; fewer, fuller requests.
                await event_log.wait_for(
                    stream, cursors[stream] + self.cfg.batch_size - 1, within=self.cfg.linger
                )
            return await event_log.read(stream, cursors[stream], self.cfg.batch_size)
        waiter = asyncio.create_task(event_log.wait_any(self.streams, cursors, within=1.0))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        for task in (waiter, stopper):
            task.cancel()
        return []

    def _pick(self, pending: list[Stream]) -> Stream | None:
        """The lane to send next: alerts always first, then by priority, but a lane passed
        over STARVE_AFTER times gets a turn, so a steady flow of readings cannot keep
        dead-letter events (last in line) from ever leaving."""
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

    def body(self, log_id: str, batch: list[Event]) -> bytes:
        """The request body for a batch (see README, "Upstream wire format")."""
        doc: dict[str, Any] = {
            "log_id": log_id,
            "agent": self.agent_name,
            "sent_at": time.time(),
            "events": [e.to_wire(log_id) for e in batch],
        }
        return json.dumps(doc, separators=(",", ":")).encode()

    async def _deliver(
        self,
        session: aiohttp.ClientSession,
        event_log: EventLog,
        batch: list[Event],
        stop: asyncio.Event,
    ) -> None:
        """One attempt at a batch; the cursor moves only on a 2xx."""
        payload = self.body(event_log.log_id, batch)
        headers = {}
        if self.cfg.gzip:
            payload = gzip.compress(payload, compresslevel=5)
            headers["Content-Encoding"] = "gzip"
        post = asyncio.create_task(self._post(session, payload, headers))
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({post, stopper}, return_when=asyncio.FIRST_COMPLETED)
        stopper.cancel()
        if not post.done():
            # Shutting down mid-request: give the answer a moment, so a batch the endpoint
            # already stored is not sent again next time; past that, the batch stays in the
            # log and the receiver drops whatever arrives twice.
            await asyncio.wait({post}, timeout=min(self.cfg.timeout, STOP_GRACE))
            if not post.done():
                post.cancel()
                with contextlib.suppress(asyncio.CancelledError, UpstreamError):
                    await post
                return
        try:
            post.result()
        except UpstreamError as exc:
            self.status.failures += 1
            self.status.last_error = str(exc)
            self.status.last_error_time = time.time()
            delay = self._backoff.next()
            if exc.retry_after is not None:
                delay = max(delay, min(exc.retry_after, self.cfg.backoff_max))
            if self._backoff.failures <= 3 or self._backoff.failures % 20 == 0:
                log.warning("upstream %s: %s; retrying in %.1fs", self.cfg.name, exc, delay)
            # The batch stays in the log; after the pause the next batch is chosen afresh, so
            # an alert raised during an outage overtakes the backlog batch that was failing.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            return
        self._backoff.reset()
        stream = Stream(batch[0].stream)
        await event_log.append(cursors=[CursorUpdate(self.consumer, stream, batch[-1].seq)])
        self.status.sent += len(batch)
        self.status.batches += 1
        self.status.last_success = time.time()

    async def _post(
        self, session: aiohttp.ClientSession, payload: bytes, headers: dict[str, str]
    ) -> None:
        try:
            async with session.post(self.cfg.url, data=payload, headers=headers) as resp:
                if 200 <= resp.status < 300:
                    await resp.read()
                    return
                text = (await resp.text(errors="replace"))[:200]
                retry_after = _retry_after(resp.headers.get("Retry-After"))
                raise UpstreamError(f"HTTP {resp.status}: {text}", retry_after)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamError(f"{type(exc).__name__}: {exc}") from exc


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None
