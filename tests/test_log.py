"""The event log: write-ahead, seqs and ids, cursors, quota and age with gap events."""

from __future__ import annotations

import asyncio
import json
import operator
import os
import sqlite3
import tempfile
import time
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

import agent.log
from agent.config import LogConfig
from agent.events import Event, NewEvent, Reading, Rejected, Stream
from agent.log import _SCHEMA, RECENT, CursorUpdate, EventLog


def reading(i: int, sensor: str = "t1", t: float | None = None) -> Reading:
    now = time.time() if t is None else t
    return Reading(sensor, float(i), "C", now, now, time.monotonic(), "test")


def bad(raw: bytes = b"{nope") -> Rejected:
    return Rejected(raw, "invalid_json", "Expecting value", "test", time.time(), time.monotonic())


FAST = LogConfig(commit_interval=0.0)


async def test_events_get_increasing_seqs_and_stable_ids(log_path: Path) -> None:
    async with EventLog.open(log_path, FAST) as log:
        log_id = log.log_id
        first = await log.append([reading(i) for i in range(3)])
        second = await log.append([reading(i) for i in range(3, 5)])
        assert first.ranges[Stream.READINGS] == (1, 3)
        assert second.ranges[Stream.READINGS] == (4, 5)
        ids = [e.event_id(log_id) for e in await log.read(Stream.READINGS, 0)]
    assert ids == [f"{log_id}:readings:{i}" for i in range(1, 6)]
    assert len(log_id) >= 8
    # Reopening keeps the log id and continues the seqs: ids are stable across restarts.
    async with EventLog.open(log_path, FAST) as log:
        assert log.log_id == log_id
        again = await log.append([reading(9)])
        assert again.ranges[Stream.READINGS] == (6, 6)
        assert [e.event_id(log_id) for e in await log.read(Stream.READINGS, 0)][:5] == ids


async def test_rejected_input_goes_to_deadletter_with_raw_bytes(log_path: Path) -> None:
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(1), bad(b"\xff\xfe garbage"), reading(2)])
        readings = await log.read(Stream.READINGS, 0)
        dead = await log.read(Stream.DEADLETTER, 0)
    assert [r.value for r in readings] == [1.0, 2.0]
    assert len(dead) == 1
    assert dead[0].raw == b"\xff\xfe garbage"
    assert dead[0].data is not None and dead[0].data["reason"] == "invalid_json"


async def test_consumers_see_only_committed_events(log_path: Path) -> None:
    """Write-ahead: nothing is readable, and no ack runs, before the commit returns."""
    async with EventLog.open(log_path, LogConfig(commit_interval=0.3)) as log:
        await log.append([reading(0)])  # the next commit is now at least 0.3 s away
        acked: list[bool] = []
        future = await log.submit([reading(1)])
        future.add_done_callback(lambda f: acked.append(True))
        assert log.head(Stream.READINGS) == 1
        assert [e.value for e in await log.read(Stream.READINGS, 0)] == [0.0]
        assert not acked
        # What a reader sees must already be in the file: check from a second connection.
        await future
        assert acked == [True]
        other = sqlite3.connect(log_path)
        assert other.execute("SELECT count(*) FROM events WHERE stream=1").fetchone()[0] == 2
        other.close()


async def test_group_commit_batches_grow_with_load(log_path: Path) -> None:
    async with EventLog.open(log_path, LogConfig(commit_interval=0.05, max_batch=700)) as log:
        futures = [await log.submit([reading(i)]) for i in range(2000)]
        await asyncio.gather(*futures)
        assert log.stats.events_written == 2000
        # Many submissions shared a commit, but no commit exceeded max_batch.
        assert log.stats.commits < 100
        assert log.stats.max_commit_size <= 700


async def test_submit_applies_back_pressure_when_queue_is_full(log_path: Path) -> None:
    async with EventLog.open(log_path, LogConfig(commit_interval=0.2, queue_size=10)) as log:
        await log.append([reading(0)])
        await log.submit([reading(i) for i in range(8)])
        blocked = asyncio.create_task(log.submit([reading(i) for i in range(5)]))
        await asyncio.sleep(0)
        assert not blocked.done(), "a full queue must make producers wait"
        assert log.queued <= 10
        await asyncio.wait_for(blocked, 5)
        await blocked.result()


async def test_cursor_moves_with_events_in_one_transaction(log_path: Path) -> None:
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(i) for i in range(10)])
        agg = NewEvent("aggregate", 1.0, 1.0, 1.0, sensor="t1", value=4.5)
        await log.append(
            events={Stream.AGGREGATES: [agg]},
            cursors=[CursorUpdate("proc", Stream.READINGS, 10, '{"x": 1}')],
        )
        assert log.cursor("proc", Stream.READINGS) == 10
    async with EventLog.open(log_path, FAST) as log:
        assert log.cursor("proc", Stream.READINGS) == 10
        assert await log.cursor_state("proc", Stream.READINGS) == '{"x": 1}'
        assert log.head(Stream.AGGREGATES) == 1


async def test_wait_for_wakes_on_commit(log_path: Path) -> None:
    async with EventLog.open(log_path, FAST) as log:
        waiter = asyncio.create_task(log.wait_for(Stream.ALERTS, 0, within=5))
        await asyncio.sleep(0)
        assert not waiter.done()
        await log.append(events={Stream.ALERTS: [NewEvent("alert.raised", 1, 1, 1)]})
        assert await asyncio.wait_for(waiter, 5) is True
        assert await log.wait_for(Stream.ALERTS, 1, within=0.05) is False


async def test_quota_drops_oldest_readings_and_records_gap(log_path: Path) -> None:
    cfg = LogConfig(commit_interval=0.0, quota=512 * 1024, retention_interval=3600)
    async with EventLog.open(log_path, cfg) as log:
        await log.register("upstream:cloud", [Stream.READINGS])
        now = time.time()
        alert = NewEvent("alert.raised", now, now, 1, sensor="t1", value=99.0)
        await log.append(events={Stream.ALERTS: [alert]})
        for start in range(0, 20_000, 1000):
            await log.append(
                [reading(i, sensor=f"sensor-{i % 7}") for i in range(start, start + 1000)]
            )
        assert await log.disk_usage() > cfg.quota
        await log.enforce_retention()
        assert await log.disk_usage() <= cfg.quota
        tail = log.tail(Stream.READINGS)
        assert tail > 1, "the oldest readings must have been dropped"
        kept = await log.read(Stream.READINGS, 0, limit=1)
        assert kept[0].seq == tail, "what is kept starts right after what was dropped"
        assert log.head(Stream.READINGS) == 20_000, "seqs never go back"
        # Alerts are never dropped for space.
        assert [e.kind for e in await log.read(Stream.ALERTS, 0)] == ["alert.raised"]
        gaps = [e for e in await log.read(Stream.AGENT, 0) if e.kind == "gap"]
        assert len(gaps) == 1
        gap = gaps[0].data
        assert gap is not None
        assert gap["reason"] == "quota" and gap["stream"] == "readings"
        assert gap["first_seq"] == 1 and gap["last_seq"] == tail - 1
        assert gap["count"] == tail - 1 == gap["unconsumed"]
        assert gap["first_recv_time"] <= gap["last_recv_time"]
        assert log.stats.dropped == {"readings": tail - 1}


async def test_max_age_prunes_consumed_and_reports_unconsumed(log_path: Path) -> None:
    cfg = LogConfig(commit_interval=0.0, max_age=3600, retention_interval=3600)
    old = time.time() - 7200
    async with EventLog.open(log_path, cfg) as log:
        await log.register("up", [Stream.READINGS])
        await log.append([reading(i, t=old + i) for i in range(10)])
        await log.append([reading(i) for i in range(10, 15)])
        await log.append(cursors=[CursorUpdate("up", Stream.READINGS, 4)])
        await log.enforce_retention()
        assert log.tail(Stream.READINGS) == 11
        gaps = [e.data for e in await log.read(Stream.AGENT, 0) if e.kind == "gap"]
        assert len(gaps) == 1 and gaps[0] is not None
        assert gaps[0]["reason"] == "max_age"
        assert gaps[0]["count"] == 10 and gaps[0]["unconsumed"] == 6


async def test_max_age_prunes_what_every_consumer_has_seen_without_a_gap(log_path: Path) -> None:
    cfg = LogConfig(commit_interval=0.0, max_age=3600, retention_interval=3600)
    async with EventLog.open(log_path, cfg) as log:
        await log.register("up", [Stream.READINGS])
        await log.append([reading(i, t=time.time() - 7200) for i in range(5)])
        await log.append(cursors=[CursorUpdate("up", Stream.READINGS, 5)])
        await log.enforce_retention()
        assert log.tail(Stream.READINGS) == 6
        assert [e for e in await log.read(Stream.AGENT, 0) if e.kind == "gap"] == []
        assert log.stats.pruned == {"readings": 5}


async def test_seqs_survive_a_stream_emptied_by_the_quota(log_path: Path) -> None:
    cfg = LogConfig(commit_interval=0.0, max_age=60, retention_interval=3600)
    async with EventLog.open(log_path, cfg) as log:
        await log.append([reading(i, t=time.time() - 3600) for i in range(5)])
        await log.enforce_retention()
        assert log.tail(Stream.READINGS) == 6
    async with EventLog.open(log_path, cfg) as log:
        committed = await log.append([reading(99)])
        assert committed.ranges[Stream.READINGS] == (6, 6)


async def test_seq_at_finds_time(log_path: Path) -> None:
    base = time.time() - 1000
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(i, t=base + i) for i in range(100)])
        assert await log.seq_at(Stream.READINGS, base + 50) == 50
        assert await log.seq_at(Stream.READINGS, base - 10) == 0
        assert await log.seq_at(Stream.READINGS, base + 500) == 100


@pytest.mark.parametrize("sync", ["full", "normal"])
async def test_wal_mode_and_synchronous(log_path: Path, sync: str) -> None:
    async with EventLog.open(log_path, LogConfig(synchronous=sync)) as log:  # type: ignore[arg-type]
        await log.append([reading(1)])
    db = sqlite3.connect(log_path)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    db.close()


async def test_late_consumer_reads_history_and_can_replay_by_time(log_path: Path) -> None:
    base = time.time() - 100
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(i, t=base + i) for i in range(50)])
        # A consumer that joins now starts at the beginning: it sees every event.
        await log.register("late", [Stream.READINGS])
        assert [
            e.seq for e in await log.read(Stream.READINGS, log.cursor("late", Stream.READINGS))
        ] == list(range(1, 51))
        await log.append(cursors=[CursorUpdate("late", Stream.READINGS, 50)])
        assert await log.rewind("late", Stream.READINGS, since=base + 40) == 40
        replay = await log.read(Stream.READINGS, log.cursor("late", Stream.READINGS))
        assert [e.value for e in replay] == [float(i) for i in range(40, 50)]
        assert await log.rewind("late", Stream.READINGS, seq=10) == 10
        with pytest.raises(ValueError):
            await log.rewind("late", Stream.READINGS)


async def test_wal_stays_bounded(log_path: Path) -> None:
    async with EventLog.open(log_path, LogConfig(commit_interval=0, retention_interval=0.5)) as log:
        for start in range(0, 300_000, 10_000):
            await log.append([reading(i) for i in range(start, start + 10_000)])
        await log.enforce_retention()
        assert wal_size(log_path) <= 16 * 2**20
    # Closing checkpoints and truncates the WAL.
    assert wal_size(log_path) == 0


def wal_size(log_path: Path) -> int:
    wal = f"{log_path}-wal"
    return os.path.getsize(wal) if os.path.exists(wal) else 0


async def test_recent_events_from_memory_equal_the_stored_ones(log_path: Path) -> None:
    """Consumers that keep up read the newest events from memory: they must be exactly what
    a query returns (the same JSON round trip for data, floats stay floats, seqs contiguous)."""
    cfg = LogConfig(commit_interval=0.0, max_age=60, retention_interval=3600)
    now = time.time()
    agg = NewEvent(
        "aggregate", now, now, 1.0, sensor="t1", value=2, unit="C", data={"n": (1, 2), 3: "x"}
    )
    async with EventLog.open(log_path, cfg) as log:
        await log.register("up", list(Stream))  # every stream is read: all kept in memory
        await log.append([reading(i, t=now - 3600) for i in range(3)])
        await log.append([reading(3), bad(b"\xff raw"), Reading("t2", 7, None, now, now, 2.0, "t")])
        await log.append(events={Stream.AGGREGATES: [agg], Stream.ALERTS: [agg]})
        await log.enforce_retention()  # drops the 3 old readings, appends a gap to `agent`
        await log.append(events={Stream.AGENT: [agg]})
        in_memory = {s: await log.read(s, 0) for s in Stream}
        from_disk = {s: await log.read(s, 0) for s in Stream}
        log._recent[Stream.READINGS].clear()  # what a consumer far behind gets: a query
        queried_readings = await log.read(Stream.READINGS, 0)
    async with EventLog.open(log_path, cfg) as reopened:  # nothing in memory: all queried
        queried = {s: await reopened.read(s, 0) for s in Stream}

    def wire(events: dict[Stream, list[Event]]) -> str:  # 7 == 7.0, but not on the wire
        return json.dumps({s: [e.to_wire("x") for e in v] for s, v in events.items()})

    assert in_memory == from_disk == queried
    assert wire(in_memory) == wire(queried)
    assert queried_readings == queried[Stream.READINGS]
    assert [e.seq for e in queried[Stream.READINGS]] == [4, 5]
    assert [e.kind for e in queried[Stream.AGENT]] == ["gap", "aggregate"]
    assert [e.seq for e in queried[Stream.AGENT]] == [1, 2]
    assert queried[Stream.AGGREGATES][0].data == {"n": [1, 2], "3": "x"}
    assert type(queried[Stream.READINGS][1].value) is float
    # Reading from the middle of what is in memory.
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(i) for i in range(10)])
        middle = await log.read(Stream.READINGS, 8, limit=3)
        assert [e.seq for e in middle] == [9, 10, 11]


async def test_reading_rows_are_compact_and_read_back_whole(log_path: Path) -> None:
    """A reading's row stores no kind and no time equal to its receive time (bytes on the SD
    card); what is read back is the whole event."""
    now = time.time()
    async with EventLog.open(log_path, FAST) as log:
        await log.append([Reading("t1", 1.0, "C", now, now, 1.0, "x")])
        await log.append([Reading("t1", 2.0, "C", now - 5, now, 2.0, "x")])  # a device clock
        log._recent[Stream.READINGS].clear()
        events = await log.read(Stream.READINGS, 0)
    assert [(e.kind, e.time, e.recv_time) for e in events] == [
        ("reading", now, now),
        ("reading", now - 5, now),
    ]
    con = sqlite3.connect(log_path)
    rows = con.execute("SELECT kind, time FROM events WHERE stream=1 ORDER BY seq").fetchall()
    con.close()
    assert rows == [(None, None), (None, now - 5)]


async def test_a_log_with_the_older_full_rows_keeps_working(log_path: Path) -> None:
    """Logs created before compact rows have NOT NULL kind and time: they get full rows."""
    con = sqlite3.connect(log_path)
    con.executescript(
        _SCHEMA.replace("kind TEXT,", "kind TEXT NOT NULL,").replace(
            "time REAL,", "time REAL NOT NULL,"
        )
    )
    con.close()
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(1), reading(2)])
        log._recent[Stream.READINGS].clear()
        assert [e.kind for e in await log.read(Stream.READINGS, 0)] == ["reading", "reading"]
    con = sqlite3.connect(log_path)
    assert con.execute("SELECT count(*) FROM events WHERE kind='reading'").fetchone() == (2,)
    con.close()


async def test_streams_nobody_reads_are_not_kept_in_memory(log_path: Path) -> None:
    async with EventLog.open(log_path, FAST) as log:
        await log.append([reading(i) for i in range(5)])
        assert not log._recent[Stream.READINGS], "no consumer: nothing built for it"
        await log.register("late", [Stream.READINGS])
        await log.append([reading(i) for i in range(5, 8)])
        assert [e.seq for e in log._recent[Stream.READINGS]] == [6, 7, 8]
        # The late consumer still reads everything: the older part from SQLite.
        assert [e.seq for e in await log.read(Stream.READINGS, 0)] == list(range(1, 9))
        assert [e.seq for e in await log.read(Stream.READINGS, 6)] == [7, 8]


_UNITS = st.sampled_from([None, "C", "%", "µS/cm"])
_FLOATS = st.floats(allow_nan=False, allow_infinity=False, width=64)


@st.composite
def _items(draw: st.DrawFn) -> Reading | Rejected:
    if draw(st.integers(0, 9)) == 0:
        return bad(draw(st.binary(max_size=8)))
    recv = draw(st.floats(1e9, 2e9))
    # A device clock, or none (the event time is then the receive time, stored as NULL).
    when = draw(st.one_of(st.just(recv), st.floats(1e9, 2e9)))
    sensor = draw(st.sampled_from(["t1", "rh", "a.b-c_d"]))
    return Reading(sensor, draw(_FLOATS), draw(_UNITS), when, recv, draw(_FLOATS), "test")


@st.composite
def _submission(draw: st.DrawFn) -> list[Reading | Rejected]:
    # The count drawn first: plain lists stay short. The largest statements (256 rows) get
    # the @example below: hypothesis drawing that many items is slow.
    n = draw(st.integers(0, 200))
    return draw(st.lists(_items(), min_size=n, max_size=n))


_PLAIN = [Reading(s, 1.5, None, 1.7e9, 1.7e9, 5.0, "test") for s in ("t1", "rh", "t1")]
# Each statement size once or more (256 + 256 + 64 + 16 + 8 + 4 + 2 + 1 with a unit column,
# then the same without), every row different.
_LONG = [
    Reading(f"s{i % 7}", i / 3, "C" if i % 5 else None, 1.7e9 + i, 1.7e9 + i / 2, i, "test")
    for i in range(607)
]
_LONG_PLAIN = [Reading(f"s{i % 3}", i * 1.5, None, 1.7e9, 1.7e9, i, "test") for i in range(607)]


@settings(max_examples=30, deadline=None)
@given(st.lists(_submission(), min_size=1, max_size=4))
@example([_PLAIN, [*_PLAIN[:2], bad(), _PLAIN[2]], _PLAIN])  # readings only, then a reject
@example([_LONG, _LONG_PLAIN])
def test_readings_read_back_from_disk_as_committed(submissions: list[list[Any]]) -> None:
    """Readings go in by multi-row statements of several sizes, with and without a unit
    column: whatever the counts, units and rejects of the submissions in one commit, SQLite
    gives back each reading whole, at the seq the log assigned, as the memory cache has it."""

    def fields(events: list[Event]) -> list[tuple[Any, ...]]:
        return [
            (e.seq, e.kind, e.time, e.recv_time, e.mono, e.sensor, e.value, e.unit) for e in events
        ]

    async def run(path: Path) -> None:
        async with EventLog.open(path, LogConfig(commit_interval=0.05)) as log:
            await log.register("c", [Stream.READINGS])
            # Submitted back to back: they go in one commit (or a few).
            futures = [await log.submit(items) for items in submissions]
            await asyncio.gather(*futures)
            head = log.head(Stream.READINGS)
            cached = await log.read(Stream.READINGS, 0, limit=10_000)
            log._recent[Stream.READINGS].clear()
            stored = await log.read(Stream.READINGS, 0, limit=10_000)  # on the loop's thread
            with mock.patch.object(agent.log, "HOT", -1):  # all of it through the thread
                through_thread = await log.read(Stream.READINGS, 0, limit=10_000)
        readings = [r for items in submissions for r in items if isinstance(r, Reading)]
        expected = [
            (i, "reading", r.time, r.recv_time, r.mono, r.sensor, r.value, r.unit)
            for i, r in enumerate(readings, 1)
        ]
        assert head == len(readings)
        assert fields(stored) == expected
        assert fields(through_thread) == expected
        assert fields(cached) == expected

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(Path(tmp) / "log.db"))


async def test_only_input_waits_for_room_in_the_queue(log_path: Path) -> None:
    """Input that finds the queue full waits (back-pressure); what consumers submit (cursor
    moves, alerts, aggregates) never queues behind it, or an upstream draining a burst would
    stall on its every acknowledgement. The writer is held by a gate (a stand-in for a slow
    disk) so that the queue stays full."""
    async with EventLog.open(log_path, LogConfig(commit_interval=0.0, queue_size=10)) as log:
        gate = asyncio.Event()
        commit = log._commit

        async def held(batch: Any) -> None:
            await gate.wait()
            await commit(batch)

        with mock.patch.object(log, "_commit", held):
            first = await log.submit([reading(i) for i in range(10)])
            waiting = asyncio.ensure_future(log.submit([reading(10)]))
            alert = NewEvent("alert.raised", 1.0, 1.0, 1.0, sensor="t1", data={"rule": "hot"})
            moved = await asyncio.wait_for(
                log.submit(cursors=[CursorUpdate("c", Stream.READINGS, 0)]), 5
            )
            raised = await asyncio.wait_for(log.submit(events={Stream.ALERTS: [alert]}), 5)
            for _ in range(20):  # turns of the loop, in which the input could have gone in
                await asyncio.sleep(0)
            assert not waiting.done()
            gate.set()
            await asyncio.gather(first, moved, raised, await waiting)
        assert log.head(Stream.READINGS) == 11 and log.head(Stream.ALERTS) == 1


async def test_a_committed_reading_is_the_event_consumers_read(log_path: Path) -> None:
    """One object per reading from its decoder to every consumer: the commit gives it its
    seq, and consumers that keep up read that very object, as SQLite gives it back."""
    async with EventLog.open(log_path, FAST) as log:
        await log.register("c", [Stream.READINGS, Stream.DEADLETTER])
        items = [reading(i) for i in range(3)]
        assert [r.seq for r in items] == [0, 0, 0]
        await log.append([items[0], bad(), items[1], items[2]])
        cached = await log.read(Stream.READINGS, 0)
        log._recent[Stream.READINGS].clear()
        stored = await log.read(Stream.READINGS, 0)
    assert [r.seq for r in items] == [1, 2, 3]
    assert all(map(operator.is_, cached, items))
    # From disk, readings too: the same type, without the source (it is not stored).
    assert [(type(e), e.source) for e in stored] == [(Reading, "")] * 3
    assert stored == cached and cached == stored
    fields = ("stream", "seq", "kind", "time", "recv_time", "mono", "sensor", "value", "unit")
    as_event = Event(**{f: getattr(items[0], f) for f in fields})
    assert as_event == items[0] and items[0] == as_event and items[1] != as_event
    assert [e.to_wire("L") for e in cached] == [e.to_wire("L") for e in stored]
    with pytest.raises(AttributeError):
        items[0].stream = "alerts"  # type: ignore[misc]
    assert items[0] != reading(0) and "seq=1" in repr(items[0])


async def test_a_commit_larger_than_recent_stays_in_memory_until_the_next(
    log_path: Path,
) -> None:
    """A burst commits more than RECENT events at once: a consumer that was at the head must
    still read all of them from memory (reading them back from SQLite costs several times as
    much, and made a consumer that fell behind once stay behind). Memory stays bounded: the
    latest commit and RECENT events before it."""
    async with EventLog.open(log_path, FAST) as log:
        await log.register("c", [Stream.READINGS])
        await log.append([reading(i) for i in range(10)])
        await log.append([reading(i) for i in range(3 * RECENT)])
        recent = log._recent[Stream.READINGS]
        assert [e.seq for e in recent] == list(range(1, 3 * RECENT + 11))
        await log.append([reading(i) for i in range(5)])
        head = log.head(Stream.READINGS)
        assert [e.seq for e in recent] == list(range(head - RECENT - 4, head + 1))
        for _ in range(3):
            await log.append([reading(i) for i in range(7)])
        assert [e.seq for e in recent] == list(range(head + 21 - RECENT - 6, head + 22))


async def test_a_consumer_reading_behind_the_head_finds_its_events_in_memory(
    log_path: Path,
) -> None:
    """During a burst an upstream reads thousands of events behind the input. The cache keeps
    what a consumer that read lately still needs, up to queue_size events: trimmed to RECENT, it
    lost them just before they were read, and the upstream read every one back from SQLite,
    fell further behind, and stayed there (end to end, a quarter slower)."""
    async with EventLog.open(log_path, FAST) as log:
        await log.register("c", [Stream.READINGS])
        first = [reading(i) for i in range(3 * RECENT)]
        await log.append(first)
        got = await log.read(Stream.READINGS, 11, 10)  # a consumer 3 * RECENT - 11 behind
        assert got[0] is first[11], "from memory: the very object submitted"
        await log.read(Stream.READINGS, 1, 10)  # another, further behind
        second = [reading(i) for i in range(3 * RECENT)]
        await log.append(second)
        got = await log.read(Stream.READINGS, 1, 10)
        assert got[0] is first[1] and [e.seq for e in got] == list(range(2, 12))
        got = await log.read(Stream.READINGS, 11, 10)
        assert got[0] is first[11] and [e.seq for e in got] == list(range(12, 22))
        # The hold lasts while the consumer reads (from its lowest read within HOLD).
        third = [reading(i) for i in range(10)]
        await log.append(third)
        assert next(iter(log._recent[Stream.READINGS])).seq == 2
        got = await log.read(Stream.READINGS, 6 * RECENT - 5, 100)
        assert got[0] is second[-5] and got[-1] is third[-1]


async def test_the_memory_held_for_a_lagging_consumer_is_bounded(
    log_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most queue_size events before the latest commit (the bound of what waits to be
    committed too), and only for a consumer that read within queue_size of the head within
    HOLD: one far behind reads SQLite anyway, and one that stopped reading (an upstream
    backing off in an outage) holds nothing."""
    async with EventLog.open(log_path, LogConfig(commit_interval=0.0, queue_size=5000)) as log:
        await log.register("c", [Stream.READINGS])
        recent = log._recent[Stream.READINGS]
        await log.append([reading(i) for i in range(6000)])
        await log.read(Stream.READINGS, 0, 1)  # 6000 behind: beyond queue_size, no hold
        await log.append([reading(i) for i in range(100)])
        assert [e.seq for e in recent] == list(range(6001 - RECENT, 6101))
        await log.read(Stream.READINGS, 6100 - RECENT, 1)  # in memory, RECENT behind
        await log.append([reading(i) for i in range(4000)])
        assert next(iter(recent)).seq == 6101 - RECENT, "held for the reader"
        await log.append([reading(i) for i in range(4000)])
        # The reader is now 8,000 + RECENT behind: the cache keeps queue_size before the commit.
        assert [e.seq for e in recent] == list(range(10101 - 5000, 14101))
        monkeypatch.setattr(agent.log, "HOLD", 0.0)  # the reader stopped reading long ago
        await log.append([reading(i) for i in range(10)])
        assert [e.seq for e in recent] == list(range(14101 - RECENT, 14111))


_OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.integers(0, 700)),
        st.tuples(st.just("keep"), st.integers(-5, 3000)),
        st.tuples(st.just("drop"), st.integers(-5, 3000)),
        st.tuples(st.just("read"), st.integers(-5, 3000), st.integers(1, 600)),
        st.just(("clear",)),
    ),
    max_size=40,
)


@given(_OPS)
@example([("add", 700), ("keep", 40), ("read", 660, 5), ("add", 3), ("drop", 680), ("keep", 9)])
@settings(max_examples=60, deadline=None)
def test_the_memory_cache_is_the_newest_events_in_seq_order(ops: list[tuple[Any, ...]]) -> None:
    """`_Recent` (a list and an index) against a plain list of the same events, through
    appends, trims, deletions and reads; the example cuts the dead head off (512 and up)."""
    cache, model, head = agent.log._Recent(), [], 0
    for op in ops:
        if op[0] == "add":
            events = [mock.Mock(seq=head + 1 + i) for i in range(op[1])]
            head += op[1]
            if events and len(events) % 2:
                cache.append(events[0])
                cache.extend(events[1:])
            else:
                cache.extend(events)
            model += events
        elif op[0] == "keep":
            cache.keep(op[1])
            model = model[len(model) - max(op[1], 0) :] if op[1] < len(model) else model
        elif op[0] == "drop":
            cache.drop_through(op[1])
            model = [e for e in model if e.seq > op[1]]
        elif op[0] == "read":
            found = cache.after(op[1], op[2])
            start = [i for i, e in enumerate(model) if e.seq == op[1] + 1]
            assert found == (model[start[0] : start[0] + op[2]] if start else None)
        else:
            cache.clear()
            model = []
        assert list(cache) == model and len(cache) == len(model)


class _LockedConnection:
    """A fake, named as such: the loop's connection finding the file locked. A real lock that
    stops a WAL reader (recovery, an exclusive-mode writer) cannot be taken while the log
    holds its own connections open."""

    def __init__(self) -> None:
        self.tries = 0

    def execute(self, sql: str, params: Any = ()) -> Any:
        self.tries += 1
        raise sqlite3.OperationalError("database is locked")


async def test_a_read_the_loop_finds_locked_goes_through_the_thread(log_path: Path) -> None:
    """Readings near the head are read on the event loop's thread, which never waits for a
    lock: the connection there has no busy timeout, and a read it finds locked goes through
    the database thread (which waits its turn) and gives what it would have."""
    async with EventLog.open(log_path, FAST) as log:
        await log.register("c", [Stream.READINGS])
        await log.append([reading(i) for i in range(10)])
        log._recent[Stream.READINGS].clear()  # from the file, not the memory cache
        expected = [e.seq for e in await log.read(Stream.READINGS, 0)]
        hot = log._hot_db
        assert hot is not None and hot.execute("PRAGMA busy_timeout").fetchone() == (0,)
        locked = _LockedConnection()
        log._hot_db = locked  # type: ignore[assignment]
        got = [e.seq for e in await log.read(Stream.READINGS, 0)]
        log._hot_db = hot
    assert locked.tries == 1
    assert got == expected == list(range(1, 11))
