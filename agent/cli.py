"""The `edge-agent` command line: run, check, status, tail."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from agent.config import AgentConfig, ConfigError, load_config
from agent.events import Stream
from agent.log import CODE_STREAMS, STREAM_CODES
from agent.status import is_running, read_live

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="edge-agent: sensors in, a durable event log, windows and alerts, forwarding upstream.",
)

ConfigArg = Annotated[Path, typer.Argument(help="The agent's YAML config file.")]


def _load(config: Path) -> AgentConfig:
    try:
        return load_config(config)
    except ConfigError as exc:
        for issue in exc.issues:
            typer.echo(str(issue), err=True)
        raise typer.Exit(1) from None


@app.command()
def check(config: ConfigArg) -> None:
    """Validate CONFIG: print `ok`, or every error as FILE:LINE:COL: field: message."""
    _load(config)
    typer.echo("ok")


@app.command()
def run(config: ConfigArg) -> None:
    """Run the agent until SIGTERM or Ctrl-C."""
    cfg = _load(config)
    logging.basicConfig(
        level=cfg.agent.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from agent.runtime import Agent

    async def main() -> None:
        agent = Agent(cfg)
        loop = asyncio.get_running_loop()

        def on_signal(signame: str) -> None:
            logging.getLogger("agent").info("%s received", signame)
            agent.stop()
            # A bound on shutdown whatever hangs: what is committed is safe either way.
            loop.call_later(cfg.agent.shutdown_timeout + 5, _force_exit)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await agent.run()

    try:
        asyncio.run(main())
    except Exception as exc:  # the last line of defence: one clear line, not a traceback
        logging.getLogger("agent").critical("agent failed: %s", exc, exc_info=True)
        raise typer.Exit(1) from None


def _force_exit() -> None:
    logging.getLogger("agent").error("shutdown took too long; exiting now")
    os._exit(1)


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
        heads = dict(db.execute("SELECT stream, seq FROM heads").fetchall())
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
    console = Console()
    logi = info["log"]
    state = "running" if info["running"] else "not running"
    used, quota = logi["bytes"] / 2**20, logi["quota"] / 2**20
    console.print(
        f"[bold]{cfg.agent.name}[/] {state} · log {logi['path']} (id {logi['log_id']})"
        f" · {used:.1f} MiB of {quota:.0f} MiB quota"
    )
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
    from agent.service import install_steps

    if not dry_run and os.geteuid() != 0:
        typer.echo("service install needs root: sudo edge-agent service install", err=True)
        raise typer.Exit(1)
    _run_steps(install_steps(), dry_run)
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
