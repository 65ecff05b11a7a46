"""Readings/s through windows and rules alone (no I/O), next to a bare numpy reduction of the
same data measured in the same run.

The data: `--readings` readings of S sensors (1, 100 and 10,000 by default) at 10 readings/s
each on the monotonic clock, a slow sine plus noise that crosses the rule's threshold, cut into
batches of `--batch` readings (the processor's batch size) and turned into columns before
timing, as the processor hands them over.

Agent path: a `Pipeline` with one tumbling 10 s processing-time window computing mean, min
and max per sensor, and a rule with hysteresis on the window's mean; fed every batch, then one
tick that closes the last windows. Every aggregate and alert is built as the log would get it.

Bare numpy: the same batches, each reduced to per-(sensor, window) count, sum, min and max by
`argsort` + `ufunc.reduceat`: the core arithmetic with no window state, merging, lateness,
emission or rules. The ratio of the two is what the pipeline's bookkeeping costs.

Extra rows (100 sensors) show what other window shapes cost: hopping (a 10 s window every
2.5 s), event time with lateness, median and p95, the EWMA, and a rule on every reading.

This prints; it never asserts, and exits 0 whether the target is met or not.

    python bench/processing.py [--readings N] [--batch B] [--sensors 1,100,10000] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from agent.config import ProcessingConfig
from agent.events import Event
from agent.processing import Pipeline, ReadingBatch, SensorTable

if __package__ in (None, ""):  # run as a script (`python bench/processing.py`): find `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cores as _cores

TARGET_RATE = 1_000_000.0  # readings/s, 100 sensors, three functions per window
TARGET_SENSORS = 100
WINDOW = 10.0  # seconds
HZ = 10.0  # readings/s per sensor


def base_config(**window: Any) -> dict[str, Any]:
    w = {"name": "w", "size": "10s", "functions": ["mean", "min", "max"], **window}
    return {
        "windows": [w],
        "rules": [{"name": "hot", "window": "w", "above": 24.0, "clear_below": 22.0}],
    }


EXTRA: list[tuple[str, dict[str, Any]]] = [
    ("hopping 10s every 2.5s", base_config(step="2.5s")),
    ("event time, lateness 2s", base_config(time="event", lateness="2s")),
    ("median + p95 (3 functions)", base_config(functions=["mean", "median", "p95"])),
    ("ewma (3 functions)", base_config(functions=["mean", "max", "ewma"])),
    (
        "+ a rule on every reading",
        {
            **base_config(),
            "rules": [
                {"name": "hot", "window": "w", "above": 24.0, "clear_below": 22.0},
                {"name": "raw", "above": 29.0, "clear_below": 27.0, "samples": 3},
            ],
        },
    ),
]


@dataclass(slots=True)
class Data:
    """One run's readings as the processor hands them to the pipeline, batch by batch."""

    sensors: int
    batches: list[ReadingBatch]
    table: SensorTable

    @property
    def readings(self) -> int:
        return sum(len(b) for b in self.batches)


def make_data(readings: int, sensors: int, batch: int, seed: int = 1) -> Data:
    rng = np.random.default_rng(seed)
    table = SensorTable()
    for i in range(sensors):
        table.code(f"sensor-{i}")
    n = readings
    tick = np.arange(n) // sensors
    code = np.arange(n) % sensors
    mono = 1000.0 + tick / HZ + code * (0.5 / HZ / max(sensors, 1))
    phase = code * 0.7
    value = 22.0 + 4.0 * np.sin(2 * np.pi * mono / 600.0 + phase) + rng.normal(0, 0.3, n)
    wall = 1.7e9 + mono
    seq = np.arange(1, n + 1, dtype=np.int64)
    out = []
    for at in range(0, n, batch):
        s = slice(at, at + batch)
        size = len(seq[s])
        out.append(
            ReadingBatch(
                seq[s].copy(),
                code[s].astype(np.int64),
                value[s].copy(),
                wall[s].copy(),
                mono[s].copy(),
                wall[s].copy(),
                ["C"] * size,
            )
        )
    return Data(sensors, out, table)


@dataclass(slots=True)
class Figures:
    """One measured row."""

    name: str
    sensors: int
    readings: int
    seconds: float
    aggregates: int = 0
    alerts: int = 0

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "sensors": self.sensors,
            "readings": self.readings,
            "seconds": round(self.seconds, 4),
            "readings_per_s": round(self.rate, 1),
            "aggregates": self.aggregates,
            "alerts": self.alerts,
        }


def run_pipeline(name: str, data: Data, cfg: dict[str, Any], repeat: int) -> Figures:
    """The best of `repeat` runs of a fresh pipeline over all batches, then a closing tick."""
    config = ProcessingConfig.model_validate(cfg)
    best = None
    for _ in range(repeat):
        pipeline = Pipeline(config, grace=2.0, table=data.table)
        aggregates = alerts = 0
        last = data.batches[-1]
        start = time.perf_counter()
        for b in data.batches:
            out = pipeline.feed(b)
            aggregates += len(out.aggregates)
            alerts += len(out.alerts)
        out = pipeline.tick(float(last.mono[-1]) + 60.0, float(last.recv[-1]) + 60.0)
        seconds = time.perf_counter() - start
        aggregates += len(out.aggregates)
        alerts += len(out.alerts)
        if best is None or seconds < best.seconds:
            best = Figures(name, data.sensors, data.readings, seconds, aggregates, alerts)
    assert best is not None
    return best


def run_from_events(data: Data, cfg: dict[str, Any]) -> Figures:
    """The agent path starting from `Event` objects (what the log's `read` returns), so the
    cost of turning them into columns is in."""
    names = data.table.names
    batches = [
        [
            Event(
                "readings", int(s), "reading", float(t), float(t), float(m), names[c], float(v), u
            )
            for s, c, v, t, m, u in zip(
                b.seq, b.code.tolist(), b.value.tolist(), b.time, b.mono, b.unit, strict=True
            )
        ]
        for b in data.batches
    ]
    pipeline = Pipeline(ProcessingConfig.model_validate(cfg), grace=2.0)
    aggregates = alerts = 0
    start = time.perf_counter()
    for events in batches:
        out = pipeline.feed(events)
        aggregates += len(out.aggregates)
        alerts += len(out.alerts)
    seconds = time.perf_counter() - start
    return Figures("agent path from Event objects", data.sensors, data.readings, seconds)


def run_bare(data: Data, repeat: int) -> Figures:
    """Per batch: window index, sort by (sensor, window), count/sum/min/max by reduceat."""
    best = None
    for _ in range(repeat):
        groups = 0
        start = time.perf_counter()
        for b in data.batches:
            k = np.floor(b.mono / WINDOW).astype(np.int64)
            kmin = int(k.min())
            key = b.code * (int(k.max()) - kmin + 1) + (k - kmin)
            order = np.argsort(key, kind="stable")
            ks = key[order]
            x = b.value[order]
            starts = np.flatnonzero(np.concatenate(([True], ks[1:] != ks[:-1])))
            count = np.diff(np.append(starts, len(ks)))
            total = np.add.reduceat(x, starts)
            low = np.minimum.reduceat(x, starts)
            high = np.maximum.reduceat(x, starts)
            groups += len(total / count) + len(low) + len(high)
        seconds = time.perf_counter() - start
        if best is None or seconds < best.seconds:
            best = Figures("bare numpy reduction", data.sensors, data.readings, seconds)
    assert best is not None
    return best


def _machine() -> dict[str, Any]:
    cores = _cores()
    return {
        "nproc": cores,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "numpy": np.__version__,
    }


def measure(args: argparse.Namespace) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    target: dict[str, Any] = {}
    for sensors in args.sensors:
        data = make_data(args.readings, sensors, args.batch)
        agent = run_pipeline("windows + rules (mean, min, max)", data, base_config(), args.repeat)
        bare = run_bare(data, args.repeat)
        ratio = agent.rate / bare.rate if bare.rate else 0.0
        rows.append({"agent": agent.as_dict(), "bare": bare.as_dict(), "ratio": round(ratio, 4)})
        if sensors == TARGET_SENSORS:
            target = {
                "target": TARGET_RATE,
                "value": round(agent.rate, 1),
                "pass": agent.rate >= TARGET_RATE,
            }
            extra.append(run_from_events(data, base_config()).as_dict())
            for name, cfg in EXTRA:
                extra.append(run_pipeline(name, data, cfg, args.repeat).as_dict())
    return {
        "machine": _machine(),
        "config": {"readings": args.readings, "batch": args.batch, "repeat": args.repeat},
        "rows": rows,
        "extra": extra,
        "target": target,
    }


def print_table(out: dict[str, Any]) -> None:
    m, c = out["machine"], out["config"]
    print("edge-agent bench: processing (windows + rules, no I/O)")
    print(f"machine: nproc {m['nproc']} ({m['cpu']}), Python {m['python']}, numpy {m['numpy']}")
    print(
        f"config:  {c['readings']:,} readings per run, batches of {c['batch']:,}, "
        f"10 readings/s per sensor, tumbling 10 s window (mean, min, max) + a rule; "
        f"best of {c['repeat']}"
    )
    print()
    print(f"{'sensors':>8}{'agent readings/s':>18}{'bare numpy/s':>16}{'ratio':>8}")
    print(f"{'':>8}{'aggregates':>18}{'alerts':>16}")
    for row in out["rows"]:
        a, b = row["agent"], row["bare"]
        print(
            f"{a['sensors']:>8,}{a['readings_per_s']:>18,.0f}{b['readings_per_s']:>16,.0f}"
            f"{row['ratio']:>8.2f}"
        )
        print(f"{'':>8}{a['aggregates']:>18,}{a['alerts']:>16,}")
    if out["extra"]:
        print()
        print(f"other shapes, {TARGET_SENSORS} sensors{'':14}readings/s")
        for e in out["extra"]:
            print(f"  {e['name']:38}{e['readings_per_s']:>12,.0f}")
    t = out["target"]
    if t:
        print()
        mark = "PASS" if t["pass"] else "FAIL"
        print(
            f"target: >= {t['target']:,.0f} readings/s for {TARGET_SENSORS} sensors, "
            f"three functions   {t['value']:>12,.0f}   {mark}"
        )


def _sensors(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("a comma-separated list of sensor counts >= 1")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--readings", type=int, default=1_000_000, help="default 1000000")
    p.add_argument("--batch", type=int, default=5000, help="default 5000 (the processor's)")
    p.add_argument("--sensors", type=_sensors, default=[1, 100, 10_000], help="default 1,100,10000")
    p.add_argument("--repeat", type=int, default=3, help="best of N runs, default 3")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = measure(args)
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
