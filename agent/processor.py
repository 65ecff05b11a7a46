"""The processor: a consumer of `readings` that appends aggregates, alerts and late readings.

Its cursor and its window/rule state are committed in the same transaction as the events it
appended (invariant 2). It commits whenever it has something to append, and otherwise at least
every `checkpoint_interval`, so a steady flow of readings that closes no window does not write
its whole state to the SD card with every batch. After a crash it resumes from the last commit
and processes the readings after it again: processing is deterministic, and whatever it had
produced since was not committed, so nothing is lost or repeated.

When the committed state cannot be used, the state is rebuilt by replaying the log instead:
- no snapshot at all, or one of another format (an upgrade): each window replays the readings
  that can still be in one of its open windows (`size + lateness + grace`, plus a margin, found
  by receive time) without emitting anything, and then skips the windows whose aggregates are
  already in the `aggregates` stream; raised alerts and alert counters are rebuilt from the
  `alerts` stream;
- a window whose definition changed (restart with another config, or `reload`), or a new one:
  it replays the same way, so its first aggregate already covers the readings before the
  change; a changed or removed rule clears the alerts it had raised (`reason: rule_changed` /
  `rule_removed`), so every `alert.raised` has its `alert.cleared`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any

from agent.config import ProcessingConfig
from agent.events import NewEvent, Stream
from agent.log import CursorUpdate, EventLog
from agent.processing import Output, Pipeline

log = logging.getLogger(__name__)

CONSUMER = "processor"
#: Extra receive time replayed before the oldest reading an open window can hold.
REPLAY_MARGIN = 60.0


#: Readings that keep coming are folded in at most this often (unless a window is due sooner)
#: while a rule watches raw readings: it fires at most this much later. Every fold costs the
#: same few hundred microseconds of numpy set-up whatever its size, and the log commits ten
#: times a second: at 1,000 readings/s folding every commit was a third of the processor's CPU.
FEED_INTERVAL = 0.25
#: With windows only, a fold changes nothing anyone sees until a window closes, and the loop
#: folds everything in before a processing-time window is due; an event-time window is closed
#: by the readings' own times, so its aggregate can come one interval late. A tenth of the
#: shortest window (or hop) within [FEED_INTERVAL, this]: at 1,000 readings/s folding every
#: second instead of four times a second took 0.6 % of a core off the agent (bench/soak.py).
MAX_FEED_INTERVAL = 1.0


def feed_interval(cfg: ProcessingConfig) -> float:
    """How often a steady flow of readings is folded in, for this configuration."""
    if any(rule.window is None for rule in cfg.rules) or not cfg.windows:
        return FEED_INTERVAL
    shortest = min(w.step or w.size for w in cfg.windows)
    return min(MAX_FEED_INTERVAL, max(FEED_INTERVAL, shortest / 10))


class Processor:
    """Feeds committed readings through the processing pipeline, in batches.

    `run` is never called concurrently with itself; `reload` may be called at any time from
    the event loop (a SIGHUP handler) and takes effect between two batches.
    """

    def __init__(self, cfg: ProcessingConfig, *, batch: int = 5000, grace: float = 2.0) -> None:
        self.cfg = cfg
        # Readings reach the log a commit interval after they were read; processing-time
        # windows wait this long past their end for them, and a tick closes event-time
        # windows this long after the watermark says.
        self.grace = grace
        self.pipeline = Pipeline(cfg, grace=grace)
        self.feed_interval = feed_interval(cfg)
        self.batch = batch
        self.processed = 0
        self.reloads = 0
        self.position = 0  # the last reading processed (committed or not)
        self._pending: ProcessingConfig | None = None

    @property
    def enabled(self) -> bool:
        """Whether there is anything to compute."""
        return bool(self.pipeline.windows or self.pipeline.rules)

    def reload(self, cfg: ProcessingConfig) -> None:
        """Switch to `cfg` between two batches, keeping the state of unchanged windows and rules;
        new and changed windows are rebuilt by replaying the readings they need."""
        self._pending = cfg

    # ------------------------------------------------------------------ start

    async def resume(self, event_log: EventLog) -> tuple[int, Output]:
        """Register and load the committed state (or rebuild it); returns the cursor to go on
        from, and the alerts that starting this way cleared (to commit)."""
        await event_log.register(CONSUMER, (Stream.READINGS,))
        cursor = event_log.cursor(CONSUMER, Stream.READINGS)
        text = await event_log.cursor_state(CONSUMER, Stream.READINGS)
        state: Any = None
        if text:
            try:
                state = json.loads(text)
            except ValueError:
                log.warning("processor: committed state is not readable; rebuilding it")
        now_mono, now_wall = time.monotonic(), time.time()
        try:
            restored = self.pipeline.restore(state, now_mono, now_wall)
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            log.warning("processor: committed state does not fit (%s); rebuilding it", exc)
            self.pipeline = Pipeline(self.cfg, grace=self.grace)
            restored = self.pipeline.restore(None)
        out = Output(alerts=list(restored.cleared))
        if cursor and restored.windows:
            log.info(
                "processor: rebuilding windows %s by replaying the log",
                ", ".join(sorted(restored.windows)),
            )
            await self._replay(event_log, restored.windows, cursor)
        if restored.rules_from_log and self.pipeline.rules and event_log.head(Stream.ALERTS):
            alerts = []
            after = 0
            while batch := await event_log.read(Stream.ALERTS, after, 5000):
                alerts.extend(batch)
                after = batch[-1].seq
            out.alerts.extend(self.pipeline.adopt_alerts(alerts, now_mono, now_wall))
        self.position = cursor
        return cursor, out

    async def _replay(self, event_log: EventLog, names: dict[str, bool], upto: int) -> None:
        """Rebuild the named windows from the readings up to `upto`, emitting nothing; then
        those marked True skip the windows whose aggregates the log already holds."""
        lookback = max(
            self.pipeline.windows[n].cfg.size
            + self.pipeline.windows[n].cfg.lateness
            + self.grace
            + REPLAY_MARGIN
            for n in names
        )
        at = await event_log.read(Stream.READINGS, upto - 1, 1)
        newest = at[0].recv_time if at else time.time()
        since = newest - lookback
        after = await event_log.seq_at(Stream.READINGS, since)
        while after < upto:
            batch = await event_log.read(Stream.READINGS, after, min(self.batch, upto - after))
            batch = [e for e in batch if e.seq <= upto]
            if not batch:
                break
            self.pipeline.rebuild(names, batch)
            after = batch[-1].seq
        if not any(names.values()):
            return
        # The windows cannot know what they already emitted: the log does.
        after = await event_log.seq_at(Stream.AGGREGATES, since)
        while batch := await event_log.read(Stream.AGGREGATES, after, 5000):
            for agg in batch:
                data = agg.data or {}
                window = self.pipeline.windows.get(str(data.get("window")))
                if window is not None and names.get(window.name) and agg.sensor is not None:
                    index = data.get("index")
                    if isinstance(index, int):
                        window.mark_emitted(agg.sensor, index)
            after = batch[-1].seq

    async def _apply_reload(self, event_log: EventLog) -> Output:
        cfg, self._pending = self._pending, None
        assert cfg is not None
        rebuild, cleared = self.pipeline.reconfigure(cfg, time.monotonic(), time.time())
        self.cfg = cfg
        self.feed_interval = feed_interval(cfg)
        self.reloads += 1
        if rebuild and self.position:
            await self._replay(event_log, rebuild, self.position)
        log.info(
            "processor: reloaded (%d windows, %d rules; rebuilt %s)",
            len(cfg.windows),
            len(cfg.rules),
            ", ".join(sorted(rebuild)) or "none",
        )
        return Output(alerts=cleared)

    # ------------------------------------------------------------------ running

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Process until `stop` is set, then one last pass over what was committed."""
        cursor, out = await self.resume(event_log)
        committed = cursor
        if out:
            await self._commit(event_log, cursor, out)
        last_commit = last_feed = time.monotonic()
        interval = self.cfg.checkpoint_interval
        behind = False  # the last read filled a batch: a backlog, folded in without pauses
        while True:
            if self._pending is not None:
                out = await self._apply_reload(event_log)
                interval = self.cfg.checkpoint_interval
                await self._commit(event_log, cursor, out)
                committed, last_commit = cursor, time.monotonic()
            stopping = stop.is_set()
            if not (stopping or behind or self._pending is not None):
                # A steady flow is folded in every feed_interval, whatever woke this loop (a
                # commit, this processor's own commit, which lets the next readings in).
                # A window due sooner cuts the pause short: folded in, then closed on time.
                now = time.monotonic()
                pause = min(last_feed + self.feed_interval, self.pipeline.next_due(now)) - now
                if pause > 0:
                    out = self.pipeline.tick(now, time.time())  # stale sensors among the flow
                    if out:
                        await self._commit(event_log, cursor, out)
                        committed, last_commit = cursor, now
                        continue
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(pause):
                            await stop.wait()
                    continue
            events = await event_log.read(Stream.READINGS, cursor, self.batch)
            behind = len(events) >= self.batch
            if events:
                last_feed = time.monotonic()
                out = self.pipeline.feed(events)
                cursor = self.position = events[-1].seq
                self.processed += len(events)
            elif stopping:
                if cursor != committed:
                    await self._commit(event_log, cursor, Output())
                return
            else:
                # Caught up: let the clock close windows, then wait for more.
                now = time.monotonic()
                out = self.pipeline.tick(now, time.time())
                if not out:
                    if cursor != committed and now - last_commit >= interval:
                        await self._commit(event_log, cursor, out)
                        committed, last_commit = cursor, now
                    due = self.pipeline.next_due(now) - now
                    wait = min(0.5, max(0.01, due))
                    await event_log.wait_for(Stream.READINGS, cursor, within=wait)
                    continue
            now = time.monotonic()
            if out or now - last_commit >= interval:
                await self._commit(event_log, cursor, out)
                committed, last_commit = cursor, now

    async def _commit(self, event_log: EventLog, cursor: int, out: Output) -> None:
        """Append what was produced, with the cursor and the state, in one transaction."""
        events: dict[Stream, list[NewEvent]] = {}
        for stream, produced in (
            (Stream.AGGREGATES, out.aggregates),
            (Stream.ALERTS, out.alerts),
            (Stream.DEADLETTER, out.deadletter),
        ):
            if produced:
                events[stream] = produced
        state = json.dumps(self.pipeline.snapshot(), separators=(",", ":"))
        await event_log.append(
            events=events, cursors=[CursorUpdate(CONSUMER, Stream.READINGS, cursor, state)]
        )
        for alert in out.alerts:
            log.info(
                "%s %s %s=%s",
                alert.kind,
                (alert.data or {}).get("alert_id"),
                alert.sensor,
                alert.value,
            )
