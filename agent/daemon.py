"""`edge-agent run CONFIG`: the daemon, started without the command-line framework.

The agent keeps whatever it imported for as long as it runs (months, on a Pi), and typer with
its helpers is 1.2 MiB of the 60 MB it may use (issue 7). So `main`, the `edge-agent` entry
point, recognises the daemon's own command line, `run CONFIG`, and starts the agent directly;
every other command line (`run --help` included) goes to the typer app in `agent.cli`, where
`run` calls the same `run_agent`.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import sys
from pathlib import Path

from agent.config import AgentConfig, ConfigError, load_config

log = logging.getLogger("agent")

#: The cycle collector's thresholds while the daemon runs (CPython's default: 700, 10, 10).
GC_THRESHOLDS = (50_000, 10, 10)
#: How long a thread may keep the GIL while another waits for it, seconds (CPython's: 0.005).
SWITCH_INTERVAL = 0.0005


def main() -> None:
    """The `edge-agent` command."""
    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "run" and not args[1].startswith("-"):
        raise SystemExit(run_agent(Path(args[1])))
    from agent.cli import main as cli_main

    cli_main()


def load_or_explain(config: Path) -> AgentConfig | None:
    """The config at `config`, or None after printing every problem as FILE:LINE:COL."""
    try:
        return load_config(config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return None


def run_agent(config: Path) -> int:
    """Run the agent until SIGTERM or Ctrl-C (SIGHUP reloads `config`); the exit status."""
    cfg = load_or_explain(config)
    if cfg is None:
        return 1
    from agent.preflight import key_file_problems

    problems = key_file_problems(cfg)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 1
    logging.basicConfig(
        level=cfg.agent.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from agent.notify import Notifier
    from agent.runtime import Agent

    tune_interpreter()

    async def serve() -> None:
        # Taken out of the environment, so command actions cannot speak for the agent.
        agent = Agent(cfg, Notifier.from_env(unset=True))
        loop = asyncio.get_running_loop()

        def on_hup() -> None:
            log.info("SIGHUP received: reloading %s", config)
            agent.request_reload(config)

        loop.add_signal_handler(signal.SIGHUP, on_hup)

        def on_signal(signame: str) -> None:
            log.info("%s received", signame)
            agent.stop()
            # A bound on shutdown whatever hangs: what is committed is safe either way.
            loop.call_later(cfg.agent.shutdown_timeout + 5, _force_exit)

        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, on_signal, sig.name)
        await agent.run()

    try:
        asyncio.run(serve())
    except Exception as exc:  # the last line of defence: one clear line, not a traceback
        log.critical("agent failed: %s", exc, exc_info=True)
        return 1
    return 0


def tune_interpreter() -> None:
    """Spare the daemon's cycle collector the objects it can never free and the readings it
    should never have to look at, and let the log's writer thread have the GIL back sooner.

    A reading lives from its decode to its group commit (100 ms and more): with CPython's
    default thresholds the young collections ran every few hundred readings, found it alive,
    and promoted it, so full collections through the whole heap followed every half second.
    At 50,000 readings/s that was a fifth of the event loop's time (2.3 s of a 12 s run,
    measured with gc.callbacks). A young collection after 50,000 new containers (about
    15,000 readings: a collection per 0.15 s at 100,000 readings/s, per 15 s at a Pi's 1,000)
    finds most of them committed and freed, and costs what it finds alive, not what came and
    went, so it costs the same however rare it is. `gc.freeze` moves what startup made (the
    modules, classes and config, which live as long as the process) out of every collection.
    Garbage is freed by reference counting as before; only cycles wait a little longer.

    The log's writer runs SQLite in a thread, which lets the GIL go for every statement and
    needs it back to bind the next. During a burst the event loop holds it, and CPython makes
    a waiting thread wait a whole switch interval before the holder lets go: at the default
    5 ms, a commit of 5,000 readings took 0.7-0.9 s beside a busy loop (its CPU: 25 ms), and
    the writer became the bottleneck. At 0.5 ms it took 75 ms. The cost is more switches, and
    only while both threads want the GIL.
    """
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL)


def _force_exit() -> None:
    log.error("shutdown took too long; exiting now")
    os._exit(1)
