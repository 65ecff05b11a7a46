"""Is the pipeline moving? The systemd watchdog, `/healthz`, `/metrics` and the clock watch.

Two questions, answered differently on purpose:
- Watchdog (liveness): is any part *stuck*, that is, has work to do and has done nothing at all
  for `health.stall_after` (not a commit, not even a failed attempt)? Only then is `WATCHDOG=1`
  withheld, so systemd restarts the agent. A full disk or an upstream outage is not stuck:
  the writer and the forwarders keep retrying, and a restart would not help them.
- Health (readiness, `/healthz`): is the agent doing its job? 503 with the reasons when the
  log writer fails, an input is down for longer than `input_down_after`, an upstream fails
  for longer than `upstream_failing_after`, or a part is stuck.

`/metrics` exposes the same figures as `edge-agent status` in Prometheus' text format,
read from the running objects when scraped (nothing is counted twice).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.clock import CORRECTIONS, ClockWatch, boot_id
from agent.events import Stream
from agent.notify import Notifier

if TYPE_CHECKING:
    # At run time aiohttp.web and prometheus_client are imported only by the HTTP endpoint,
    # when `health.listen` is set: together they cost a few MiB of RSS that an agent without
    # the endpoint should not pay (issue 7).
    from aiohttp import web
    from prometheus_client import CollectorRegistry
    from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

    from agent.log import EventLog
    from agent.runtime import Agent

log = logging.getLogger(__name__)

#: How often STATUS= is refreshed for `systemctl status` (and whenever health changes).
STATUS_EVERY = 10.0
#: How long a failed bind of the health endpoint waits before trying again.
LISTEN_RETRY = 30.0


def bytes_written() -> int | None:
    """Bytes this process caused to be written to storage (`/proc/self/io` write_bytes)."""
    try:
        with open("/proc/self/io", "rb") as f:
            for line in f:
                if line.startswith(b"write_bytes:"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def file_bytes(path: Path) -> int:
    """What the log occupies on disk: the database and its WAL."""
    total = 0
    for p in (path, Path(f"{path}-wal")):
        with contextlib.suppress(OSError):
            total += p.stat().st_size
    return total


# --------------------------------------------------------------------------- progress


@dataclass(slots=True)
class _Part:
    marks: tuple[int, ...] = ()
    changed: float = 0.0


@dataclass(slots=True)
class Progress:
    """Per part of the pipeline, when its counters last moved; pure, tests feed it samples."""

    parts: dict[str, _Part] = field(default_factory=dict)

    def update(
        self, samples: dict[str, tuple[bool, tuple[int, ...], float]], now: float
    ) -> list[str]:
        """Take one sample per part, `(has work, counters, may idle this long)`; return the
        parts that had work and moved no counter for longer than they may."""
        stalled = []
        for name, (pending, marks, limit) in samples.items():
            part = self.parts.setdefault(name, _Part(marks, now))
            if marks != part.marks or not pending:
                part.marks, part.changed = marks, now
            elif now - part.changed > limit:
                stalled.append(
                    f"{name} has work and made no progress for {now - part.changed:.0f}s"
                )
        for gone in set(self.parts) - set(samples):
            del self.parts[gone]
        return stalled


@dataclass(slots=True, frozen=True)
class Health:
    """The verdict `/healthz` serves."""

    ok: bool
    reasons: tuple[str, ...] = ()

    def as_json(self) -> dict[str, Any]:
        """The `/healthz` body."""
        return {"ok": self.ok, "reasons": list(self.reasons)}


# --------------------------------------------------------------------------- the monitor


class Monitor:
    """Watches the running agent: progress for the watchdog, health, clock steps, disk use.

    `run` is called once per agent run; `ready`, `reloading` and `stopping` are called by the
    runtime from the event loop; `health` and `snapshot` may be called at any time.
    """

    def __init__(self, agent: Agent, notifier: Notifier | None = None) -> None:
        self.agent = agent
        self.notifier = notifier if notifier is not None else Notifier(None)
        self.clock = ClockWatch(agent.cfg.agent.clock_step)
        self.boot_id = boot_id()
        self.progress = Progress()
        self.phase = "starting"
        self.stalled: list[str] = []
        self.watchdog_pings = 0
        self.disk_bytes = 0
        self._written_at_start = bytes_written()
        self._writer_failing_since: float | None = None
        # Per input, since when it has been failing to connect (InputStatus.since moves with
        # every attempt).
        self._down_since: dict[str, float] = {}
        self._last_commits = -1
        self._last_status = ""
        self._last_status_at = 0.0
        self._withheld_logged = False

    # ------------------------------------------------------------------ phases

    def ready(self) -> None:
        """The pipeline runs: READY=1 with a first summary."""
        self.phase = "running"
        self.notifier.ready(self.summary())

    def reloading(self) -> None:
        """A SIGHUP reload started; `ready` ends it."""
        self.phase = "reloading"
        self.notifier.reloading()

    def stopping(self) -> None:
        """Shutdown began: STOPPING=1."""
        self.phase = "stopping"
        self.notifier.stopping()

    # ------------------------------------------------------------------ the loop

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Sample, judge and report until `stop` is set; serves HTTP when `health.listen` is
        set (a port that cannot be bound is logged and tried again, never fatal)."""
        watchdog = self.notifier.watchdog_interval
        server = HealthServer(self) if self.agent.cfg.health.address else None
        next_bind = 0.0
        try:
            while not stop.is_set():
                now = time.monotonic()
                if server is not None and not server.listening and now >= next_bind:
                    try:
                        await server.start()
                    except OSError as exc:
                        log.error("health endpoint %s: %s", self.agent.cfg.health.listen, exc)
                        next_bind = now + LISTEN_RETRY
                step = self.clock.check()
                if step is not None:
                    log.warning(
                        "wall clock stepped by %+.3fs (offset %.3f -> %.3f)",
                        step.step,
                        step.old_offset,
                        step.new_offset,
                    )
                    await self.agent._record(event_log, "clock_step", **step.data())
                    CORRECTIONS.add(step)
                self.sample(event_log, now)
                if watchdog is not None:
                    self._watchdog()
                self._status(now)
                tick = self.agent.cfg.agent.status_interval
                if watchdog is not None:
                    tick = min(tick, watchdog)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), tick)
        finally:
            if server is not None:
                await server.stop()

    def sample(self, event_log: EventLog, now: float | None = None) -> list[str]:
        """Look at every part once; returns the stuck ones."""
        now = time.monotonic() if now is None else now
        agent = self.agent
        stats = event_log.stats
        if stats.commits != self._last_commits:
            self._last_commits = stats.commits
            self._writer_failing_since = None
        elif stats.last_write_error and self._writer_failing_since is None and event_log.queued:
            self._writer_failing_since = time.time()
        stall = agent.cfg.health.stall_after
        samples: dict[str, tuple[bool, tuple[int, ...], float]] = {
            # A failed attempt is progress here: a writer retrying a full disk is not stuck.
            "log writer": (event_log.queued > 0, (stats.commits, stats.write_errors), stall),
        }
        processor = agent.processor
        if processor.enabled:
            pending = processor.position < event_log.head(Stream.READINGS)
            samples["processor"] = (
                pending,
                (processor.processed, processor.position, processor.reloads),
                stall,
            )
        for up in agent.upstreams:
            s = up.status
            pending = any(
                event_log.cursor(up.consumer, Stream(st)) < event_log.head(Stream(st))
                for st in up.cfg.streams
            )
            # Between two attempts an upstream may wait its whole backoff and timeout.
            limit = max(stall, 3 * (up.cfg.timeout + up.cfg.backoff_max))
            marks = (s.sent, s.failures, s.filtered, s.deadlettered, s.batches, s.replays)
            samples[f"upstream {up.cfg.name}"] = (pending, marks, limit)
        self.stalled = self.progress.update(samples, now)
        for name, i in agent.inputs.items():
            failed = i.last_error_time
            if not i.connected and failed is not None and failed >= (i.since or 0.0):
                self._down_since.setdefault(name, failed)
            else:
                self._down_since.pop(name, None)
        self.disk_bytes = file_bytes(event_log.path)
        return self.stalled

    def _watchdog(self) -> None:
        if self.stalled:
            if not self._withheld_logged:
                self._withheld_logged = True
                log.error("watchdog withheld: %s", "; ".join(self.stalled))
            return
        self._withheld_logged = False
        if self.notifier.watchdog():
            self.watchdog_pings += 1

    def _status(self, now: float) -> None:
        line = self.summary()
        changed = line.split(" · ")[0] != self._last_status.split(" · ")[0]
        if changed or now - self._last_status_at >= STATUS_EVERY:
            self._last_status, self._last_status_at = line, now
            self.notifier.status(line)

    # ------------------------------------------------------------------ judgement

    def health(self, now: float | None = None) -> Health:
        """200 or 503, and why."""
        now = time.time() if now is None else now
        agent, cfg = self.agent, self.agent.cfg.health
        reasons: list[str] = []
        if self.phase != "running":
            reasons.append(self.phase)
        event_log = agent.log
        if event_log is not None and self._writer_failing_since is not None:
            reasons.append(
                f"log writer failing for {now - self._writer_failing_since:.0f}s: "
                f"{event_log.stats.last_write_error}"
            )
        reasons.extend(self.stalled)
        for name, since in self._down_since.items():
            s = agent.inputs.get(name)
            if s is not None and not s.connected and now - since > cfg.input_down_after:
                reasons.append(f"input {name} down for {now - since:.0f}s: {s.last_error}")
        for up in agent.upstreams:
            u = up.status
            good = u.last_success or agent.started
            failing = u.last_error_time is not None and u.last_error_time > good
            if failing and now - good > cfg.upstream_failing_after:
                reasons.append(
                    f"upstream {up.cfg.name} failing for {now - good:.0f}s: {u.last_error}"
                )
        return Health(not reasons, tuple(reasons))

    def capacity_hours(self) -> float | None:
        """How long the log could hold what comes in at the current rate if every upstream
        went away now, before the quota starts dropping unsent readings; None when idle."""
        event_log = self.agent.log
        if event_log is None:
            return None
        kept = sum(max(0, event_log.head(s) - event_log.tail(s) + 1) for s in Stream)
        rate = sum(s.rate for s in self.agent.inputs.values())
        if kept == 0 or rate <= 0 or self.disk_bytes <= 0:
            return None
        per_event = self.disk_bytes / kept
        unsent = max((sum(lag.values()) for lag in self.lags().values()), default=0)
        free = self.agent.cfg.log.quota - unsent * per_event
        return max(0.0, free / (per_event * rate) / 3600)

    def lags(self) -> dict[str, dict[str, int]]:
        """Per consumer and stream, how many committed events it has not handled yet."""
        event_log = self.agent.log
        if event_log is None:
            return {}
        out: dict[str, dict[str, int]] = {}
        for (consumer, stream), seq in event_log.cursors().items():
            out.setdefault(consumer, {})[stream.value] = max(0, event_log.head(stream) - seq)
        return out

    def summary(self) -> str:
        """The one line for `systemctl status`: state, then figures."""
        health = self.health()
        state = self.phase if self.phase != "running" else ("ok" if health.ok else "degraded")
        parts = [state if health.ok else f"{state}: {health.reasons[0]}"]
        rate = sum(s.rate for s in self.agent.inputs.values())
        parts.append(f"{rate:.1f} readings/s")
        lag = max((sum(v.values()) for v in self.lags().values()), default=0)
        parts.append(f"lag {lag}")
        quota = self.agent.cfg.log.quota
        parts.append(f"log {self.disk_bytes / 2**20:.1f}/{quota / 2**20:.0f} MiB")
        event_log = self.agent.log
        if event_log is not None and event_log.stats.dropped:
            parts.append(f"dropped {sum(event_log.stats.dropped.values())}")
        return " · ".join(parts)

    def snapshot(self) -> dict[str, Any]:
        """What `status.json` carries from the monitor."""
        agent = self.agent
        event_log = agent.log
        written = bytes_written()
        since = (
            written - self._written_at_start
            if written is not None and self._written_at_start is not None
            else None
        )
        readings = sum(s.readings for s in agent.inputs.values())
        health = self.health()
        return {
            "boot_id": self.boot_id,
            "health": health.as_json()
            | {"phase": self.phase, "watchdog_pings": self.watchdog_pings},
            "clock": self.clock.snapshot(),
            "disk": {
                "bytes": self.disk_bytes,
                "quota": agent.cfg.log.quota,
                "written": since,
                "written_per_reading": since / readings if since is not None and readings else None,
                "capacity_hours": self.capacity_hours(),
                "dropped": dict(event_log.stats.dropped) if event_log else {},
                "deadletter": event_log.head(Stream.DEADLETTER) if event_log else 0,
            },
        }


# --------------------------------------------------------------------------- /metrics


class AgentCollector:
    """Prometheus figures read from the running agent at scrape time."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        """Every metric, freshly read."""
        # Deferred (see the top); by now HealthServer has imported prometheus_client anyway.
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        m = self.monitor
        agent = m.agent
        event_log = agent.log
        ns = "edge_agent"

        def gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{ns}_{name}", doc, labels=labels)

        def counter(name: str, doc: str, labels: list[str] | None = None) -> CounterMetricFamily:
            return CounterMetricFamily(f"{ns}_{name}", doc, labels=labels)

        info = gauge("info", "The agent's identity.", ["name", "version", "log_id", "boot_id"])
        from agent import __version__

        info.add_metric(
            [
                agent.cfg.agent.name,
                __version__,
                event_log.log_id if event_log else "",
                m.boot_id or "",
            ],
            1,
        )
        yield info
        yield _one(
            gauge("start_time_seconds", "When the agent started (unix time)."), agent.started
        )
        health = m.health()
        yield _one(gauge("healthy", "1 when /healthz answers 200."), float(health.ok))

        connected = gauge("input_connected", "1 while the input is connected.", ["input"])
        readings = counter("input_readings", "Readings read from the input.", ["input"])
        rate = gauge("input_readings_per_second", "Recent readings per second.", ["input"])
        rejected = counter("input_rejected", "Bad input kept in deadletter.", ["input", "reason"])
        for name, s in agent.inputs.items():
            connected.add_metric([name], float(s.connected))
            readings.add_metric([name], s.readings)
            rate.add_metric([name], s.rate)
            for reason, n in s.rejected.items():
                rejected.add_metric([name, reason], n)
        yield from (connected, readings, rate, rejected)

        if event_log is not None:
            head = gauge("log_head_seq", "Seq of the newest event of the stream.", ["stream"])
            oldest = gauge("log_oldest_seq", "Seq of the oldest event still kept.", ["stream"])
            for stream in Stream:
                head.add_metric([stream.value], event_log.head(stream))
                oldest.add_metric([stream.value], event_log.tail(stream))
            yield from (head, oldest)
            stats = event_log.stats
            yield _one(counter("log_commits", "Commits of the log."), stats.commits)
            yield _one(counter("log_events_written", "Events committed."), stats.events_written)
            yield _one(counter("log_write_errors", "Failed commits (retried)."), stats.write_errors)
            yield _one(gauge("log_queued", "Events waiting for the next commit."), event_log.queued)
            dropped = counter("log_dropped", "Unsent events dropped (quota, age).", ["stream"])
            pruned = counter("log_pruned", "Handled events removed (quota, age).", ["stream"])
            for stream in Stream:
                dropped.add_metric([stream.value], stats.dropped.get(stream.value, 0))
                pruned.add_metric([stream.value], stats.pruned.get(stream.value, 0))
            yield from (dropped, pruned)
            lag = gauge(
                "consumer_lag",
                "Committed events a consumer has not handled.",
                ["consumer", "stream"],
            )
            for consumer, streams in m.lags().items():
                for stream_name, n in streams.items():
                    lag.add_metric([consumer, stream_name], n)
            yield lag
        yield _one(
            gauge("log_disk_bytes", "Bytes of the log on disk (database and WAL)."), m.disk_bytes
        )
        yield _one(gauge("log_quota_bytes", "The log's disk quota."), agent.cfg.log.quota)
        written = bytes_written()
        if written is not None:
            yield _one(
                counter("disk_written_bytes", "Bytes this process wrote to storage."), written
            )
        hours = m.capacity_hours()
        if hours is not None:
            yield _one(
                gauge("offline_capacity_hours", "Hours the log holds at the current rate."), hours
            )

        sent = counter("upstream_sent", "Events the upstream acknowledged.", ["upstream"])
        failures = counter("upstream_failures", "Failed delivery attempts.", ["upstream"])
        dead = counter("upstream_deadlettered", "Events refused for good.", ["upstream"])
        last = gauge(
            "upstream_last_success_timestamp_seconds", "Last acknowledged batch.", ["upstream"]
        )
        inflight = gauge("upstream_inflight", "Messages sent and not acknowledged.", ["upstream"])
        for up in agent.upstreams:
            u, name = up.status, up.cfg.name
            sent.add_metric([name], u.sent)
            failures.add_metric([name], u.failures)
            dead.add_metric([name], u.deadlettered)
            inflight.add_metric([name], u.inflight)
            if u.last_success is not None:
                last.add_metric([name], u.last_success)
        yield from (sent, failures, dead, last, inflight)

        yield _one(counter("processor_processed", "Readings processed."), agent.processor.processed)
        yield _one(
            counter("processor_late", "Readings too late for their window."),
            agent.processor.pipeline.late,
        )
        yield _one(counter("clock_steps", "Steps of the wall clock seen."), m.clock.steps)
        yield _one(gauge("clock_offset_seconds", "Wall time minus monotonic time."), m.clock.offset)


def _one(metric: GaugeMetricFamily | CounterMetricFamily, value: float) -> Metric:
    metric.add_metric([], value)
    return metric


def registry_for(monitor: Monitor) -> CollectorRegistry:
    """A registry with the agent's figures and the process' own (CPU, memory, open files)."""
    from prometheus_client import CollectorRegistry, PlatformCollector, ProcessCollector

    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(monitor))
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    return registry


# --------------------------------------------------------------------------- HTTP


class HealthServer:
    """`GET /healthz` and `GET /metrics` on `health.listen`; no authentication, so keep it on
    127.0.0.1 (a scraper on the device, or an SSH tunnel). `start` and `stop` never overlap."""

    def __init__(self, monitor: Monitor) -> None:
        self.monitor = monitor
        self.registry = registry_for(monitor)
        self._runner: web.AppRunner | None = None

    @property
    def listening(self) -> bool:
        """Whether the endpoint is bound."""
        return self._runner is not None

    async def start(self) -> None:
        """Bind `health.listen`; OSError when the address cannot be used."""
        address = self.monitor.agent.cfg.health.address
        assert address is not None
        from aiohttp import web  # deferred: see the top of the module

        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/metrics", self._metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            await web.TCPSite(runner, address[0], address[1], reuse_address=True).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        log.info("health endpoint on http://%s:%d (/healthz, /metrics)", *address)

    async def stop(self) -> None:
        """Close the endpoint."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        from aiohttp import web  # imported by `start` already: a dictionary look-up

        health = self.monitor.health()
        return web.Response(
            status=200 if health.ok else 503,
            text=json.dumps(health.as_json()) + "\n",
            content_type="application/json",
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        from aiohttp import web
        from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

        body = generate_latest(self.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# --------------------------------------------------------------------------- `status`


def status_lines(live: dict[str, Any], *, running: bool) -> list[str]:
    """The health, disk and clock lines `edge-agent status` prints from `status.json`."""
    health, disk, clock = live.get("health"), live.get("disk"), live.get("clock")
    lines = []
    if running and isinstance(health, dict):
        reasons = health.get("reasons") or []
        state = "[green]ok[/]" if health.get("ok") else "[red]unhealthy[/]: " + "; ".join(reasons)
        lines.append(f"health: {state} ({health.get('phase')})")
    if isinstance(disk, dict):
        parts = [f"disk: {disk['bytes'] / 2**20:.1f} MiB of {disk['quota'] / 2**20:.0f} MiB"]
        hours = disk.get("capacity_hours")
        if running and hours is not None:
            parts.append(f"{hours:.1f} h of offline capacity left at the current rate")
        per = disk.get("written_per_reading")
        if per is not None:
            parts.append(f"{per:.0f} bytes written per reading")
        dropped = sum((disk.get("dropped") or {}).values())
        parts.append(f"dropped {dropped}")
        parts.append(f"deadletter {disk.get('deadletter', 0)}")
        lines.append(" · ".join(parts))
    if isinstance(clock, dict):
        synced = {True: "yes", False: "no", None: "unknown"}[clock.get("synchronized")]
        parts = [f"clock: NTP synchronised {synced}", f"steps {clock.get('steps', 0)}"]
        last = clock.get("last_step")
        if isinstance(last, dict):
            parts.append(f"last step {last['step']:+.1f}s")
        if live.get("boot_id"):
            parts.append(f"boot {live['boot_id']}")
        lines.append(" · ".join(parts))
    return lines
