"""The processor: a consumer of `readings` that appends aggregates and alerts.

Its cursor and its window/rule state are committed in the same transaction as the events it
appended (invariant 2), so after a crash it resumes exactly where its last effect ended:
no aggregate or alert is lost or repeated.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time

from agent.config import ProcessingConfig
from agent.events import Stream
from agent.log import CursorUpdate, EventLog
from agent.processing import Pipeline

log = logging.getLogger(__name__)

CONSUMER = "processor"


class Processor:
    """Feeds committed readings through the processing pipeline, in batches."""

    def __init__(self, cfg: ProcessingConfig, *, batch: int = 5000, grace: float = 2.0) -> None:
        self.pipeline = Pipeline(cfg)
        self.batch = batch
        # Readings reach the log a commit interval after they were read; a window is closed
        # by the clock only this long after its end, so they are not counted late.
        self.grace = grace
        self.processed = 0

    @property
    def enabled(self) -> bool:
        """Whether there is anything to compute."""
        return bool(self.pipeline.windows)

    async def resume(self, event_log: EventLog) -> int:
        """Register and load the committed state; returns the cursor to continue from."""
        await event_log.register(CONSUMER, (Stream.READINGS,))
        state = await event_log.cursor_state(CONSUMER, Stream.READINGS)
        if state:
            self.pipeline.restore(json.loads(state))
        return event_log.cursor(CONSUMER, Stream.READINGS)

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Process until `stop` is set, then one last pass over what was committed."""
        cursor = await self.resume(event_log)
        while True:
            stopping = stop.is_set()
            events = await event_log.read(Stream.READINGS, cursor, self.batch)
            if events:
                aggregates, alerts = self.pipeline.feed(events)
                cursor = events[-1].seq
                self.processed += len(events)
            elif stopping:
                return
            else:
                # Caught up: let the clock close windows, then wait for more.
                aggregates, alerts = self.pipeline.tick(time.monotonic(), self.grace)
                if not aggregates:
                    await event_log.wait_for(Stream.READINGS, cursor, within=0.5)
                    continue
            await event_log.append(
                events={Stream.AGGREGATES: aggregates, Stream.ALERTS: alerts},
                cursors=[
                    CursorUpdate(
                        CONSUMER,
                        Stream.READINGS,
                        cursor,
                        json.dumps(self.pipeline.snapshot(), separators=(",", ":")),
                    )
                ],
            )
            for alert in alerts:
                log.info(
                    "%s %s %s=%.3f",
                    alert.kind,
                    (alert.data or {}).get("alert_id"),
                    alert.sensor,
                    alert.value,
                )
