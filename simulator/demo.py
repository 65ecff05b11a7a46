"""The laptop demo: the simulator on a pty, a local cloud, the agent, and a live view of them.

`edge-sim demo` starts three real child processes, each in its own process group so a Ctrl-C
in the terminal reaches only the demo, which then stops them in order:

1. `edge-sim cloud` on the port of the config's http upstream (ready: it prints `LISTENING`);
2. `edge-sim serial` on the config's serial input port, a symlink (ready: it prints `PORT`);
3. `edge-agent run CONFIG` (ready: it writes `<data_dir>/status.json` with its own pid).

The view reads what the agent publishes and never writes anything: `status.json` (inputs,
upstreams), the event log opened read-only (upstream lag from the cursors, the latest window
means, alerts) and the cloud's `GET /api/summary`. On Ctrl-C, SIGTERM or the end of
`--duration` the agent is stopped first (SIGTERM; it drains into the log and commits), then
the simulator and the cloud, and one summary line is printed. A child that dies early stops
the demo: the others are stopped and the tail of its log is printed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from agent.config import (
    AgentConfig,
    ConfigError,
    HttpUpstreamConfig,
    RuleConfig,
    SerialInputConfig,
    load_config,
)
from agent.log import HEADS_SQL
from agent.status import STATUS_FILE, is_running

READINGS, AGGREGATES, ALERTS = 1, 2, 3  # agent.log.STREAM_CODES
STREAM_NAMES = {1: "readings", 2: "aggregates", 3: "alerts", 4: "agent", 5: "deadletter"}
LOCAL_HOSTS = ("127.0.0.1", "localhost")

START_TIMEOUT = 15.0  # seconds for the cloud and the simulator to print their first line
AGENT_START_TIMEOUT = 30.0  # seconds for the agent's first status.json
CHILD_STOP_TIMEOUT = 5.0  # seconds for the simulator and the cloud to exit after SIGTERM
REFRESH = 0.5  # seconds between two frames of the live view
PLAIN_EVERY = 5.0  # seconds between two status lines when stdout is not a terminal
TAIL_LINES = 20
SHOWN_ALERTS = 5


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class DemoPlan:
    """What the demo starts, all taken from the agent's config."""

    config_path: Path
    cfg: AgentConfig
    data_dir: Path
    serial: SerialInputConfig
    link: Path
    upstream: HttpUpstreamConfig
    port: int
    cloud_db: Path

    @property
    def log_path(self) -> Path:
        return self.cfg.log_path

    @property
    def status_path(self) -> Path:
        return self.data_dir / STATUS_FILE

    @property
    def consumer(self) -> str:
        """The upstream's consumer name in the log's cursors table (see agent.upstream_http)."""
        return f"upstream:{self.upstream.name}"

    def child_log(self, name: str) -> Path:
        return self.data_dir / f"{name}.log"


def make_plan(config_path: Path) -> DemoPlan:
    """Load the config and pick the serial input and http upstream the demo stands in for."""
    try:
        cfg = load_config(config_path)
    except ConfigError as exc:
        raise DemoError(f"{config_path} is not a valid agent config:\n{exc}") from None
    serial = next((i for i in cfg.inputs if isinstance(i, SerialInputConfig)), None)
    if serial is None:
        raise DemoError(f"{config_path}: the demo needs a serial input for its simulator")
    upstream = next((u for u in cfg.upstreams if isinstance(u, HttpUpstreamConfig)), None)
    if upstream is None:
        raise DemoError(f"{config_path}: the demo needs an http upstream for its local cloud")
    url = urllib.parse.urlsplit(upstream.url)
    if url.scheme != "http" or url.hostname not in LOCAL_HOSTS:
        raise DemoError(
            f"{config_path}: upstream {upstream.name!r} goes to {upstream.url}; the demo runs "
            "its own cloud, so the url must be http://127.0.0.1:PORT/ingest"
        )
    if url.path != "/ingest":
        raise DemoError(
            f"{config_path}: upstream {upstream.name!r}: the demo's cloud takes POST /ingest, "
            f"not {url.path or '/'}"
        )
    try:
        port = url.port or 80
    except ValueError as exc:
        raise DemoError(f"{config_path}: upstream url {upstream.url}: {exc}") from None
    data_dir = cfg.agent.data_dir
    return DemoPlan(
        config_path=config_path,
        cfg=cfg,
        data_dir=data_dir,
        serial=serial,
        link=Path(serial.port),
        upstream=upstream,
        port=port,
        cloud_db=data_dir / "cloud.db",
    )


# --------------------------------------------------------------------------- children


@dataclass(slots=True)
class Child:
    """One child process, its stderr (and stdout, once read) going to a log file."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    first_line: str = ""

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self, lines: int = TAIL_LINES) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            return f"(cannot read {self.log_path}: {exc.strerror})"
        return "\n".join(text.rstrip("\n").splitlines()[-lines:]) or "(empty)"

    def read_first_line(self, deadline: float, stop: threading.Event) -> str:
        """The child's first stdout line; then the rest of its stdout goes to its log."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        buf = b""
        while b"\n" not in buf:
            if stop.is_set():
                raise DemoError("interrupted while starting")
            left = deadline - time.monotonic()
            if left <= 0:
                raise ChildFailed(self, f"did not start within {START_TIMEOUT:.0f}s")
            ready, _, _ = select.select([fd], [], [], min(left, 0.2))
            if not ready:
                continue
            chunk = os.read(fd, 4096)
            if not chunk:
                self.proc.wait(timeout=5)
                raise ChildFailed(self, f"exited with status {self.proc.returncode}")
            buf += chunk
        line, _, rest = buf.partition(b"\n")
        threading.Thread(
            target=_drain, args=(fd, rest, self.log_path), name=f"{self.name}-stdout", daemon=True
        ).start()
        self.first_line = line.decode(errors="replace").strip()
        return self.first_line

    def stop(self, timeout: float) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL; the exit status (negative: a signal)."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                _say(f"{self.name} (pid {self.pid}) did not exit in {timeout:.0f}s: killing it")
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class ChildFailed(DemoError):
    """A child process could not start or died."""

    def __init__(self, child: Child, what: str) -> None:
        super().__init__(f"{child.name} (pid {child.pid}) {what}")
        self.child = child


def _drain(fd: int, already: bytes, log_path: Path) -> None:
    """Copy a child's stdout after its first line into its log, until it closes."""
    with contextlib.suppress(OSError), open(log_path, "ab") as out:
        if already:
            out.write(already)
            out.flush()
        while chunk := os.read(fd, 4096):
            out.write(chunk)
            out.flush()


def _spawn(name: str, args: list[str], log_path: Path, *, pipe_stdout: bool) -> Child:
    log_path.write_bytes(b"")  # each run starts its own log; O_APPEND below shares it
    with open(log_path, "ab") as log_file:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if pipe_stdout else log_file,
            stderr=log_file,
            env=env,
            # Its own process group: a Ctrl-C in the terminal reaches only the demo, which
            # then stops the children in order.
            process_group=0,
        )
    return Child(name, proc, log_path)


# --------------------------------------------------------------------------- what the view reads


@dataclass(slots=True)
class AlertRow:
    kind: str
    time: float
    sensor: str
    value: float | None
    unit: str | None
    rule: str


@dataclass(slots=True)
class LogView:
    """What the view takes from the agent's event log (opened read-only)."""

    heads: dict[int, int] = field(default_factory=dict)
    waiting: dict[str, int] = field(default_factory=dict)  # per stream: not yet acknowledged
    last: dict[str, tuple[float | None, str | None]] = field(default_factory=dict)
    means: dict[str, tuple[float | None, str | None, float, str]] = field(default_factory=dict)
    alerts: list[AlertRow] = field(default_factory=list)  # newest first
    raised: int = 0
    cleared: int = 0
    active: list[str] = field(default_factory=list)


@dataclass(slots=True)
class Snapshot:
    now: float
    status: dict[str, Any]
    log: LogView | None
    cloud: dict[str, Any] | None
    cloud_error: str | None


def _connect_ro(path: Path, *, writer_gone: bool = False) -> sqlite3.Connection:
    """A read-only connection to the agent's log.

    `writer_gone`: the agent has exited; if it also folded its WAL back and removed it, read
    the file as immutable, which (unlike `mode=ro`) creates no -wal/-shm files of its own.
    """
    query = "mode=ro"
    if writer_gone and not Path(f"{path}-wal").exists():
        query = "immutable=1"
    uri = f"file:{urllib.parse.quote(str(path.resolve()))}?{query}"
    conn = sqlite3.connect(uri, uri=True, timeout=1.0, isolation_level=None)
    conn.execute("PRAGMA query_only=1")
    return conn


def read_log(conn: sqlite3.Connection, consumer: str) -> LogView:
    """Heads, the upstream's lag, latest values and means per sensor, and alerts."""
    view = LogView()
    view.heads = {int(s): int(q) for s, q in conn.execute(HEADS_SQL)}
    for stream, seq in conn.execute(
        "SELECT stream, seq FROM cursors WHERE consumer=?", (consumer,)
    ):
        behind = view.heads.get(stream, 0) - seq
        view.waiting[STREAM_NAMES.get(stream, str(stream))] = max(0, behind)
    for sensor, value, unit in conn.execute(
        "SELECT sensor, value, unit FROM events WHERE stream=? AND seq>? ORDER BY seq",
        (READINGS, view.heads.get(READINGS, 0) - 500),
    ):
        view.last[sensor] = (value, unit)
    for sensor, value, unit, t, data in conn.execute(
        "SELECT sensor, value, unit, time, data FROM events WHERE stream=? AND seq>? ORDER BY seq",
        (AGGREGATES, view.heads.get(AGGREGATES, 0) - 500),
    ):
        window = _json(data).get("window", "")
        view.means[sensor] = (value, unit, t, str(window))
    raised: dict[str, str] = {}
    for kind, t, sensor, value, unit, data in conn.execute(
        "SELECT kind, time, sensor, value, unit, data FROM events WHERE stream=? ORDER BY seq",
        (ALERTS,),
    ):
        d = _json(data)
        alert_id = str(d.get("alert_id", ""))
        if kind == "alert.raised":
            view.raised += 1
            raised[alert_id] = sensor
        elif kind == "alert.cleared":
            view.cleared += 1
            raised.pop(alert_id, None)
        view.alerts.append(AlertRow(kind, t, sensor, value, unit, str(d.get("rule", ""))))
    view.alerts = view.alerts[::-1][:SHOWN_ALERTS]
    view.active = sorted(raised.values())
    return view


def _json(text: Any) -> dict[str, Any]:
    if not isinstance(text, str):
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


class Sampler:
    """Reads the agent's status file, its log (read-only) and the cloud's summary."""

    def __init__(self, plan: DemoPlan) -> None:
        self.plan = plan
        self.summary_url = f"http://127.0.0.1:{plan.port}/api/summary"
        self._conn: sqlite3.Connection | None = None

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def status(self) -> dict[str, Any]:
        try:
            return _json(self.plan.status_path.read_text())
        except OSError:
            return {}

    def log(self) -> LogView | None:
        try:
            if self._conn is None:
                self._conn = _connect_ro(self.plan.log_path)
            return read_log(self._conn, self.plan.consumer)
        except sqlite3.Error:
            self.close()  # the next frame reconnects
            return None

    def cloud(self) -> tuple[dict[str, Any] | None, str | None]:
        try:
            with urllib.request.urlopen(self.summary_url, timeout=1.0) as resp:
                return _json(resp.read().decode()), None
        except (OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            return None, str(reason)

    def snapshot(self) -> Snapshot:
        cloud, error = self.cloud()
        return Snapshot(time.time(), self.status(), self.log(), cloud, error)


# --------------------------------------------------------------------------- rendering


def _clock(t: float | None) -> str:
    return "--:--:--" if t is None else time.strftime("%H:%M:%S", time.localtime(t))


def _num(value: float | None, unit: str | None, decimals: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:.{decimals}f}" + (f" {unit}" if unit else "")


def _elapsed(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


def _inputs(status: dict[str, Any]) -> tuple[int, float, dict[str, int], bool]:
    """Readings, readings/s and bad input by kind over all inputs, and whether all connected."""
    readings, rate, bad, connected = 0, 0.0, dict[str, int](), True
    for item in status.get("inputs", {}).values():
        readings += int(item.get("readings", 0))
        rate += float(item.get("rate", 0.0))
        connected = connected and bool(item.get("connected"))
        for kind, n in item.get("rejected", {}).items():
            bad[kind] = bad.get(kind, 0) + int(n)
    return readings, rate, bad, connected and bool(status.get("inputs"))


def _upstream(status: dict[str, Any], name: str) -> dict[str, Any]:
    found = status.get("upstreams", {}).get(name)
    return found if isinstance(found, dict) else {}


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _bad_text(bad: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(bad.items())) or "none"


def _rule_text(rule: RuleConfig) -> str:
    """One line saying what a rule watches, whatever its condition."""
    conditions = [
        f"{name} {value}"
        for name, value in (
            ("above", rule.above),
            ("below", rule.below),
            ("outside", rule.outside),
            ("inside", rule.inside),
            ("no reading for", rule.stale and f"{rule.stale:g}s"),
            ("clears below", rule.clear_below),
            ("clears above", rule.clear_above),
        )
        if value is not None
    ]
    sensors = rule.sensors if isinstance(rule.sensors, str) else ",".join(rule.sensors)
    return f"{rule.name}: {sensors} {rule.window or 'readings'} {', '.join(conditions)}"


def render(plan: DemoPlan, snap: Snapshot, elapsed: float, footer: str) -> RenderableType:
    """One frame of the live view."""
    status, logv, cloud = snap.status, snap.log, snap.cloud
    readings, rate, bad, connected = _inputs(status)

    head = Text()
    head.append("edge-agent demo", style="bold")
    head.append(f"  up {_elapsed(elapsed)}  ·  agent {plan.cfg.agent.name}")
    head.append(f" (pid {status.get('pid', '-')})  ·  Ctrl-C stops", style="dim")

    inputs = Text("Readings in  ")
    inputs.append(f"{readings}", style="bold")
    inputs.append(f" total  {rate:5.1f}/s  ")
    inputs.append("connected" if connected else "not connected", "green" if connected else "red")
    inputs.append("  ·  bad input: ")
    inputs.append(_bad_text(bad), style="yellow" if bad else "")

    sensors = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False, expand=False)
    names = sorted(set(logv.last) | set(logv.means)) if logv is not None else []
    sensors.add_column("sensor", min_width=max([6, *(len(n) + 2 for n in names)]))
    sensors.add_column("last reading", justify="right")
    sensors.add_column("window mean", justify="right")
    sensors.add_column("window", style="dim")
    sensors.add_column("at", style="dim")
    if logv is not None:
        for name in names:
            value, unit = logv.last.get(name, (None, None))
            mean = logv.means.get(name)
            active = name in logv.active
            sensors.add_row(
                Text(name + (" !" if active else ""), style="bold red" if active else ""),
                _num(value, unit),
                _num(mean[0], mean[1]) if mean else "-",
                mean[3] if mean else "",
                _clock(mean[2]) if mean else "",
            )

    rule_texts = "; ".join(_rule_text(r) for r in plan.cfg.processing.rules)
    rules = Text("  " + (rule_texts or "no rules"), style="dim", no_wrap=True, overflow="ellipsis")
    alerts = Table(box=None, pad_edge=False, show_header=False, expand=False)
    for _ in range(5):
        alerts.add_column()
    title = Text("Alerts  ")
    if logv is not None:
        title.append(f"{logv.raised} raised, {logv.cleared} cleared")
        title.append(
            f"  ·  active: {', '.join(logv.active) or 'none'}",
            style="bold red" if logv.active else "",
        )
        for a in logv.alerts:
            raised = a.kind == "alert.raised"
            alerts.add_row(
                "  " + _clock(a.time),
                Text("RAISED " if raised else "cleared", style="bold red" if raised else "green"),
                a.sensor,
                _num(a.value, a.unit),
                Text(a.rule, style="dim"),
            )
        if not logv.alerts:
            alerts.add_row("  (none yet)", "", "", "", "")

    up = _upstream(status, plan.upstream.name)
    upline = Text(f"Upstream {plan.upstream.name}  sent ")
    upline.append(str(up.get("sent", 0)), style="bold")
    upline.append("  ·  lag ")
    if logv is None:
        upline.append("-")
    else:
        waiting = sum(logv.waiting.values())
        upline.append(
            _plural(waiting, "event"),
            style="bold yellow" if waiting > plan.upstream.batch_size else "",
        )
        detail = ", ".join(f"{s} {n}" for s, n in logv.waiting.items() if n)
        upline.append(f" ({detail})" if detail else " (all acknowledged)", style="dim")
    failures = int(up.get("failures", 0))
    if failures:
        upline.append(f"  ·  failures {failures}", style="yellow")
    last_error = up.get("last_error")

    cloudline = Text("Cloud  ")
    if cloud is None:
        cloudline.append(f"unreachable: {snap.cloud_error}", style="red")
    else:
        cloudline.append(str(cloud.get("total", 0)), style="bold")
        cloudline.append(f" events stored  ·  {cloud.get('duplicates', 0)} duplicates")
        lag = cloud.get("upstream_lag")
        cloudline.append("  ·  newest " + ("-" if lag is None else f"{lag:.1f}s behind"))
        cloudline.append(f"  ·  {cloud.get('recent', 0)} in 10s", style="dim")

    parts: list[RenderableType] = [head, Text(""), inputs, Text(""), sensors]
    parts += [Text(""), title, rules, alerts]
    parts += [Text(""), upline, cloudline]
    if last_error and failures:
        parts.append(Text(f"  last error: {last_error}", style="yellow"))
    parts += [Text(""), Text(footer, style="dim")]
    return Group(*parts)


def plain_line(plan: DemoPlan, snap: Snapshot, elapsed: float) -> str:
    """The status line printed instead of the live view when stdout is not a terminal."""
    readings, rate, bad, _ = _inputs(snap.status)
    logv = snap.log
    parts = [
        f"[{_elapsed(elapsed)}] readings {readings} ({rate:.1f}/s)",
        f"bad {sum(bad.values())}",
    ]
    if logv is not None:
        means = " ".join(
            f"{s}={v[0]:.2f}" for s, v in sorted(logv.means.items()) if v[0] is not None
        )
        parts.append(f"means {means or '-'}")
        parts.append(f"alerts {logv.raised} raised/{logv.cleared} cleared")
        parts.append(f"waiting upstream {sum(logv.waiting.values())}")
    if snap.cloud is not None:
        lag = snap.cloud.get("upstream_lag")
        parts.append(
            f"cloud {snap.cloud.get('total', 0)} stored, {snap.cloud.get('duplicates', 0)} dup, "
            f"lag {'-' if lag is None else f'{lag:.1f}s'}"
        )
    else:
        parts.append(f"cloud unreachable ({snap.cloud_error})")
    return " | ".join(parts)


# --------------------------------------------------------------------------- the demo


@dataclass(slots=True)
class Baseline:
    """Counts before this run, so the summary speaks of this run only."""

    readings: int = 0
    alerts: int = 0
    cloud_total: int = 0
    cloud_readings: int = 0
    cloud_duplicates: int = 0


def _log_heads(path: Path) -> dict[int, int]:
    if not path.exists():
        return {}
    conn = _connect_ro(path, writer_gone=True)
    try:
        return {int(s): int(q) for s, q in conn.execute(HEADS_SQL)}
    except sqlite3.Error:
        return {}
    finally:
        conn.close()


def _cloud_counts(path: Path) -> tuple[int, int, int]:
    """(events, readings, duplicates) stored by the cloud so far."""
    if not path.exists():
        return 0, 0, 0
    from simulator.cloud import CloudStore

    try:
        with CloudStore(path) as store:
            return store.count(), store.count("readings"), store.duplicates()
    except sqlite3.Error:
        return 0, 0, 0


def _port_taken(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # The same option aiohttp binds with, so a port in TIME_WAIT does not count as taken.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return True
            raise
    return False


class Demo:
    """One run of the demo; `run()` returns the exit status."""

    def __init__(
        self,
        plan: DemoPlan,
        *,
        rate: float,
        sensors: str,
        duration: float | None,
        fresh: bool,
        faults: dict[str, int | None] | None = None,
        console: Console | None = None,
    ) -> None:
        self.plan = plan
        self.rate = rate
        self.sensors = sensors
        self.duration = duration
        self.fresh = fresh
        self.faults = faults or {}
        self.console = console or Console()
        self.children: dict[str, Child] = {}
        self.stop_requested = threading.Event()
        self.baseline = Baseline()

    # --- the whole run ---------------------------------------------------------------------

    def run(self) -> int:
        previous = {
            sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)
        }
        try:
            return self._run()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested.set()

    def _run(self) -> int:
        try:
            self._prepare()
            self._start_children()
        except ChildFailed as exc:
            self._stop_children()
            self._report_failure(exc)
            return 1
        except (DemoError, OSError) as exc:
            self._stop_children()
            _say(f"edge-sim demo: {exc}")
            return 1
        failed: ChildFailed | None = None
        try:
            self._watch()
        except ChildFailed as exc:
            failed = exc
        codes = self._stop_children()
        if failed is not None:
            self._report_failure(failed)
            return 1
        unclean = {n: c for n, c in codes.items() if c != 0}
        print(self._summary(), flush=True)
        if unclean:
            for name, code in unclean.items():
                _say(f"{name} exited with status {code}; see {self.children[name].log_path}")
            return 1
        return 0

    def _prepare(self) -> None:
        plan = self.plan
        plan.data_dir.mkdir(parents=True, exist_ok=True)
        plan.link.parent.mkdir(parents=True, exist_ok=True)
        status = Sampler(plan).status()
        pid = status.get("pid")
        if is_running(status):
            raise DemoError(
                f"an agent (pid {pid}) is already running on {plan.data_dir}: "
                "is another demo running? Stop it first."
            )
        if _port_taken(plan.port):
            raise DemoError(
                f"port {plan.port} on 127.0.0.1 is already in use, so the demo's cloud cannot "
                f"listen there: stop what uses it (is another demo running?) or change "
                f"upstreams[].url in {plan.config_path}"
            )
        if plan.link.is_symlink():
            plan.link.unlink()  # a stale link from a simulator that did not exit cleanly
        elif plan.link.exists():
            raise DemoError(f"{plan.link} exists and is not a symlink; the simulator needs it")
        if self.fresh:
            for name in ("events.db", "events.db-wal", "events.db-shm", "status.json"):
                (plan.data_dir / name).unlink(missing_ok=True)
            for suffix in ("", "-wal", "-shm"):
                Path(f"{plan.cloud_db}{suffix}").unlink(missing_ok=True)
        heads = _log_heads(plan.log_path)
        cloud_total, cloud_readings, cloud_dups = _cloud_counts(plan.cloud_db)
        self.baseline = Baseline(
            heads.get(READINGS, 0), heads.get(ALERTS, 0), cloud_total, cloud_readings, cloud_dups
        )

    def _start_children(self) -> None:
        plan, py = self.plan, sys.executable
        logs = ", ".join(str(plan.child_log(n)) for n in ("agent", "cloud", "serial"))
        _say(f"edge-sim demo: child logs in {logs}")

        args = [py, "-m", "simulator.cli", "cloud", "--port", str(plan.port)]
        args += ["--db", str(plan.cloud_db)]
        cloud = self._spawn("cloud", args, pipe_stdout=True)
        line = cloud.read_first_line(time.monotonic() + START_TIMEOUT, self.stop_requested)
        if not line.startswith("LISTENING "):
            raise ChildFailed(cloud, f"printed {line!r} instead of LISTENING")
        _say(f"cloud:  {line.removeprefix('LISTENING ')} (pid {cloud.pid}), db {plan.cloud_db}")

        args = [py, "-m", "simulator.cli", "serial", "--link", str(plan.link)]
        args += ["--format", plan.serial.format, "--rate", f"{self.rate:g}"]
        args += ["--sensors", self.sensors]
        for option, every in self.faults.items():
            if every is not None:
                args += [f"--{option}", str(every)]
        serial = self._spawn("serial", args, pipe_stdout=True)
        line = serial.read_first_line(time.monotonic() + START_TIMEOUT, self.stop_requested)
        if not line.startswith("PORT "):
            raise ChildFailed(serial, f"printed {line!r} instead of PORT")
        _say(f"serial: {plan.link} -> {line.removeprefix('PORT ')} (pid {serial.pid})")

        agent = self._spawn(
            "agent", [py, "-m", "agent", "run", str(plan.config_path)], pipe_stdout=False
        )
        self._wait_for_agent(agent)
        _say(f"agent:  pid {agent.pid}, log {plan.log_path}")

    def _spawn(self, name: str, args: list[str], *, pipe_stdout: bool) -> Child:
        child = _spawn(name, args, self.plan.child_log(name), pipe_stdout=pipe_stdout)
        self.children[name] = child
        return child

    def _wait_for_agent(self, agent: Child) -> None:
        deadline = time.monotonic() + AGENT_START_TIMEOUT
        sampler = Sampler(self.plan)
        while sampler.status().get("pid") != agent.pid:
            if not agent.alive():
                raise ChildFailed(agent, f"exited with status {agent.proc.returncode}")
            if self.stop_requested.is_set():
                raise DemoError("interrupted while starting")
            if time.monotonic() > deadline:
                raise ChildFailed(
                    agent, f"wrote no {self.plan.status_path} within {AGENT_START_TIMEOUT:.0f}s"
                )
            self.stop_requested.wait(0.1)

    # --- watching --------------------------------------------------------------------------

    def _frames(self) -> Iterator[float]:
        """Elapsed seconds at each frame, until a stop is asked for or --duration is over."""
        start = time.monotonic()
        while True:
            elapsed = time.monotonic() - start
            if self.stop_requested.is_set():
                return
            if self.duration is not None and elapsed >= self.duration:
                return
            self._check_children()
            yield elapsed
            wait = REFRESH
            if self.duration is not None:
                wait = max(0.0, min(wait, self.duration - (time.monotonic() - start)))
            self.stop_requested.wait(wait)

    def _check_children(self) -> None:
        for child in self.children.values():
            if not child.alive():
                raise ChildFailed(child, f"exited early with status {child.proc.returncode}")

    def _watch(self) -> None:
        sampler = Sampler(self.plan)
        logs = self.plan.child_log("{agent,cloud,serial}")
        footer = f"child logs: {logs}"
        try:
            if self.console.is_terminal:
                with Live(console=self.console, auto_refresh=False, transient=False) as live:
                    for elapsed in self._frames():
                        frame = render(self.plan, sampler.snapshot(), elapsed, footer)
                        live.update(frame, refresh=True)
            else:
                last = -PLAIN_EVERY
                for elapsed in self._frames():
                    if elapsed - last >= PLAIN_EVERY:
                        last = elapsed
                        print(plain_line(self.plan, sampler.snapshot(), elapsed), flush=True)
        finally:
            # Before the agent stops: the last reader of a WAL database lets it clean up.
            sampler.close()

    # --- stopping --------------------------------------------------------------------------

    def _stop_children(self) -> dict[str, int]:
        """Stop the agent first (it drains and commits), then the simulator, then the cloud."""
        codes: dict[str, int] = {}
        timeouts = {"agent": self.plan.cfg.agent.shutdown_timeout + 5.0}
        started = [n for n in ("agent", "serial", "cloud") if n in self.children]
        running = [n for n in started if self.children[n].alive()]
        if running:
            _say("edge-sim demo: stopping " + ", ".join(running))
        for name in started:
            child = self.children[name]
            codes[name] = child.stop(timeouts.get(name, CHILD_STOP_TIMEOUT))
        return codes

    def _report_failure(self, exc: ChildFailed) -> None:
        child = exc.child
        _say(f"edge-sim demo: {exc}; last lines of {child.log_path}:")
        width = shutil.get_terminal_size((100, 20)).columns
        for line in child.tail().splitlines():
            _say("  " + line[: max(20, width - 2)])

    def _summary(self) -> str:
        b = self.baseline
        heads = _log_heads(self.plan.log_path)
        readings = heads.get(READINGS, 0) - b.readings
        raised = cleared = 0
        waiting = 0
        if self.plan.log_path.exists():
            conn = _connect_ro(self.plan.log_path, writer_gone=True)
            try:
                for kind, n in conn.execute(
                    "SELECT kind, count(*) FROM events WHERE stream=? AND seq>? GROUP BY kind",
                    (ALERTS, b.alerts),
                ):
                    raised += n if kind == "alert.raised" else 0
                    cleared += n if kind == "alert.cleared" else 0
                waiting = sum(read_log(conn, self.plan.consumer).waiting.values())
            except sqlite3.Error:
                pass
            finally:
                conn.close()
        total, cloud_readings, dups = _cloud_counts(self.plan.cloud_db)
        return (
            f"demo summary (this run): {readings} readings committed, "
            f"{total - b.cloud_total} events delivered to the cloud "
            f"({cloud_readings - b.cloud_readings} readings), "
            f"{dups - b.cloud_duplicates} duplicates, "
            f"alerts {raised} raised/{cleared} cleared, "
            f"{waiting} not yet acknowledged by the cloud (sent again next run)"
        )


def run_demo(
    config: Path,
    *,
    rate: float = 5.0,
    sensors: str = "3",
    duration: float | None = None,
    fresh: bool = False,
    garble_every: int | None = None,
    nan_every: int | None = None,
) -> int:
    """Run the demo; the exit status (0: stopped cleanly).

    `garble_every`/`nan_every` make the simulator send bad lines, to show bad input counted.
    """
    faults = {"garble-every": garble_every, "nan-every": nan_every}
    try:
        plan = make_plan(config.resolve())
    except DemoError as exc:
        _say(f"edge-sim demo: {exc}")
        return 1
    demo = Demo(plan, rate=rate, sensors=sensors, duration=duration, fresh=fresh, faults=faults)
    return demo.run()
