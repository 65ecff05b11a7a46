"""The processor over a real log: its state survives restarts (snapshot, or replay when there
is none), reloads keep what did not change, and a SIGKILLed agent ends with the same aggregates
and alerts as one that ran through."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.config import LogConfig, ProcessingConfig
from agent.events import Reading, Stream
from agent.log import CursorUpdate, EventLog
from agent.processor import CONSUMER, FEED_INTERVAL, MAX_FEED_INTERVAL, Processor, feed_interval
from tests.conftest import eventually, wait_until

T0 = 1_700_000_000.0

PROCESSING: dict[str, Any] = {
    "checkpoint_interval": "200ms",
    "windows": [
        {"name": "mean1s", "size": "1s", "functions": ["mean", "min", "max"]},
        {
            "name": "stats",
            "sensors": "temp*",
            "size": "2s",
            "step": "500ms",
            "time": "event",
            "lateness": "100ms",
            "functions": ["p95", "std", "ewma", "first", "last", "rate", "count"],
        },
        {"name": "hall", "sensors": ["temp1", "temp2"], "group": "hall", "size": "3s"},
    ],
    "rules": [
        {"name": "hot", "window": "mean1s", "sensors": "temp*", "above": 30, "clear_below": 26},
        {
            "name": "spiky",
            "window": "stats",
            "function": "p95",
            "above": 31,
            "hysteresis": 2,
            "for": "1s",
        },
        {"name": "raw", "sensors": "hum*", "below": 30, "clear_above": 35, "samples": 5},
    ],
}


def synthetic(ticks: int, sensors: int = 8, seed: int = 5) -> list[Reading]:
    """Readings in the past of this machine's monotonic clock: temperatures swinging across
    the rules' thresholds, humidities dipping, some event times out of order."""
    rng = np.random.default_rng(seed)
    mono0 = time.monotonic() - 100_000.0
    names = [f"temp{i}" if i % 2 == 0 else f"hum{i}" for i in range(sensors)]
    out = []
    for i in range(ticks):
        for s, name in enumerate(names):
            base = 22.0 if name.startswith("temp") else 40.0
            swing = 10.0 * math.sin(2 * math.pi * i / 700 + s)
            value = base + swing + float(rng.normal(0, 0.5))
            jitter = float(rng.uniform(-2.5, 0.0)) if i % 13 == s else 0.0
            mono = mono0 + i * 0.01 + s * 1e-5
            out.append(Reading(name, value, "C", T0 + i * 0.01 + jitter, T0 + i * 0.01, mono, "t"))
    return out


async def fill(path: Path, readings: list[Reading]) -> None:
    async with EventLog.open(path, LogConfig(commit_interval=0)) as log:
        for at in range(0, len(readings), 10_000):
            await log.append(readings=readings[at : at + 10_000])


def processing(**over: Any) -> ProcessingConfig:
    return ProcessingConfig.model_validate({**PROCESSING, **over})


async def run(
    path: Path, cfg: ProcessingConfig, *, until: int | None = None, batch: int = 1000
) -> Processor:
    """Run a processor over the log until it processed `until` readings (then cancel it: a
    crash, it loses what it had not committed), or until it caught up and every window closed
    (then stop it)."""
    async with EventLog.open(path, LogConfig(commit_interval=0)) as log:
        processor = Processor(cfg, batch=batch)
        stop = asyncio.Event()
        task = asyncio.create_task(processor.run(log, stop))
        head = log.head(Stream.READINGS)

        def done() -> bool:
            if task.done():
                task.result()
            if until is not None:
                return processor.position >= until
            windows = processor.pipeline.windows.values()
            return processor.position == head and not any(len(w.open) for w in windows)

        await eventually(done, within=30, what="the processor")
        if until is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert processor.position < head, "cut before the end: the test proves nothing"
        else:
            stop.set()
            await asyncio.wait_for(task, 10)
    return processor


def outputs(path: Path) -> dict[str, Any]:
    """Aggregates by (window, sensor, index), alerts and late readings, from the log file."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT stream, kind, sensor, value, data FROM events WHERE stream IN (2, 3, 5)"
            " ORDER BY stream, seq"
        ).fetchall()
    finally:
        db.close()
    aggs: dict[tuple[str, str, int], dict[str, Any]] = {}
    alerts, late = [], []
    for stream, kind, sensor, _, text in rows:
        data = json.loads(text)
        if stream == 2:
            key = (data["window"], sensor, data["index"])
            assert key not in aggs, f"aggregate {key} appended twice"
            aggs[key] = data
        elif stream == 3:
            alerts.append((data["alert_id"], kind, sensor, data.get("reason")))
        else:
            late.append(data["seq"])
    return {"aggregates": aggs, "alerts": sorted(alerts), "late": sorted(late)}


def assert_same(got: dict[str, Any], want: dict[str, Any]) -> None:
    assert got["alerts"] == want["alerts"]
    assert got["late"] == want["late"]
    assert set(got["aggregates"]) == set(want["aggregates"])
    for key, data in want["aggregates"].items():
        other = got["aggregates"][key]
        assert other["count"] == data["count"], key
        for name, value in data["values"].items():
            if value is None:
                assert other["values"][name] is None, (key, name)
            else:
                assert other["values"][name] == pytest.approx(value, rel=1e-9, abs=1e-9), (
                    key,
                    name,
                )


def make_reference(root: Path, ticks: int) -> tuple[Path, dict[str, Any]]:
    """A log of readings (kept pristine) and what one uninterrupted processor makes of it."""
    pristine = root / "pristine.db"
    asyncio.run(fill(pristine, synthetic(ticks)))
    whole = root / "whole.db"
    shutil.copy(pristine, whole)
    asyncio.run(run(whole, processing()))
    want = outputs(whole)
    assert len(want["aggregates"]) > 200 and want["late"] and want["alerts"]
    kinds = {a[1] for a in want["alerts"]}
    assert kinds == {"alert.raised", "alert.cleared"}
    return pristine, want


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """15 s of 8 sensors at 100 readings/s."""
    return make_reference(tmp_path_factory.mktemp("reference"), 1500)


async def test_resumes_from_its_snapshot_exactly(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    pristine, want = reference
    path = tmp_path / "events.db"
    shutil.copy(pristine, path)
    for until in (2000, 5500, 9000):
        await run(path, processing(), until=until, batch=700)
    await run(path, processing(), batch=700)
    assert_same(outputs(path), want)


def assert_paired(alerts: list[tuple[str, str, str, str | None]]) -> None:
    """Each alert id is raised once and cleared at most once; per rule and sensor at most one
    alert is still raised at the end."""
    by_id: dict[str, list[str]] = {}
    for alert_id, kind, _, _ in alerts:
        by_id.setdefault(alert_id, []).append(kind)
    pairs = (["alert.raised"], ["alert.cleared", "alert.raised"])
    assert all(sorted(k) in pairs for k in by_id.values()), by_id
    still = [i.rpartition(":")[0] for i, k in by_id.items() if k == ["alert.raised"]]
    assert len(still) == len(set(still)), still


@pytest.mark.parametrize("state", [None, "not json", '{"windows": {}, "rules": {}}'])
async def test_without_a_usable_snapshot_the_state_is_rebuilt_by_replay(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]], state: str | None
) -> None:
    """A lost, unreadable, or old-format state (the first version's): windows replay the
    readings they need and skip what the log shows they emitted, so every aggregate and late
    reading is the same as in an uninterrupted run; which alerts are raised, and the alert
    ids, come back from the alerts stream. (Only a rule's pending `for`/`samples` count
    starts afresh: alerts may come a little later than they would have.)"""
    pristine, want = reference
    path = tmp_path / "events.db"
    shutil.copy(pristine, path)
    await run(path, processing(), until=6000)
    async with EventLog.open(path) as log:
        cursor = log.cursor(CONSUMER, Stream.READINGS)
        await log.append(cursors=[CursorUpdate(CONSUMER, Stream.READINGS, cursor, state)])
    before = outputs(path)["alerts"]
    await run(path, processing())
    got = outputs(path)
    assert_same({**got, "alerts": want["alerts"]}, want)
    assert set(before) <= set(got["alerts"])
    assert_paired(got["alerts"])
    assert_paired(want["alerts"])


async def test_reload_keeps_unchanged_windows_and_rebuilds_changed_ones(
    tmp_path: Path, reference: tuple[Path, dict[str, Any]]
) -> None:
    pristine, want = reference
    path = tmp_path / "events.db"
    shutil.copy(pristine, path)
    changed = processing(
        windows=[
            PROCESSING["windows"][0],  # unchanged
            {**PROCESSING["windows"][1], "lateness": "1s"},  # changed
            {"name": "count5s", "size": "5s", "function": "count"},  # new
        ],
        rules=[
            PROCESSING["rules"][0],  # unchanged
            {**PROCESSING["rules"][1], "above": 100},  # changed: what it raised is cleared
        ],
    )
    async with EventLog.open(path, LogConfig(commit_interval=0)) as log:
        processor = Processor(processing(), batch=500)
        stop = asyncio.Event()
        task = asyncio.create_task(processor.run(log, stop))
        await eventually(lambda: processor.position >= 6000, what="half the readings")
        before = {n: w for n, w in processor.pipeline.windows.items()}
        processor.reload(changed)
        await eventually(lambda: processor.reloads == 1, what="the reload")
        assert processor.pipeline.windows["mean1s"] is before["mean1s"]
        assert processor.pipeline.windows["stats"] is not before["stats"]
        at_reload = processor.position
        head = log.head(Stream.READINGS)
        await eventually(
            lambda: (
                processor.position == head
                and not any(len(w.open) for w in processor.pipeline.windows.values())
            ),
            what="the rest",
        )
        stop.set()
        await task
    got = outputs(path)
    # The unchanged window and rule go on as if nothing happened.
    assert_same(
        {
            "aggregates": {k: v for k, v in got["aggregates"].items() if k[0] == "mean1s"},
            "alerts": [a for a in got["alerts"] if a[0].startswith("hot:")],
            "late": [],
        },
        {
            "aggregates": {k: v for k, v in want["aggregates"].items() if k[0] == "mean1s"},
            "alerts": [a for a in want["alerts"] if a[0].startswith("hot:")],
            "late": [],
        },
    )
    # The new window's first aggregate already covers readings from before the reload:
    # 5 s of 8 sensors at 100 readings/s is 500 a sensor.
    counts: dict[str, list[dict[str, Any]]] = {}
    for (window, sensor, _), data in sorted(got["aggregates"].items()):
        if window == "count5s":
            counts.setdefault(sensor, []).append(data)
    assert len(counts) == 8
    assert all(c["count"] == 500 for per in counts.values() for c in per[1:-1])
    assert min(c["first_time"] for per in counts.values() for c in per) < T0 + at_reload / 800
    # Every alert the changed rule raised has its pair.
    spiky = [a for a in got["alerts"] if a[0].startswith("spiky:")]
    raised = {a[0] for a in spiky if a[1] == "alert.raised"}
    assert raised == {a[0] for a in spiky if a[1] == "alert.cleared"}


async def test_late_readings_and_checkpoints_through_the_log(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    mono = time.monotonic()
    readings = [
        Reading("t1", 1.0, None, T0 + 10, T0, mono, "x"),
        Reading("t1", 2.0, None, T0 + 30, T0, mono, "x"),
        Reading("t1", 3.0, None, T0 + 5, T0, mono, "x"),  # 25 s behind: late
    ]
    await fill(path, readings)
    cfg = ProcessingConfig.model_validate(
        {
            "checkpoint_interval": "1h",
            "windows": [{"name": "w", "size": "10s", "time": "event", "lateness": "2s"}],
        }
    )
    async with EventLog.open(path, LogConfig(commit_interval=0)) as log:
        processor = Processor(cfg)
        stop = asyncio.Event()
        task = asyncio.create_task(processor.run(log, stop))
        await eventually(lambda: log.head(Stream.DEADLETTER) == 1, what="the late reading")
        (dead,) = await log.read(Stream.DEADLETTER, 0)
        assert dead.data is not None and dead.data["reason"] == "late" and dead.value == 3.0
        (agg,) = await log.read(Stream.AGGREGATES, 0)
        assert agg.value == 1.0
        assert log.cursor(CONSUMER, Stream.READINGS) == 3  # committed with what it appended
        await log.append(readings=[Reading("t1", 4.0, None, T0 + 31, T0, mono, "x")])
        await eventually(lambda: processor.position == 4, what="one more")
        # Nothing to append and the checkpoint is an hour away: the cursor waits in memory.
        assert log.cursor(CONSUMER, Stream.READINGS) == 3
        stop.set()
        await task
        assert log.cursor(CONSUMER, Stream.READINGS) == 4  # ... and is committed at shutdown


# --------------------------------------------------------------------------- kill -9


def _query(db: Path, sql: str) -> list[tuple[Any, ...]]:
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


def _cursor(db: Path) -> int:
    rows = _query(db, f"SELECT seq FROM cursors WHERE consumer='{CONSUMER}' AND stream=1")
    return int(rows[0][0]) if rows else 0


def _finished(db: Path, head: int) -> bool:
    rows = _query(db, f"SELECT seq, state FROM cursors WHERE consumer='{CONSUMER}' AND stream=1")
    if not rows or rows[0][0] != head or not rows[0][1]:
        return False
    state = json.loads(rows[0][1])
    return not any(w["open"]["s"] for w in state["windows"].values())


def _agent(config: Path, logs: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=logs.open("a"),
    )


@pytest.mark.timeout(120)
def test_sigkill_mid_window_ends_like_an_uninterrupted_run(tmp_path: Path) -> None:
    """A real agent over a log of readings, SIGKILLed three times while it processes, then run
    to the end: the same aggregates, alerts and late readings as an uninterrupted run."""
    (tmp_path / "reference").mkdir()
    pristine, want = make_reference(tmp_path / "reference", 6000)
    data = tmp_path / "data"
    data.mkdir()
    db = data / "events.db"
    shutil.copy(pristine, db)
    config = tmp_path / "agent.yaml"
    config.write_text(
        json.dumps(
            {
                "agent": {"name": "kill", "data_dir": str(data), "status_interval": "5s"},
                "log": {"commit_interval": "20ms"},
                "processing": PROCESSING,
            }
        )
    )
    logs = tmp_path / "agent.log"
    head = int(_query(db, "SELECT max(seq) FROM events WHERE stream=1")[0][0])
    procs = []
    try:
        for fraction in (0.2, 0.45, 0.7):
            agent = _agent(config, logs)
            procs.append(agent)
            start = _cursor(db)
            target = max(start + 1, int(head * fraction))

            def moved(target: int = target, agent: subprocess.Popen[bytes] = agent) -> bool:
                assert agent.poll() is None, logs.read_text()[-3000:]
                return _cursor(db) >= target

            wait_until(moved, 30, "the processor to move")
            agent.send_signal(signal.SIGKILL)
            assert agent.wait(10) == -signal.SIGKILL
            assert _cursor(db) < head, "killed before the end: the test proves nothing"
        agent = _agent(config, logs)
        procs.append(agent)
        wait_until(lambda: _finished(db, head), 30, "the processor to finish")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0, logs.read_text()[-2000:]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    assert_same(outputs(db), want)


@pytest.mark.parametrize(
    ("spec", "interval"),
    [
        # A rule on raw readings: folded in every FEED_INTERVAL, so it fires promptly.
        (
            {"windows": [{"name": "m", "size": "10s"}], "rules": [{"name": "r", "above": 1e9}]},
            FEED_INTERVAL,
        ),
        # Windows only (and rules on them): a fold matters once a window is due.
        (
            {
                "windows": [{"name": "m", "size": "10s"}],
                "rules": [{"name": "r", "window": "m", "above": 1e9}],
            },
            MAX_FEED_INTERVAL,
        ),
    ],
)
async def test_a_steady_flow_is_folded_in_a_few_times_a_second(
    tmp_path: Path, spec: dict[str, Any], interval: float
) -> None:
    """Each fold costs numpy set-up whatever its size: readings committed 25 times a second are
    folded in at most every `interval`, and still all of them, promptly."""
    cfg = ProcessingConfig.model_validate(spec)
    proc = Processor(cfg)
    assert proc.feed_interval == interval
    feeds: list[int] = []
    real_feed = proc.pipeline.feed

    def counting_feed(events: Any) -> Any:
        feeds.append(len(events))
        return real_feed(events)

    proc.pipeline.feed = counting_feed  # type: ignore[method-assign]
    stop = asyncio.Event()
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        task = asyncio.create_task(proc.run(log, stop))
        start = time.monotonic()
        sent = 0
        while time.monotonic() - start < max(1.0, 2.5 * interval):
            now = time.time()
            await log.append([Reading("t1", 20.0, "C", now, now, time.monotonic(), "t")])
            sent += 1
            await asyncio.sleep(0.04)  # a pace, not a wait for a result
        elapsed = time.monotonic() - start
        await eventually(lambda: proc.processed == sent, within=2 * interval + 1)
        stop.set()
        await task
    assert sum(feeds) == sent
    assert sent >= 15
    # One fold per interval, plus the first and the one catching up at the end.
    assert len(feeds) <= elapsed / interval + 2, feeds


@pytest.mark.parametrize(
    ("spec", "interval"),
    [
        ({"windows": [{"name": "m", "size": "1m"}]}, MAX_FEED_INTERVAL),
        ({"windows": [{"name": "m", "size": "5s"}]}, 0.5),
        ({"windows": [{"name": "m", "size": "1m", "step": "1s"}]}, FEED_INTERVAL),
        ({"windows": [{"name": "m", "size": "1h"}, {"name": "q", "size": "2s"}]}, FEED_INTERVAL),
        ({"rules": [{"name": "s", "stale": "30s"}]}, FEED_INTERVAL),
        (
            {
                "windows": [{"name": "m", "size": "1m"}],
                "rules": [{"name": "r", "window": "m", "above": 1}, {"name": "a", "above": 2}],
            },
            FEED_INTERVAL,
        ),
    ],
)
def test_feed_interval_is_a_tenth_of_the_shortest_window_unless_a_rule_watches_readings(
    spec: dict[str, Any], interval: float
) -> None:
    assert feed_interval(ProcessingConfig.model_validate(spec)) == pytest.approx(interval)


async def test_a_silent_sensor_is_found_stale_while_others_keep_flowing(tmp_path: Path) -> None:
    """Folds wait for feed_interval while readings flow; the clock's checks (a stale sensor)
    must not wait for the flow to stop."""
    cfg = ProcessingConfig.model_validate(
        {"rules": [{"name": "quiet", "sensors": "*", "stale": "0.5s"}]}
    )
    proc = Processor(cfg)
    stop = asyncio.Event()

    async def stale_alerts(log: EventLog) -> list[str | None]:
        events = await log.read(Stream.ALERTS, 0, 100)
        return [e.sensor for e in events if e.kind == "alert.raised"]

    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        task = asyncio.create_task(proc.run(log, stop))
        now = time.time()
        await log.append([Reading("b", 1.0, None, now, now, time.monotonic(), "t")])
        deadline = time.monotonic() + 10
        found: list[str | None] = []
        while time.monotonic() < deadline and "b" not in found:
            now = time.time()
            await log.append([Reading("a", 1.0, None, now, now, time.monotonic(), "t")])
            await asyncio.sleep(0.02)  # a pace, not a wait for a result
            found = await stale_alerts(log)
        stop.set()
        await task
    assert "b" in found
    assert "a" not in found
