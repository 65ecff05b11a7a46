"""Readings/s appended to the event log, next to the raw SQLite limit measured in the same run.

Phase 1 (agent path): a `SimulatedDriver` firing as fast as it can (rate 0) feeds
`EventLog.submit`, pipelined the way the runtime's ingest loop does it (one submit per batch,
no wait for the commit), with group commit and the configured `synchronous` level. Timed from
the first submit until the last submission's commit resolved.

Phase 2 (raw limit): plain stdlib `sqlite3` on a fresh file with the log's own schema, insert
statements and pragmas, inserting the same readings (the seeded driver's same readings, all
made before timing) with the log's own insert function (multi-row statements), in
transactions of exactly the sizes the log committed in phase 1, one COMMIT each.

The ratio of the two is how much of what SQLite can do the agent keeps. This prints; it never
asserts, and exits 0 whether the targets are met or not.

    python bench/log_append.py [--readings N] [--sensors S] [--commit-interval 0.1]
                               [--max-batch 10000] [--synchronous full|normal] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agent.config import LogConfig, SimSensorConfig, SimulatedInputConfig
from agent.events import Reading
from agent.log import (
    _SCHEMA,
    PAGE_SIZE,
    Committed,
    EventLog,
    _insert_readings,
)
from drivers.simulated import SimulatedDriver

if __package__ in (None, ""):  # run as a script (`python bench/log_append.py`): find `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cores as _cores
from bench.common import mark as _mark
from bench.common import non_negative_float as _non_negative_float
from bench.common import positive_int as _positive_int

TARGET_RATE = 100_000.0  # readings/s through the agent path
TARGET_RATIO = 0.5  # of the raw limit
BATCH_MAX = 1000  # readings per driver batch (per submit)
# Large enough that the quota never drops readings during a run, whatever --readings says.
QUOTA = 1024**4


@dataclass(slots=True)
class PhaseResult:
    """One phase's figures."""

    readings: int
    seconds: float
    commits: int
    readings_per_commit: float
    db_bytes: int

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_reading(self) -> float:
        return self.db_bytes / self.readings if self.readings else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["readings_per_s"] = round(self.rate, 1)
        out["bytes_per_reading"] = round(self.bytes_per_reading, 2)
        out["seconds"] = round(self.seconds, 4)
        out["readings_per_commit"] = round(self.readings_per_commit, 1)
        return out


@dataclass(slots=True)
class AgentRun:
    """Phase 1's figures, plus the commit sizes phase 2 replays."""

    result: PhaseResult
    commit_sizes: list[int]
    pattern_observed: bool


def _sim_config(args: argparse.Namespace) -> SimulatedInputConfig:
    return SimulatedInputConfig(
        type="simulated",
        name="bench",
        rate=0,
        count=args.readings,
        batch_max=BATCH_MAX,
        seed=1,
        sensors=[
            SimSensorConfig(name=f"sensor-{i}", unit="C", base=20.0 + i)
            for i in range(args.sensors)
        ],
    )


# --------------------------------------------------------------------------- phase 1


def agent_phase(args: argparse.Namespace, path: Path) -> AgentRun:
    result, sizes, observed = asyncio.run(_agent_phase(args, path))
    # Closing the log checkpointed the WAL into the database file (TRUNCATE).
    result.db_bytes = path.stat().st_size
    return AgentRun(result, sizes, observed)


async def _agent_phase(args: argparse.Namespace, path: Path) -> tuple[PhaseResult, list[int], bool]:
    log_cfg = LogConfig(
        synchronous=args.synchronous,
        commit_interval=args.commit_interval,
        max_batch=args.max_batch,
        quota=QUOTA,
    )
    futures: list[asyncio.Future[Committed]] = []
    # Readings per commit, keyed by the commit's number. A submission's future resolves in
    # the commit that wrote it, and its callbacks run before the writer can finish another
    # commit (that needs a round trip to the database thread), so `stats.commits` read in
    # the callback is the number of the commit that resolved it.
    per_commit: dict[int, int] = {}
    start = end = 0.0
    async with EventLog.open(path, log_cfg) as log:

        def counter(n: int) -> Callable[[asyncio.Future[Committed]], None]:
            def count(_: asyncio.Future[Committed]) -> None:
                k = log.stats.commits
                per_commit[k] = per_commit.get(k, 0) + n

            return count

        # Readings are not kept past their commit, as in the runtime: keeping a million of
        # them alive for phase 2 made the garbage collector slow this phase down by ~5%.
        async with SimulatedDriver(_sim_config(args)) as driver:
            async for batch in driver:
                if not futures:
                    start = time.perf_counter()
                future = await log.submit(batch.items)
                future.add_done_callback(counter(len(batch.items)))
                futures.append(future)
        await asyncio.gather(*futures)
        end = time.perf_counter()
        commits, written = log.stats.commits, log.stats.events_written
    sizes = [per_commit[k] for k in sorted(per_commit)]
    observed = len(sizes) == commits and sum(sizes) == written == args.readings
    if not observed:
        # Should not happen; fall back to commits of the mean size.
        mean = max(1, round(written / max(1, commits)))
        sizes = [mean] * (args.readings // mean)
        if args.readings % mean:
            sizes.append(args.readings % mean)
    result = PhaseResult(
        readings=written,
        seconds=end - start,
        commits=commits,
        readings_per_commit=written / commits if commits else 0.0,
        db_bytes=0,  # filled in once the log is closed
    )
    return result, sizes, observed


# --------------------------------------------------------------------------- phase 2


async def _rows(args: argparse.Namespace, rows: list[Reading]) -> None:
    """Phase 1's readings again: the seeded driver yields the same readings (sensor, value,
    unit, order) on every run (only the timestamps differ). They come back through `rows`, not
    as the coroutine's result: Python 3.11's asyncio.run reprs its main task's result
    (signal.getsignal on its SIGINT handler), and the repr of a million readings takes
    seconds."""
    async with SimulatedDriver(_sim_config(args)) as driver:
        async for batch in driver:
            rows.extend(r for r in batch.items if isinstance(r, Reading))


def raw_phase(args: argparse.Namespace, path: Path, run: AgentRun) -> PhaseResult:
    rows: list[Reading] = []
    asyncio.run(_rows(args, rows))
    chunks: list[list[Reading]] = []
    at = 0
    for size in run.commit_sizes:
        chunks.append(rows[at : at + size])
        at += size
    del rows
    db = sqlite3.connect(path, isolation_level=None)
    try:
        sync = "FULL" if args.synchronous == "full" else "NORMAL"
        db.execute(f"PRAGMA page_size={PAGE_SIZE}")  # the same file layout as the agent's
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={sync}")
        db.execute("PRAGMA journal_size_limit=16777216")
        db.executescript(_SCHEMA)
        start = time.perf_counter()
        seq = 1
        for chunk in chunks:
            db.execute("BEGIN IMMEDIATE")
            _insert_readings(db, seq, chunk)
            db.execute("COMMIT")
            seq += len(chunk)
        end = time.perf_counter()
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    n = sum(len(c) for c in chunks)
    return PhaseResult(
        readings=n,
        seconds=end - start,
        commits=len(chunks),
        readings_per_commit=n / len(chunks) if chunks else 0.0,
        db_bytes=path.stat().st_size,
    )


# --------------------------------------------------------------------------- report


def _fs_type(path: Path) -> str:
    """The filesystem type `path` lives on (from /proc/mounts), or '?'."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mount = parts[1]
                inside = str(path) == mount or str(path).startswith(mount.rstrip("/") + "/")
                if inside and len(mount) > len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def _machine(tmp: Path) -> dict[str, Any]:
    cores = _cores()
    return {
        "nproc": cores,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "tmp_dir": str(tmp),
        "tmp_fs": _fs_type(tmp),
    }


def report(
    args: argparse.Namespace, machine: dict[str, Any], run: AgentRun, raw: PhaseResult
) -> dict[str, Any]:
    agent = run.result
    ratio = agent.rate / raw.rate if raw.rate > 0 else 0.0
    return {
        "machine": machine,
        "config": {
            "readings": args.readings,
            "sensors": args.sensors,
            "driver_batch": BATCH_MAX,
            "commit_interval": args.commit_interval,
            "max_batch": args.max_batch,
            "synchronous": args.synchronous,
            "commit_pattern": "observed" if run.pattern_observed else "approximated",
        },
        "agent": agent.as_dict(),
        "raw": raw.as_dict(),
        "ratio": round(ratio, 4),
        "targets": {
            "agent_readings_per_s": {
                "target": TARGET_RATE,
                "value": round(agent.rate, 1),
                "pass": agent.rate >= TARGET_RATE,
            },
            "ratio": {
                "target": TARGET_RATIO,
                "value": round(ratio, 4),
                "pass": ratio >= TARGET_RATIO,
            },
        },
    }


def print_table(out: dict[str, Any]) -> None:
    m, c, a, r = out["machine"], out["config"], out["agent"], out["raw"]
    t = out["targets"]
    print("edge-agent bench: log append (simulated driver -> EventLog, group commit)")
    print(
        f"machine: nproc {m['nproc']} ({m['cpu']}), Python {m['python']}, "
        f"SQLite {m['sqlite']}, temp dir {m['tmp_dir']} ({m['tmp_fs']})"
    )
    print(
        f"config:  {c['readings']:,} readings, {c['sensors']} sensors, driver batch "
        f"{c['driver_batch']}, commit_interval {c['commit_interval']} s, max_batch "
        f"{c['max_batch']:,}, synchronous={c['synchronous'].upper()}, commit pattern "
        f"{c['commit_pattern']}"
    )
    print()
    head = f"{'':26}{'readings/s':>12}{'seconds':>10}{'commits':>9}{'per commit':>12}"
    print(head + f"{'bytes/reading':>15}")
    for name, p in (("agent (EventLog)", a), ("raw limit (sqlite3)", r)):
        print(
            f"{name:26}{p['readings_per_s']:>12,.0f}{p['seconds']:>10.2f}{p['commits']:>9,}"
            f"{p['readings_per_commit']:>12,.0f}{p['bytes_per_reading']:>15.1f}"
        )
    print(f"{'ratio agent / raw':26}{out['ratio']:>12.2f}")
    print()
    print("targets")
    rate, ratio = t["agent_readings_per_s"], t["ratio"]
    print(
        f"  agent >= {rate['target']:,.0f} readings/s   {rate['value']:>12,.0f}"
        f"   {_mark(rate['pass'])}"
    )
    print(
        f"  agent / raw >= {ratio['target']:.2f}          {ratio['value']:>12.2f}"
        f"   {_mark(ratio['pass'])}"
    )


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--readings", type=_positive_int, default=1_000_000, help="default 1000000")
    p.add_argument("--sensors", type=_positive_int, default=8, help="default 8")
    p.add_argument(
        "--commit-interval", type=_non_negative_float, default=0.1, help="seconds, default 0.1"
    )
    p.add_argument("--max-batch", type=_positive_int, default=10_000, help="default 10000")
    p.add_argument("--synchronous", choices=("full", "normal"), default="full")
    p.add_argument("--dir", type=Path, default=None, help="where the temp dir goes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-bench-", dir=args.dir) as tmp:
        root = Path(tmp)
        machine = _machine(root.parent)
        run = agent_phase(args, root / "agent.db")
        raw = raw_phase(args, root / "raw.db", run)
    out = report(args, machine, run, raw)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
