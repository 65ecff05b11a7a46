"""The runtime: builds the pipeline from a validated config and runs it until told to stop.

Shutdown is ordered (invariant 8): stop the drivers, drain what they read into the log, let the
processor take one last pass and commit its cursor, stop the forwarders (a batch that was not
acknowledged stays in the log for next time), then close the log, which commits what is queued
and checkpoints the WAL. The whole shutdown is bounded by `agent.shutdown_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from operator import countOf
from pathlib import Path
from typing import Any

from agent import __version__
from agent.actions import Action, build_action
from agent.backoff import Backoff
from agent.clock import CORRECTIONS
from agent.config import AgentConfig
from agent.events import NewEvent, Reading, Rejected, Stream
from agent.health import Monitor
from agent.log import EventLog
from agent.notify import Notifier
from agent.processor import Processor
from agent.reload import plan_reload
from agent.status import STATUS_FILE
from agent.upstream import Upstream, build_upstream
from drivers import build_driver
from drivers.base import Driver, DriverError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class InputStatus:
    """What `status` shows for an input."""

    connected: bool = False
    since: float | None = None
    readings: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    last_error: str | None = None
    last_error_time: float | None = None
    rate: float = 0.0


class _RateLimitedLog:
    """Logs a kind of bad input once per `period` per input; the rest are only counted."""

    def __init__(self, period: float = 60.0) -> None:
        self.period = period
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, r: Rejected) -> None:
        key = (r.source, r.reason)
        now = time.monotonic()
        if now - self._last.get(key, -self.period) >= self.period:
            self._last[key] = now
            log.warning(
                "input %s: bad input (%s): %s; kept in deadletter, more of this kind "
                "are counted silently for %.0fs",
                r.source,
                r.reason,
                r.detail,
                self.period,
            )


def _ack_when_committed(ack: Callable[[], None]) -> Callable[[asyncio.Future[Any]], None]:
    """A done-callback that acknowledges the source only if the commit succeeded."""

    def done(future: asyncio.Future[Any]) -> None:
        if not future.cancelled() and future.exception() is None:
            ack()

    return done


class Agent:
    """The running pipeline: inputs → log → processor and upstreams."""

    def __init__(self, cfg: AgentConfig, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.drivers: list[Driver] = [build_driver(i) for i in cfg.inputs]
        self.inputs = {d.name: InputStatus() for d in self.drivers}
        self.processor = Processor(cfg.processing)
        self.actions: list[Action] = [build_action(a) for a in cfg.processing.actions]
        self.upstreams: list[Upstream] = [
            build_upstream(u, cfg.agent.name, cfg.agent.data_dir) for u in cfg.upstreams
        ]
        self.started = time.time()
        self.log: EventLog | None = None
        self._bad_input_log = _RateLimitedLog()
        self._stop = asyncio.Event()
        # systemd notify, watchdog, health, clock: see agent/health.py.
        self.monitor = Monitor(self, notifier)
        # What a reload may stop and start again, by "input:NAME", "upstream:NAME", ...; the
        # task groups still own them.
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, asyncio.Event] = {}
        self._groups: dict[str, asyncio.TaskGroup] = {}
        self._reload_path: Path | None = None
        self._reload_wanted = asyncio.Event()

    def stop(self) -> None:
        """Ask the agent to shut down (signal handlers call this)."""
        self._stop.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Run until `stop()`; returns after the ordered shutdown."""
        self.monitor.notifier.status("starting: checking and opening the log")
        async with EventLog.open(self.cfg.log_path, self.cfg.log) as event_log:
            self.log = event_log
            # Before any input runs: what this run commits is what its clock steps apply to.
            CORRECTIONS.start(
                {s: event_log.head(s) + 1 for s in Stream},
                self.cfg.agent.correct_times,
                self.cfg.agent.clock_step,
            )
            await self._record(
                event_log,
                "agent.started",
                version=__version__,
                name=self.cfg.agent.name,
                pid=os.getpid(),
                boot_id=self.monitor.boot_id,
                clock_offset=self.monitor.clock.offset,
            )
            if event_log.recovered is not None:
                await self._record(event_log, "log.recovered", **event_log.recovered)
            consumers_stop = asyncio.Event()
            async with asyncio.TaskGroup() as consumers:
                self._groups["consumers"] = consumers
                if self.processor.enabled:
                    self._tasks["processor"] = consumers.create_task(
                        self.processor.run(event_log, consumers_stop)
                    )
                for action in self.actions:
                    self._start_consumer(action, event_log)
                for upstream in self.upstreams:
                    self._start_consumer(upstream, event_log)
                consumers.create_task(self._status_loop(consumers_stop))
                consumers.create_task(self.monitor.run(event_log, consumers_stop))
                consumers.create_task(self._reload_loop(event_log, consumers_stop))
                if ready is not None:
                    ready.set()
                self.monitor.ready()
                log.info(
                    "agent %s running: log %s (id %s), %d inputs, %d upstreams",
                    self.cfg.agent.name,
                    self.cfg.log_path,
                    event_log.log_id,
                    len(self.drivers),
                    len(self.upstreams),
                )
                try:
                    async with asyncio.TaskGroup() as inputs:
                        self._groups["inputs"] = inputs
                        for driver in self.drivers:
                            self._start_input(driver, event_log)
                        await self._stop.wait()
                        self.monitor.stopping()
                        log.info("stopping: closing inputs")
                        for key, stop in self._stops.items():
                            if key.startswith("input:"):
                                stop.set()
                        async with asyncio.timeout(self.cfg.agent.shutdown_timeout):
                            for driver in self.drivers:
                                await driver.close()
                finally:
                    consumers_stop.set()
                    for stop in self._stops.values():
                        stop.set()
                    self._reload_wanted.set()
            self._write_status()
            log.info("stopped: log committed and closed")

    async def _ingest(
        self, driver: Driver, event_log: EventLog, stop: asyncio.Event | None = None
    ) -> None:
        """Read one input into the log, reconnecting with backoff until the agent stops.

        A lost connection is recorded in the `agent` stream twice: `input.disconnected` when
        it happens, and a `gap` (input, from, to, reason) once the input is back, so the
        cloud knows which stretch of time this input could not have delivered.
        """
        status = self.inputs[driver.name]
        cfg = next(i for i in self.cfg.inputs if i.name == driver.name)
        initial = getattr(cfg, "reconnect_initial", 0.5)
        backoff = Backoff(initial, getattr(cfg, "reconnect_max", 30.0))
        delay = initial
        lost: tuple[float, str] | None = None
        stop = stop or self._stop  # set by the agent's stop, or by a reload for this input
        while not stop.is_set():
            try:
                await driver.open()
                status.connected, status.since = True, time.time()
                if lost is not None:
                    await self._record(
                        event_log,
                        "gap",
                        input=driver.name,
                        reason="disconnected",
                        detail=lost[1],
                        **{"from": lost[0], "to": status.since},
                    )
                    log.info("input %s back after %.1fs", driver.name, status.since - lost[0])
                    lost = None
                async for batch in driver:
                    future = await event_log.submit(batch.items)
                    if batch.ack is not None:
                        future.add_done_callback(_ack_when_committed(batch.ack))
                    # Counted in C: a Python loop over every reading was its own cost.
                    readings = countOf(map(type, batch.items), Reading)
                    status.readings += readings
                    if readings < len(batch.items):
                        for item in batch.items:
                            if type(item) is Rejected:
                                rejected = status.rejected
                                rejected[item.reason] = rejected.get(item.reason, 0) + 1
                                self._bad_input_log(item)
                    backoff.reset()
                if not stop.is_set():
                    log.info("input %s ended", driver.name)
                return
            except DriverError as exc:
                now = time.time()
                if status.connected:
                    lost = (now, str(exc))
                    await self._record(
                        event_log, "input.disconnected", input=driver.name, reason=str(exc)
                    )
                status.connected, status.since = False, now
                status.last_error, status.last_error_time = str(exc), now
                delay = backoff.next()
                log.warning("input %s: %s; retrying in %.1fs", driver.name, exc, delay)
            finally:
                with contextlib.suppress(DriverError):
                    await driver.close()
                status.connected = False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)

    # ------------------------------------------------------------------ reload (SIGHUP)

    def request_reload(self, path: Path) -> None:
        """Read the config at `path` again and apply it (a SIGHUP handler calls this);
        reloads never overlap, and one asked for during another runs after it."""
        self._reload_path = path
        self._reload_wanted.set()

    async def _reload_loop(self, event_log: EventLog, stop: asyncio.Event) -> None:
        while True:
            await self._reload_wanted.wait()  # also set to wake it for the shutdown
            self._reload_wanted.clear()
            if stop.is_set() or self._stop.is_set():
                return
            assert self._reload_path is not None
            await self.reload_from(self._reload_path, event_log)

    async def reload_from(self, path: Path, event_log: EventLog) -> bool:
        """Load `path`; if it is invalid, keep running as before and log every problem as
        FILE:LINE:COL: field: message. False when nothing was applied."""
        from agent.config import ConfigError, load_config

        self.monitor.reloading()
        try:
            try:
                cfg = await asyncio.to_thread(load_config, path)
            except ConfigError as exc:
                for issue in exc.issues:
                    log.error("reload: %s", issue)
                log.error("reload refused: keeping the running config (%s)", path)
                return False
            if self._stop.is_set():
                return False
            await self.reload(cfg, event_log)
            return True
        finally:
            self.monitor.ready()

    async def reload(self, new: AgentConfig, event_log: EventLog) -> None:
        """Apply a valid config to the running agent (see agent/reload.py for what is live)."""
        plan = plan_reload(self.cfg, new)
        for stopping in plan.stop_inputs:
            await self._stop_task(f"input:{stopping}")
        for key in plan.stop_consumers:
            await self._stop_task(key)
        self.cfg = cfg = plan.cfg
        logging.getLogger().setLevel(cfg.agent.log_level.upper())
        self.monitor.clock.threshold = CORRECTIONS.tolerance = cfg.agent.clock_step
        CORRECTIONS.enabled = cfg.agent.correct_times
        if plan.processing:
            if "processor" in self._tasks:
                self.processor.reload(cfg.processing)
            else:
                self.processor = Processor(cfg.processing)
                if self.processor.enabled:
                    stop = self._stop_event("processor")
                    self._tasks["processor"] = self._groups["consumers"].create_task(
                        self.processor.run(event_log, stop)
                    )
        self.actions = [a for a in self.actions if a.consumer not in plan.stop_consumers]
        self.upstreams = [u for u in self.upstreams if u.consumer not in plan.stop_consumers]
        for a in cfg.processing.actions:
            if a.name in plan.start_actions:
                action = build_action(a)
                self.actions.append(action)
                self._start_consumer(action, event_log)
        for u in cfg.upstreams:
            if u.name in plan.start_upstreams:
                upstream = build_upstream(u, cfg.agent.name, cfg.agent.data_dir)
                self.upstreams.append(upstream)
                self._start_consumer(upstream, event_log)
        self.drivers = [d for d in self.drivers if d.name not in plan.stop_inputs]
        for name in set(self.inputs) - {i.name for i in cfg.inputs}:
            del self.inputs[name]
        for i in cfg.inputs:
            if i.name in plan.start_inputs and not self._stop.is_set():
                driver = build_driver(i)
                self.drivers.append(driver)
                # A restarted input keeps its counters.
                self.inputs.setdefault(i.name, InputStatus())
                self._start_input(driver, event_log)
        log.info("reloaded: %s", ", ".join(plan.changes) or "nothing changed")
        if plan.restart_needed:
            log.warning(
                "reload: %s changed; running on the old value until a restart",
                ", ".join(plan.restart_needed),
            )

    def _stop_event(self, key: str) -> asyncio.Event:
        # Started by a reload that raced a SIGTERM: already told to stop.
        stop = self._stops[key] = asyncio.Event()
        if self._stop.is_set():
            stop.set()
        return stop

    def _start_input(self, driver: Driver, event_log: EventLog) -> None:
        stop = self._stop_event(f"input:{driver.name}")
        self._tasks[f"input:{driver.name}"] = self._groups["inputs"].create_task(
            self._ingest(driver, event_log, stop)
        )

    def _start_consumer(self, consumer: Action | Upstream, event_log: EventLog) -> None:
        stop = self._stop_event(consumer.consumer)
        self._tasks[consumer.consumer] = self._groups["consumers"].create_task(
            consumer.run(event_log, stop)
        )

    async def _stop_task(self, key: str) -> None:
        """Stop one input or consumer: what it read is committed, what it sent and was not
        acknowledged stays in the log for its successor."""
        stop, task = self._stops.pop(key, None), self._tasks.pop(key, None)
        if stop is not None:
            stop.set()
        if key.startswith("input:"):
            for driver in self.drivers:
                if f"input:{driver.name}" == key:
                    with contextlib.suppress(DriverError):
                        await driver.close()
        if task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(task), self.cfg.agent.shutdown_timeout)
            except TimeoutError:
                log.warning("reload: %s did not stop within the shutdown timeout", key)

    async def _record(self, event_log: EventLog, kind: str, **data: Any) -> None:
        """Append an event about the agent itself to the `agent` stream."""
        now = time.time()
        event = NewEvent(kind=kind, time=now, recv_time=now, mono=time.monotonic(), data=data)
        await event_log.append(events={Stream.AGENT: [event]})

    async def _status_loop(self, stop: asyncio.Event) -> None:
        last = {name: (time.monotonic(), s.readings) for name, s in self.inputs.items()}
        while not stop.is_set():
            now = time.monotonic()
            for name, s in self.inputs.items():
                then, count = last.get(name, (now, s.readings))  # an input a reload added
                s.rate = (s.readings - count) / max(now - then, 1e-9)
                last[name] = (now, s.readings)
            self._write_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.cfg.agent.status_interval)

    def snapshot(self) -> dict[str, Any]:
        """The live figures `edge-agent status` shows next to what it reads from the log."""
        event_log = self.log
        return {
            "pid": os.getpid(),
            "name": self.cfg.agent.name,
            "version": __version__,
            "started": self.started,
            "updated": time.time(),
            "log_id": event_log.log_id if event_log else None,
            # Next to ours, what each driver counts about its source (MQTT: redelivered, ...).
            "inputs": {
                d.name: asdict(self.inputs[d.name]) | {"counters": dict(getattr(d, "counters", {}))}
                for d in self.drivers
            },
            "upstreams": {u.cfg.name: asdict(u.status) for u in self.upstreams},
            "processor": {
                "processed": self.processor.processed,
                "late": self.processor.pipeline.late,
            },
            "log": asdict(event_log.stats) | {"queued": event_log.queued} if event_log else {},
            **self.monitor.snapshot(),
        }

    def _write_status(self) -> None:
        path = Path(self.cfg.agent.data_dir) / STATUS_FILE
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text(json.dumps(self.snapshot(), indent=1))
            os.replace(tmp, path)
        except OSError as exc:
            log.debug("cannot write %s: %s", path, exc)
