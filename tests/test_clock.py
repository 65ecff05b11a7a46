"""Re-dating events received before a wall-clock step (agent/clock.py): pure, no clocks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from agent.clock import ClockStep, ClockWatch, Corrections, corrected
from agent.events import Event

# A Pi booted with fake-hwclock's time of its last shutdown, a week behind; NTP fixed it at
# mono 100.
SHUTDOWN = 1_764_000_000.0
REAL = SHUTDOWN + 7 * 86400.0
STEP = ClockStep(old_offset=SHUTDOWN, new_offset=REAL, mono=100.0)
THIS_RUN = {"readings": 50, "agent": 10, "aggregates": 5}


def reading(seq: int, mono: float, offset: float, device_time: float | None = None) -> Event:
    recv = mono + offset
    return Event(
        stream="readings",
        seq=seq,
        kind="reading",
        time=recv if device_time is None else device_time,
        recv_time=recv,
        mono=mono,
        sensor="t1",
        value=21.5,
        unit="C",
    )


def test_a_reading_from_before_the_step_is_re_dated_onto_the_new_clock() -> None:
    before = reading(60, mono=40.0, offset=SHUTDOWN)
    fixed = corrected(before, [STEP], THIS_RUN)
    assert fixed.recv_time == pytest.approx(40.0 + REAL)
    assert fixed.time == pytest.approx(40.0 + REAL)
    assert (fixed.seq, fixed.mono, fixed.value) == (60, 40.0, 21.5)
    # The log's event is untouched: the log keeps what was received.
    assert before.recv_time == 40.0 + SHUTDOWN


def test_a_reading_after_the_step_or_taken_before_the_watch_noticed_it_is_left_alone() -> None:
    after = reading(70, mono=120.0, offset=REAL)
    assert corrected(after, [STEP], THIS_RUN) is after
    # Stepped at mono 99, noticed at 100: this one already carries the new offset.
    between = reading(69, mono=99.5, offset=REAL)
    assert corrected(between, [STEP], THIS_RUN) is between


def test_events_of_an_earlier_run_are_left_alone() -> None:
    # seq 49 was committed before this run: its mono may be from another boot.
    old = reading(49, mono=40.0, offset=SHUTDOWN)
    assert corrected(old, [STEP], THIS_RUN) is old
    unknown = Event("deadletter", 1, "deadletter", 1.0, 1.0, 0.5)
    assert corrected(unknown, [STEP], THIS_RUN) is unknown


def test_a_device_timestamp_stays_and_an_agent_clock_time_moves() -> None:
    # The device has its own good clock: its time is near the new clock, not the old one.
    device = reading(60, mono=40.0, offset=SHUTDOWN, device_time=40.0 + REAL - 0.3)
    fixed = corrected(device, [STEP], THIS_RUN)
    assert fixed.recv_time == pytest.approx(40.0 + REAL)
    assert fixed.time == device.time
    # A window's aggregate is dated at the window's end on the agent's (old) clock.
    aggregate = Event(
        "aggregates", 7, "aggregate", 50.0 + SHUTDOWN, 48.0 + SHUTDOWN, 48.0, "t1", 21.0, "C"
    )
    fixed = corrected(aggregate, [STEP], THIS_RUN)
    assert fixed.time == pytest.approx(50.0 + REAL)
    assert fixed.recv_time == pytest.approx(48.0 + REAL)


def test_steps_compose_1970_then_the_last_shutdown_then_ntp() -> None:
    steps = [
        ClockStep(old_offset=0.0, new_offset=SHUTDOWN, mono=10.0),  # fake-hwclock restores
        ClockStep(old_offset=SHUTDOWN, new_offset=REAL, mono=100.0),  # NTP
    ]
    in_1970 = reading(55, mono=5.0, offset=0.0)
    at_shutdown = reading(56, mono=50.0, offset=SHUTDOWN)
    assert corrected(in_1970, steps, THIS_RUN).recv_time == pytest.approx(5.0 + REAL)
    assert corrected(at_shutdown, steps, THIS_RUN).recv_time == pytest.approx(50.0 + REAL)


def test_slewing_within_the_tolerance_still_matches_the_old_offset() -> None:
    slewed = reading(60, mono=40.0, offset=SHUTDOWN + 0.02)
    assert corrected(slewed, [STEP], THIS_RUN).recv_time == pytest.approx(40.0 + REAL)


def test_the_registry_applies_its_steps_only_when_enabled() -> None:
    before = reading(60, mono=40.0, offset=SHUTDOWN)
    registry = Corrections()
    registry.start(THIS_RUN, enabled=True, tolerance=2.0)
    assert registry.apply(before) is before  # no step yet
    registry.add(STEP)
    assert registry.apply(before).recv_time == pytest.approx(40.0 + REAL)
    registry.enabled = False
    assert registry.apply(before) is before
    registry.start(THIS_RUN, enabled=True, tolerance=2.0)  # a new run forgets the old steps
    assert registry.apply(before) is before


def test_the_watch_and_the_correction_agree() -> None:
    watch = ClockWatch(threshold=2.0, offset=SHUTDOWN)
    assert watch.observe(SHUTDOWN + 90.0, 90.0) is None
    step = watch.observe(REAL + 100.0, 100.0)
    assert step is not None
    fixed = corrected(reading(60, mono=40.0, offset=SHUTDOWN), [step], THIS_RUN)
    assert fixed.recv_time == pytest.approx(40.0 + REAL)


async def test_forwarded_events_are_re_dated_after_a_step(tmp_path: Path) -> None:
    """The upstream's feed applies the corrections, so every wire format sends fixed times."""
    from agent.clock import CORRECTIONS
    from agent.config import HttpUpstreamConfig, LogConfig
    from agent.events import Reading, Stream
    from agent.log import EventLog
    from agent.upstream import Feed, UpstreamStatus

    mono = time.monotonic()
    cfg = HttpUpstreamConfig(type="http", name="c", url="http://127.0.0.1:9/x", linger=0)
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        CORRECTIONS.start({s.value: log.head(s) + 1 for s in Stream}, enabled=True, tolerance=2.0)
        try:
            # Received before NTP: the Pi's clock said 1970 plus its uptime.
            received = Reading("t", 1.0, None, 100.0 + mono, 100.0 + mono, mono, "x")
            await log.append([received])
            CORRECTIONS.add(ClockStep(old_offset=100.0, new_offset=1.7e9, mono=mono + 1))
            feed = Feed(cfg, "upstream:c", UpstreamStatus())
            await feed.open(log)
            batch = await feed.next(asyncio.Event(), linger=False)
        finally:
            CORRECTIONS.start({}, enabled=False, tolerance=2.0)
    assert batch is not None
    (event,) = batch.events
    assert event.recv_time == pytest.approx(1.7e9 + mono)
    assert event.time == pytest.approx(1.7e9 + mono)
    # The log's event is still the reading as received: a correction makes a new event.
    assert (received.seq, received.time, received.recv_time) == (1, 100.0 + mono, 100.0 + mono)
