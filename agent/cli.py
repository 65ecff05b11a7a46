"""The `edge-agent` command line: run, check, status, tail."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from agent.config import AgentConfig
from agent.daemon import load_or_explain
from agent.events import Stream
from agent.log import CODE_STREAMS, HEADS_SQL, STREAM_CODES
from agent.status import is_running, read_live

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="edge-agent: sensors in, a durable event log, windows and alerts, forwarding upstream.",
)

ConfigArg = Annotated[Path, typer.Argument(help="The agent's YAML config file.")]


def _load(config: Path) -> AgentConfig:
    cfg = load_or_explain(config)
    if cfg is None:
        raise typer.Exit(1)
    return cfg


@app.command()
def check(config: ConfigArg) -> None:
    """Validate CONFIG: print `ok`, or every error as FILE:LINE:COL: field: message."""
    _load(config)
    typer.echo("ok")


@app.command()
def run(config: ConfigArg) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    from agent.daemon import run_agent

    code = run_agent(config)
    if code:
        raise typer.Exit(code)


def _open_ro(cfg: AgentConfig) -> sqlite3.Connection:
    path = cfg.log_path
    if not path.exists():
        typer.echo(f"no log at {path}: the agent has not run with this config yet", err=True)
        raise typer.Exit(1)
    return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)


def collect_status(cfg: AgentConfig) -> dict[str, Any]:
    """Everything `status` shows: the log's streams and cursors, and the agent's live figures."""
    db = _open_ro(cfg)
    try:
        log_id = db.execute("SELECT value FROM meta WHERE key='log_id'").fetchone()[0]
        heads = dict(db.execute(HEADS_SQL).fetchall())
        streams: dict[str, Any] = {}
        for stream, code in STREAM_CODES.items():
            count, lo = db.execute(
                "SELECT count(*), min(seq) FROM events WHERE stream=?", (code,)
            ).fetchone()
            streams[stream.value] = {"head": heads.get(code, 0), "oldest": lo, "count": count}
        consumers = []
        for consumer, code, seq, updated in db.execute(
            "SELECT consumer, stream, seq, updated FROM cursors ORDER BY consumer, stream"
        ):
            head = heads.get(code, 0)
            consumers.append(
                {
                    "consumer": consumer,
                    "stream": CODE_STREAMS[code].value,
                    "cursor": seq,
                    "lag": head - seq,
                    "updated": updated,
                }
            )
        page_size, pages, free = (
            db.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("page_size", "page_count", "freelist_count")
        )
    finally:
        db.close()
    wal = Path(f"{cfg.log_path}-wal")
    size = (pages - free) * page_size + (wal.stat().st_size if wal.exists() else 0)
    live = read_live(cfg.agent.data_dir)
    running = is_running(live)
    return {
        "log": {
            "path": str(cfg.log_path),
            "log_id": log_id,
            "bytes": size,
            "quota": cfg.log.quota,
        },
        "running": running,
        "streams": streams,
        "consumers": consumers,
        "agent": live,
    }


@app.command()
def status(
    config: ConfigArg,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Show streams, consumers and their lag, inputs and upstreams."""
    cfg = _load(config)
    info = collect_status(cfg)
    if as_json:
        typer.echo(json.dumps(info, indent=1))
        return
    # rich is imported by the commands that draw with it, never at the top: `run` would carry
    # its MiB for the agent's whole life (issue 7).
    from rich.console import Console
    from rich.table import Table

    console = Console()
    logi = info["log"]
    state = "running" if info["running"] else "not running"
    used, quota = logi["bytes"] / 2**20, logi["quota"] / 2**20
    console.print(
        f"[bold]{cfg.agent.name}[/] {state} · log {logi['path']} (id {logi['log_id']})"
        f" · {used:.1f} MiB of {quota:.0f} MiB quota"
    )
    from agent.health import status_lines

    for line in status_lines(info["agent"], running=info["running"]):
        console.print(line)
    t = Table("stream", "head seq", "oldest seq", "events", title="Streams")
    for name, s in info["streams"].items():
        t.add_row(name, str(s["head"]), str(s["oldest"] or "-"), str(s["count"]))
    console.print(t)
    t = Table("consumer", "stream", "cursor", "lag", title="Consumers")
    for c in info["consumers"]:
        t.add_row(c["consumer"], c["stream"], str(c["cursor"]), str(c["lag"]))
    console.print(t)
    live = info["agent"]
    if live.get("inputs"):
        t = Table(
            "input",
            "connected",
            "readings",
            "readings/s",
            "bad input",
            "last error",
            title="Inputs",
        )
        for name, i in live["inputs"].items():
            bad = ", ".join(f"{k}={v}" for k, v in i["rejected"].items()) or "-"
            t.add_row(
                name,
                "yes" if i["connected"] else "no",
                str(i["readings"]),
                f"{i['rate']:.1f}",
                bad,
                i["last_error"] or "-",
            )
        console.print(t)
    if live.get("upstreams"):
        t = Table("upstream", "sent", "failures", "last success", "last error", title="Upstreams")
        for name, u in live["upstreams"].items():
            t.add_row(
                name,
                str(u["sent"]),
                str(u["failures"]),
                _ago(u["last_success"]),
                u["last_error"] or "-",
            )
        console.print(t)


def _ago(t: float | None) -> str:
    return "-" if t is None else f"{time.time() - t:.0f}s ago"


@app.command()
def tail(
    config: ConfigArg,
    stream: Annotated[
        Stream, typer.Option("--stream", "-s", help="Which stream.")
    ] = Stream.READINGS,
    last: Annotated[int, typer.Option("--last", "-n", help="Start this many events back.")] = 10,
    follow: Annotated[bool, typer.Option("--follow/--no-follow", "-f")] = True,
) -> None:
    """Print a stream's events as JSON lines, following new ones (Ctrl-C to stop)."""
    cfg = _load(config)
    db = _open_ro(cfg)
    log_id = db.execute("SELECT value FROM meta WHERE key='log_id'").fetchone()[0]
    code = STREAM_CODES[stream]
    head = db.execute("SELECT max(seq) FROM events WHERE stream=?", (code,)).fetchone()[0] or 0
    after = max(0, head - last)
    from agent.log import _SELECT, _to_event

    try:
        while True:
            rows = db.execute(
                _SELECT + " WHERE stream=? AND seq>? ORDER BY seq LIMIT 1000", (code, after)
            ).fetchall()
            for row in rows:
                event = _to_event(stream, row)
                typer.echo(json.dumps(event.to_wire(log_id)))
                after = event.seq
            if not follow and len(rows) < 1000:
                return
            if not rows:
                # Another process writes the log; a short poll is the simple, portable follow.
                time.sleep(0.5)
    except KeyboardInterrupt:
        return
    finally:
        db.close()


# --------------------------------------------------------------------------- plan, replay

#: Bytes a reading takes in the log when there is no log to measure yet (bench/log_append.py
#: measures 76 on the schema of this version).
ESTIMATED_EVENT_BYTES = 80.0
#: How many of the newest events of a stream the measured rate is taken over.
RATE_SAMPLE = 10_000


def measure_log(cfg: AgentConfig) -> dict[str, Any] | None:
    """Bytes per event, event rates (from the receive times of each stream's newest events)
    and every upstream's backlog, read from the log; None when there is no log yet."""
    if not cfg.log_path.exists():
        return None
    db = _open_ro(cfg)
    try:
        heads = dict(db.execute(HEADS_SQL).fetchall())
        total = 0
        rates: dict[str, float] = {}
        for stream, code in STREAM_CODES.items():
            (count,) = db.execute("SELECT count(*) FROM events WHERE stream=?", (code,)).fetchone()
            total += count
            n, first, last = db.execute(
                "SELECT count(*), min(recv_time), max(recv_time) FROM events"
                " WHERE stream=? AND seq>?",
                (code, heads.get(code, 0) - RATE_SAMPLE),
            ).fetchone()
            if n >= 2 and last > first:
                rates[stream.value] = (n - 1) / (last - first)
        backlog: dict[str, int] = {}
        for consumer, code, seq in db.execute("SELECT consumer, stream, seq FROM cursors"):
            if consumer.startswith("upstream:"):
                name = consumer.removeprefix("upstream:")
                backlog[name] = backlog.get(name, 0) + max(0, heads.get(code, 0) - seq)
        page_size, pages, free = (
            db.execute(f"PRAGMA {p}").fetchone()[0]
            for p in ("page_size", "page_count", "freelist_count")
        )
    finally:
        db.close()
    used = (pages - free) * page_size
    return {
        "events": total,
        "bytes": used,
        "bytes_per_event": used / total if total >= 1000 else None,
        "rates": rates,
        "backlog": backlog,
    }


def offline_plan(cfg: AgentConfig, rate: float | None = None) -> dict[str, Any]:
    """How many hours offline the disk quota holds, and where each figure comes from.

    The rate is, first found: `rate` (given), the log's (events of every stream received
    lately), the running agent's (its inputs' readings/s in status.json), the configured one
    (simulated inputs: rate x sensors). Bytes per event are measured in the log when it holds
    1,000 events or more, else estimated. An outage fills the quota with what is not yet
    forwarded (what was forwarded goes first), and `max_age` bounds it too.
    """
    measured = measure_log(cfg)
    live = read_live(cfg.agent.data_dir)
    configured = 0.0
    unknown: list[str] = []
    for i in cfg.inputs:
        if i.type == "simulated" and i.rate > 0:
            configured += i.rate * len(i.sensors)
        else:
            unknown.append(i.name)
    live_rate = (
        sum(float(i.get("rate", 0.0)) for i in live.get("inputs", {}).values())
        if is_running(live)
        else 0.0
    )
    log_rate = sum(measured["rates"].values()) if measured else 0.0
    if rate is not None:
        used_rate, source = rate, "given (--rate)"
    elif log_rate > 0:
        used_rate, source = log_rate, f"measured in the log (newest {RATE_SAMPLE:,} per stream)"
    elif live_rate > 0:
        used_rate, source = live_rate, "measured by the running agent (status)"
    elif configured > 0:
        used_rate, source = configured, "configured (simulated inputs: rate x sensors)"
    else:
        used_rate, source = 0.0, "unknown (no log, no running agent: give --rate)"
    per_event = measured["bytes_per_event"] if measured else None
    bytes_source = "measured in the log" if per_event else "estimated: too few events to measure"
    per_event = per_event or ESTIMATED_EVENT_BYTES
    quota = cfg.log.quota
    bytes_per_hour = per_event * used_rate * 3600
    hours = quota / bytes_per_hour if bytes_per_hour > 0 else None
    max_age_hours = cfg.log.max_age / 3600
    upstreams = []
    for u in cfg.upstreams:
        backlog = (measured or {}).get("backlog", {}).get(u.name, 0)
        room = max(0.0, quota - backlog * per_event)
        upstreams.append(
            {
                "name": u.name,
                "backlog_events": backlog,
                "backlog_bytes": round(backlog * per_event),
                "hours_left": room / bytes_per_hour if bytes_per_hour > 0 else None,
            }
        )
    return {
        "quota": quota,
        "bytes_per_event": round(per_event, 1),
        "bytes_source": bytes_source,
        "rate": round(used_rate, 3),
        "rate_source": source,
        "rates": {
            "log": round(log_rate, 3),
            "log_streams": {k: round(v, 3) for k, v in (measured or {}).get("rates", {}).items()},
            "status": round(live_rate, 3),
            "configured": round(configured, 3),
            "unconfigured_inputs": unknown,
        },
        "offline_hours": None if hours is None else round(hours, 2),
        "max_age_hours": round(max_age_hours, 2),
        "holds_hours": None if hours is None else round(min(hours, max_age_hours), 2),
        "upstreams": upstreams,
    }


@app.command()
def plan(
    config: ConfigArg,
    rate: Annotated[
        float | None, typer.Option("--rate", help="Plan for this many events/s instead.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """How many hours offline the disk quota holds at the measured (or configured) rate."""
    cfg = _load(config)
    out = offline_plan(cfg, rate)
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    from rich.console import Console  # deferred, as in `status`
    from rich.table import Table

    console = Console()
    console.print(
        f"[bold]{cfg.agent.name}[/]: quota {out['quota'] / 2**20:,.0f} MiB, "
        f"{out['bytes_per_event']:.1f} bytes/event ({out['bytes_source']})"
    )
    console.print(f"rate: {out['rate']:,.1f} events/s, {out['rate_source']}")
    if out["rates"]["unconfigured_inputs"] and out["rates"]["log"] == 0:
        console.print(
            f"  inputs without a known rate: {', '.join(out['rates']['unconfigured_inputs'])}"
        )
    if out["offline_hours"] is None:
        console.print("offline: no rate to plan with (run the agent a while, or give --rate)")
        raise typer.Exit(1)
    hours, max_age = out["offline_hours"], out["max_age_hours"]
    bound = "the quota" if hours <= max_age else f"max_age ({max_age:,.1f} h)"
    console.print(
        f"[bold]offline: {out['holds_hours']:,.1f} h[/] ({out['holds_hours'] / 24:,.1f} days) "
        f"before the oldest unforwarded readings are dropped, bounded by {bound}"
    )
    if out["upstreams"]:
        t = Table("upstream", "backlog events", "backlog MiB", "hours left now", title="Upstreams")
        for u in out["upstreams"]:
            left = "-" if u["hours_left"] is None else f"{u['hours_left']:,.1f}"
            t.add_row(
                u["name"], f"{u['backlog_events']:,}", f"{u['backlog_bytes'] / 2**20:.1f}", left
            )
        console.print(t)


def parse_since(text: str, now: float | None = None) -> float:
    """Wall time from `2h ago` (or `2h`: any duration, meaning that long ago), an ISO 8601
    time (`2026-11-26T14:00`, local time unless it has an offset) or seconds since the epoch."""
    import datetime

    from agent.units import parse_duration

    now = time.time() if now is None else now
    value = text.strip()
    relative = value.removesuffix("ago").strip()
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is not None and number >= 1e9:
        return number
    try:
        return now - parse_duration(relative)
    except ValueError:
        pass
    try:
        when = datetime.datetime.fromisoformat(value)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: write `2h ago`, `30m ago`, an ISO 8601 time such as "
            "2026-11-26T14:00 (local) or 2026-11-26T13:00Z, or seconds since the epoch"
        ) from None
    return when.timestamp()


def _seq_at(db: sqlite3.Connection, code: int, since: float) -> int:
    """The seq just before the first event of a stream received at or after `since` (what
    EventLog.seq_at computes, on a read-only connection)."""
    lo, hi = db.execute("SELECT min(seq), max(seq) FROM events WHERE stream=?", (code,)).fetchone()
    if lo is None:  # nothing kept: everything so far came before `since`
        row = db.execute("SELECT seq FROM heads WHERE stream=?", (code,)).fetchone()
        return int(row[0]) if row else 0
    while lo <= hi:
        mid = (lo + hi) // 2
        row = db.execute(
            "SELECT recv_time FROM events WHERE stream=? AND seq>=? ORDER BY seq LIMIT 1",
            (code, mid),
        ).fetchone()
        if row is None or row[0] >= since:
            hi = mid - 1
        else:
            lo = mid + 1
    return int(lo - 1)


def _replay_targets(
    cfg: AgentConfig, consumer: str, streams: list[Stream], since: float
) -> dict[Stream, tuple[int, int, int]]:
    """Per stream: (cursor now, cursor to rewind to, head)."""
    db = _open_ro(cfg)
    try:
        heads = dict(db.execute(HEADS_SQL).fetchall())
        cursors = dict(
            db.execute("SELECT stream, seq FROM cursors WHERE consumer=?", (consumer,)).fetchall()
        )
        out = {}
        for s in streams:
            code = STREAM_CODES[s]
            now = int(cursors.get(code, 0))
            out[s] = (now, min(now, _seq_at(db, code, since)), int(heads.get(code, 0)))
    finally:
        db.close()
    return out


def _cursors_of(cfg: AgentConfig, consumer: str) -> dict[Stream, int]:
    db = _open_ro(cfg)
    try:
        rows = db.execute("SELECT stream, seq FROM cursors WHERE consumer=?", (consumer,))
        return {CODE_STREAMS[code]: int(seq) for code, seq in rows}
    finally:
        db.close()


@app.command()
def replay(
    config: ConfigArg,
    upstream: Annotated[str, typer.Option("--upstream", "-u", help="The upstream's name.")],
    since: Annotated[
        str, typer.Option("--since", help="From when: `2h ago`, ISO 8601, or epoch seconds.")
    ],
    stream: Annotated[
        list[Stream] | None,
        typer.Option("--stream", "-s", help="Only this stream (repeatable; default: all)."),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Show progress until the running agent caught up.")
    ] = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="Stop waiting after this many seconds.")
    ] = None,
) -> None:
    """Send an upstream everything received since TIME again (the receiver drops what it
    already has, by event id): its cursors are moved back, now if the agent is stopped, or by
    the running agent between two batches."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from agent.upstream import replay_request_path, write_replay_request

    cfg = _load(config)
    up = next((u for u in cfg.upstreams if u.name == upstream), None)
    if up is None:
        names = ", ".join(u.name for u in cfg.upstreams) or "none"
        typer.echo(f"no upstream named {upstream!r} in {config} (upstreams: {names})", err=True)
        raise typer.Exit(1)
    wanted = [Stream(s) for s in up.streams]
    for s in stream or []:
        if s not in wanted:
            typer.echo(f"upstream {upstream!r} does not forward {s.value}", err=True)
            raise typer.Exit(1)
    streams = [s for s in wanted if not stream or s in stream]
    try:
        when = parse_since(since)
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(1) from None
    consumer = f"upstream:{upstream}"
    targets = _replay_targets(cfg, consumer, streams, when)
    moves = {s: new for s, (now, new, _) in targets.items() if new < now}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    for s, (now, new, _) in targets.items():
        if new < now:
            typer.echo(f"{s.value}: cursor {now} -> {new} ({now - new:,} events sent again)")
        else:
            typer.echo(f"{s.value}: nothing sent since {stamp} yet (cursor {now})")
    if not moves:
        return
    running = is_running(read_live(cfg.agent.data_dir))
    if not running:
        asyncio.run(_rewind(cfg, consumer, moves))
        typer.echo(f"rewound; {upstream} sends them when the agent runs next")
        return
    request = write_replay_request(cfg.agent.data_dir, upstream, moves)
    deadline = time.monotonic() + 15
    while request.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    if replay_request_path(cfg.agent.data_dir, upstream).exists():
        typer.echo(
            f"asked the running agent; {upstream} takes the request at its next attempt ({request})"
        )
    else:
        typer.echo(f"the running agent rewound {upstream}")
    if not wait:
        return
    heads = {s: targets[s][2] for s in moves}
    total = sum(heads[s] - moves[s] for s in moves)
    until = None if timeout is None else time.monotonic() + timeout
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:,}/{task.total:,}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=False) as progress:
        task = progress.add_task(f"replaying to {upstream}", total=total)
        while True:
            cursors = _cursors_of(cfg, consumer)
            done = sum(max(0, min(cursors.get(s, 0), heads[s]) - moves[s]) for s in moves)
            progress.update(task, completed=done)
            if done >= total:
                break
            if until is not None and time.monotonic() > until:
                typer.echo(f"still replaying after {timeout:g}s ({done:,}/{total:,})", err=True)
                raise typer.Exit(2)
            time.sleep(0.2)


async def _rewind(cfg: AgentConfig, consumer: str, moves: dict[Stream, int]) -> None:
    from agent.log import EventLog

    async with EventLog.open(cfg.log_path, cfg.log) as event_log:
        for s, seq in moves.items():
            await event_log.rewind(consumer, s, seq=seq)


service_app = typer.Typer(help="Install or remove the systemd service (as root).")
app.add_typer(service_app, name="service")


def _run_steps(steps: list[Any], dry_run: bool) -> None:
    for step in steps:
        typer.echo(("would: " if dry_run else "") + step.describe)
        if not dry_run:
            try:
                step.run()
            except (OSError, Exception) as exc:
                typer.echo(f"failed: {step.describe}: {exc}", err=True)
                raise typer.Exit(1) from None


@service_app.command("install")
def service_install(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every step, run none.")] = False,
) -> None:
    """Create the system user, install the unit and the example config, enable and start."""
    from agent.service import ServiceError, install_steps

    if not dry_run and os.geteuid() != 0:
        typer.echo("service install needs root: sudo edge-agent service install", err=True)
        raise typer.Exit(1)
    try:
        steps = install_steps()
    except ServiceError as exc:
        typer.echo(f"service install: {exc}", err=True)
        raise typer.Exit(1) from None
    _run_steps(steps, dry_run)
    if not dry_run:
        typer.echo("installed: edit /etc/edge-agent/agent.yaml, then: systemctl restart edge-agent")


@service_app.command("uninstall")
def service_uninstall(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print every step, run none.")] = False,
) -> None:
    """Stop and remove the service; the config and the event log are kept."""
    from agent.service import uninstall_steps

    if not dry_run and os.geteuid() != 0:
        typer.echo("service uninstall needs root: sudo edge-agent service uninstall", err=True)
        raise typer.Exit(1)
    _run_steps(uninstall_steps(), dry_run)


def main() -> None:
    """Console entry point."""
    app()
