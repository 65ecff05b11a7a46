"""The endpoint's database, below HTTP: what its set-based writes leave against what storing
event by event would, the summary's arrival figures against their definition over the events,
the queries against full scans of the events, and a database an earlier version made."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from simulator import verify
from simulator.cloud import (
    RECENT_WINDOW,
    CloudStore,
    connect,
    parse_body,
    sensor_series,
    store,
    summarize,
)

LOG = "0a1b2c3d4e5f"
T0 = 1_764_170_000.5


def wire(doc: Any) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


def reading(
    seq: int, sensor: str, t: float, value: float | None, unit: str | None
) -> dict[str, Any]:
    """In the agent's key order, so that a body of these alone takes the readings fast path."""
    ev: dict[str, Any] = {
        "id": f"{LOG}:readings:{seq}", "stream": "readings", "seq": seq, "kind": "reading",
        "time": t, "recv_time": t + 0.5, "sensor": sensor, "value": value,
    }  # fmt: skip
    if unit is not None:
        ev["unit"] = unit
    return ev


def aggregate(seq: int, sensor: str, t: float, value: float) -> dict[str, Any]:
    return {
        "id": f"{LOG}:aggregates:{seq}", "stream": "aggregates", "seq": seq,
        "kind": "aggregate", "time": t, "recv_time": t + 0.25, "sensor": sensor,
        "value": value, "data": {"window": "10s", "n": seq},
    }  # fmt: skip


def body(events: list[dict[str, Any]]) -> bytes:
    return wire({"log_id": LOG, "agent": "pi-1", "sent_at": T0, "events": events})


def rows(conn: sqlite3.Connection, table: str) -> str:
    """A table's rows with each value's storage class (1 and 1.0, 0.0 and -0.0 differ)."""
    cur = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
    return repr([tuple((v, type(v).__name__) for v in row) for row in cur])


# --- the sensors' tallies, against storing event by event -----------------------------------

_READING_SQL = (
    "UPDATE sensors SET count = count + 1,"
    " unit = CASE WHEN coalesce(last_time, :t) <= :t THEN :unit ELSE unit END,"
    " last_value = CASE WHEN coalesce(last_time, :t) <= :t THEN :value ELSE last_value END,"
    " last_time = max(coalesce(last_time, :t), :t)"
    " WHERE sensor = :sensor"
)
_AGGREGATE_SQL = (
    "UPDATE sensors SET agg_kind = ?, agg_value = ?, agg_time = ?, agg_data = ?"
    " WHERE sensor = ? AND (agg_time IS NULL OR ? >= agg_time)"
)


def tally_one_by_one(conn: sqlite3.Connection, ev: dict[str, Any]) -> None:
    """The sensors row one new event leaves, with a statement or two of its own."""
    sensor = ev.get("sensor")
    if sensor is None or ev["stream"] not in ("readings", "aggregates"):
        return
    conn.execute("INSERT OR IGNORE INTO sensors (sensor) VALUES (?)", (sensor,))
    t = float(ev["time"])
    value = None if ev.get("value") is None else float(ev["value"])
    if ev["stream"] == "readings":
        params = {"t": t, "unit": ev.get("unit"), "value": value, "sensor": sensor}
        conn.execute(_READING_SQL, params)
    else:
        data = json.dumps(ev["data"]) if ev.get("data") is not None else None
        conn.execute(_AGGREGATE_SQL, (ev["kind"], value, t, data, sensor, t))


_sensors = st.sampled_from(["s1", "s2", "s3", "s4"])
_times = st.sampled_from([T0, T0 + 1, T0 + 2, 0.0, -0.0]) | st.floats(T0 - 3, T0 + 3)
_values = st.floats(-100, 100) | st.sampled_from([0.0, -0.0, 21])


@st.composite
def _events(draw: st.DrawFn) -> dict[str, Any]:
    sensor, t = draw(_sensors), draw(_times)
    if draw(st.integers(0, 3)) == 0:
        return aggregate(draw(st.integers(1, 12)), sensor, t, draw(_values))
    value = draw(_values | st.none()) if draw(st.integers(0, 9)) == 0 else draw(_values)
    unit = draw(st.sampled_from(["C", "F", None]))
    return reading(draw(st.integers(1, 40)), sensor, t, value, unit)


@st.composite
def _batches(draw: st.DrawFn) -> list[tuple[list[dict[str, Any]], float]]:
    """Bodies and their arrival times: some of readings alone (the fast path), some with
    aggregates; ids seen before (duplicates); arrival times tied or going back."""
    out = []
    at = T0 + 100
    for _ in range(draw(st.integers(1, 6))):
        if draw(st.booleans()):
            events = [draw(_events()) for _ in range(draw(st.integers(1, 12)))]
        else:  # readings in seq order: the fast path's usual body
            first = draw(st.integers(1, 30))
            events = [
                reading(
                    s,
                    draw(_sensors),
                    draw(_times),
                    draw(_values),
                    draw(st.sampled_from(["C", None])),
                )
                for s in range(first, first + draw(st.integers(1, 12)))
            ]
        at += draw(st.sampled_from([0.0, 0.5, 3.0, 20.0, -1.0]))
        out.append((events, at))
    return out


@settings(max_examples=150, deadline=None)
@given(batches=_batches(), later=st.sampled_from([0.0, 1.0, 9.0, 10.0, 30.0]))
@example(  # s1 comes first, by an aggregate; s2's reading is the first reading
    batches=[
        (
            [
                aggregate(1, "s1", T0, 1.0),
                reading(1, "s2", T0, 2.0, "C"),
                reading(2, "s1", T0, 3.0, None),
            ],
            T0 + 100,
        )
    ],
    later=0.0,
)
def test_a_batch_leaves_the_sensors_and_the_summary_as_event_by_event(
    batches: list[tuple[list[dict[str, Any]], float]], later: float
) -> None:
    """The sensors' rows are those of applying each new event alone; the summary's `recent`,
    `last_received_at` and `upstream_lag`, read from `deliveries`, are their definition over
    the events: the events received in the last 10 s, the newest arrival, now minus the newest
    `recv_time` among the events that arrived then."""
    db = connect(":memory:", create=True, sync="off")
    ref = connect(":memory:", create=True, sync="off")
    try:
        seen: set[str] = set()
        for events, at in batches:
            store(db, parse_body(body(events)), at)
            for ev in events:
                if ev["id"] not in seen:
                    seen.add(ev["id"])
                    tally_one_by_one(ref, ev)
        assert rows(db, "sensors") == rows(ref, "sensors")

        now = max(at for _, at in batches) + later
        summary = summarize(db, now)
        (recent,) = db.execute(
            "SELECT count(*) FROM events WHERE received_at >= ?", (now - RECENT_WINDOW,)
        ).fetchone()
        (last,) = db.execute("SELECT max(received_at) FROM events").fetchone()
        lag = None
        if last is not None:
            (newest,) = db.execute(
                "SELECT max(recv_time) FROM events WHERE received_at = ?", (last,)
            ).fetchone()
            lag = now - newest
        got = (summary["recent"], summary["last_received_at"], summary["upstream_lag"])
        assert repr(got) == repr((recent, last, lag))
    finally:
        db.close()
        ref.close()


# --- a series, against the same queries through the earlier index --------------------------

# The queries `sensor_series` made when every event was in an index of (sensor, kind, time).
_OLD_SERIES = (
    "SELECT avg(time), avg(value), min(value), max(value), count(*) FROM events"
    " INDEXED BY old_sensor_kind_time"
    " WHERE sensor = ? AND kind = 'reading' AND time >= ? AND time <= ?"
    " AND value IS NOT NULL"
    " GROUP BY min(CAST((time - ?) / ? AS INTEGER), ?) ORDER BY 1",
    "SELECT time, value FROM events INDEXED BY old_sensor_kind_time"
    " WHERE sensor = ? AND kind = 'aggregate'"
    " AND time >= ? AND time <= ? AND value IS NOT NULL ORDER BY time DESC LIMIT ?",
)
_sums = st.sampled_from([1e16, 1.0, -1e16, 0.1, 0.2, 0.3, 3.0, -0.0])  # sums that depend on order


@settings(max_examples=60, deadline=None)
@given(
    events=st.lists(
        st.tuples(st.sampled_from(["s1", "s2"]), st.sampled_from([T0, T0 + 1, T0 + 2]), _sums),
        min_size=1,
        max_size=40,
    ),
    points=st.sampled_from([1, 2, 3, 600]),
    aggregates=st.lists(st.sampled_from([T0, T0 + 1]), max_size=4),
)
@example(  # in time order, 0.1 + 0.2 + 0.3; in any other, another last bit
    events=[("s1", T0 + 2, 0.3), ("s1", T0, 0.1), ("s1", T0 + 1, 0.2)], points=1, aggregates=[]
)
def test_a_series_reads_what_the_earlier_index_read_in_the_same_order(
    events: list[tuple[str, float, float]], points: int, aggregates: list[float]
) -> None:
    """The readings of a series are found through an index of readings alone; with their
    times tied and sums that depend on the order they are added in, the buckets are those the
    index of every event's (sensor, kind, time) gave, to the last bit."""
    db = connect(":memory:", create=True, sync="off")
    try:
        bodies = [reading(seq, s, t, v, "C") for seq, (s, t, v) in enumerate(events, 1)]
        bodies += [aggregate(seq, "s1", t, float(seq)) for seq, t in enumerate(aggregates, 1)]
        store(db, parse_body(body(bodies)), T0 + 10)
        since, until = T0 - 1, T0 + 3
        step = (until - since) / points
        series = sensor_series(db, "s1", since, until, points)
        if series is None:
            assert all(s != "s1" for s, _, _ in events) and not aggregates
            return
        db.execute("CREATE INDEX old_sensor_kind_time ON events (sensor, kind, time)")
        old_readings = db.execute(
            _OLD_SERIES[0], ("s1", since, until, since, step, points - 1)
        ).fetchall()
        assert repr(series["readings"]) == repr([list(r) for r in old_readings])
        old_aggregates = db.execute(_OLD_SERIES[1], ("s1", since, until, points)).fetchall()
        got = [(a["time"], a["value"]) for a in series["aggregates"]]
        assert repr(got) == repr(old_aggregates[::-1])
    finally:
        db.close()


# --- no query of the live view reads every event --------------------------------------------


def test_the_summary_and_a_series_never_scan_the_events(tmp_path: Path) -> None:
    """The live page polls both, and `edge-sim verify` reads the gaps: each of their queries
    finds events through an index."""
    db = connect(tmp_path / "cloud.db", create=True, sync="off")
    try:
        store(db, parse_body(body([reading(s, "s1", T0 + s, 1.0, "C") for s in range(1, 9)])), T0)
        store(
            db, parse_body(body([aggregate(1, "s1", T0, 2.0), reading(9, "s2", T0, 3.0, None)])), T0
        )
        queries: list[str] = []
        db.set_trace_callback(queries.append)
        summarize(db, T0 + 5)
        assert sensor_series(db, "s1") is not None
        assert verify._gaps(db) == []  # `edge-sim verify` reads the gaps the same way
        db.set_trace_callback(None)
        on_events = [q for q in queries if " events " in q + " "]
        assert len(on_events) >= 7  # alerts, gaps (2); readings, aggregates, alerts of a
        # series; verify's gaps
        for sql in on_events:
            plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
            assert "SCAN events" not in plan, (sql, plan)
    finally:
        db.close()


def test_a_reading_costs_one_index_entry_beside_its_id() -> None:
    """What storing a reading costs is mostly its index entries: its id's, and its sensor's."""
    db = connect(":memory:", create=True, sync="off")
    try:
        store(db, parse_body(body([reading(s, "s1", T0 + s, 1.0, "C") for s in range(1, 9)])), T0)
        store(db, parse_body(body([aggregate(1, "s1", T0, 2.0)])), T0)
        try:
            leaf_cells = db.execute(
                "SELECT name, sum(ncell) FROM dbstat WHERE pagetype = 'leaf' GROUP BY name"
            ).fetchall()
        except sqlite3.OperationalError:
            pytest.skip("this SQLite has no dbstat table")
        on_events = {
            name: cells
            for name, cells in leaf_cells
            if name.startswith("events") or name == "sqlite_autoindex_events_1"
        }
        assert on_events == {
            "events": 9,
            "sqlite_autoindex_events_1": 9,  # the id
            "events_reading_time": 8,
            "events_other_sensor_kind_time": 1,
            "events_other_kind_time": 1,
        }
    finally:
        db.close()


# --- a database made by an earlier version ---------------------------------------------------

# The schema before the indexes of events were cut to what the queries use (verbatim).
OLD_SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id          TEXT PRIMARY KEY,
    log_id      TEXT,
    agent       TEXT,
    stream      TEXT NOT NULL,
    seq         INTEGER NOT NULL,
    kind        TEXT NOT NULL,
    sensor      TEXT,
    value       REAL,
    unit        TEXT,
    time        REAL NOT NULL,
    recv_time   REAL NOT NULL,
    received_at REAL NOT NULL,
    data        TEXT,
    raw         TEXT
);
CREATE INDEX IF NOT EXISTS events_received_at ON events (received_at);
CREATE INDEX IF NOT EXISTS events_kind_time ON events (kind, time);
CREATE INDEX IF NOT EXISTS events_sensor_kind_time ON events (sensor, kind, time);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS streams (stream TEXT PRIMARY KEY, count INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS sensors (
    sensor     TEXT PRIMARY KEY,
    count      INTEGER NOT NULL DEFAULT 0,
    unit       TEXT,
    last_value REAL,
    last_time  REAL,
    agg_kind   TEXT,
    agg_value  REAL,
    agg_time   REAL,
    agg_data   TEXT
);
CREATE TABLE IF NOT EXISTS deliveries (
    id          INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    source      TEXT NOT NULL,
    events      INTEGER NOT NULL,
    accepted    INTEGER NOT NULL,
    duplicates  INTEGER NOT NULL,
    lag         REAL NOT NULL
);
"""


def old_store(conn: sqlite3.Connection, events: list[dict[str, Any]], received_at: float) -> None:
    """The rows an earlier version wrote for a batch of new events (as far as the summary's
    arrival figures read them): the events, and a `deliveries` row without `newest_recv`."""
    conn.executemany(
        "INSERT INTO events (id, log_id, agent, stream, seq, kind, sensor, value, unit, time,"
        " recv_time, received_at) VALUES (?, ?, 'pi-1', ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [
            (e["id"], LOG, e["stream"], e["seq"], e["kind"], e["sensor"], e["value"],
             e.get("unit"), e["time"], e["recv_time"], received_at)
            for e in events
        ],
    )  # fmt: skip
    newest = max(e["recv_time"] for e in events)
    conn.execute(
        "INSERT INTO deliveries (received_at, source, events, accepted, duplicates, lag)"
        " VALUES (?, 'http', ?, ?, 0, ?)",
        (received_at, len(events), len(events), received_at - newest),
    )


def arrivals(conn: sqlite3.Connection, now: float) -> tuple[Any, ...]:
    """The summary's arrival figures by their definition over the events."""
    (recent,) = conn.execute(
        "SELECT count(*) FROM events WHERE received_at >= ?", (now - RECENT_WINDOW,)
    ).fetchone()
    (last,) = conn.execute("SELECT max(received_at) FROM events").fetchone()
    (newest,) = conn.execute(
        "SELECT max(recv_time) FROM events WHERE received_at = ?", (last,)
    ).fetchone()
    return recent, last, now - newest


def indexes(conn: sqlite3.Connection) -> set[str]:
    return {
        name
        for (name,) in conn.execute(
            "SELECT name FROM sqlite_master WHERE type = 'index' AND sql IS NOT NULL"
        )
    }


NEW_INDEXES = {
    "events_reading_time",
    "events_other_sensor_kind_time",
    "events_other_kind_time",
    "deliveries_received_at",
}


@pytest.fixture
def old_db(tmp_path: Path) -> Iterator[Path]:
    """A database as an earlier version left it: three batches, two of them received at the
    same time (the newest), one of those with an odd receive time."""
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.executescript(OLD_SCHEMA)
    old_store(conn, [reading(1, "s1", T0, 1.0, "C"), reading(2, "s2", T0 + 1, 2.0, None)], T0 + 5)
    old_store(conn, [reading(3, "s1", T0 + 2, 3.0, "C")], T0 + 9)
    old_store(conn, [reading(4, "s1", -1e-7, 4.0, "C")], T0 + 9)
    conn.close()
    yield path


@pytest.mark.parametrize("first", ["server", "reader"])
def test_a_database_of_an_earlier_version_is_brought_up_to_date(old_db: Path, first: str) -> None:
    """Opened by the endpoint (or first by a reader, `CloudStore`), an earlier version's
    database loses the indexes no longer kept, gets `deliveries.newest_recv` filled from its
    events, and shows the same summary; then it stores and summarizes as a new one does."""
    now = T0 + 12
    with sqlite3.connect(old_db) as conn:
        expected = arrivals(conn, now)
        deliveries = conn.execute("SELECT received_at, lag, events, duplicates FROM deliveries")
        expected_deliveries = [list(r) for r in deliveries]
    if first == "reader":
        with CloudStore(old_db) as reader:
            s = reader.summary(now)
            assert (s["recent"], s["last_received_at"], s["upstream_lag"]) == expected
    db = connect(old_db, create=True, sync="off")
    try:
        assert indexes(db) == NEW_INDEXES
        assert [r[0] for r in db.execute("SELECT newest_recv FROM deliveries ORDER BY id")] == [
            T0 + 1.5, T0 + 2.5, T0 + 2.5  # the two batches received at T0 + 9 share theirs
        ]  # fmt: skip
        s = summarize(db, now)
        assert (s["recent"], s["last_received_at"], s["upstream_lag"]) == expected
        assert s["deliveries"] == expected_deliveries
        assert s["streams"] == {} and s["total"] == 0  # the earlier rows of these are kept as is
        store(db, parse_body(body([reading(5, "s1", T0 + 3, 5.0, "C")])), T0 + 11)
        store(db, parse_body(body([reading(5, "s1", T0 + 3, 5.0, "C")])), T0 + 11.5)  # again
        s = summarize(db, now)
        assert (s["recent"], s["last_received_at"], s["upstream_lag"]) == arrivals(db, now)
        assert s["last_received_at"] == T0 + 11
    finally:
        db.close()
    db = connect(old_db, create=True, sync="off")  # up to date: nothing more to do
    try:
        assert indexes(db) == NEW_INDEXES
        # A page size is the file's for good (in WAL mode): only a new file has larger pages.
        assert db.execute("PRAGMA page_size").fetchone() == (4096,)
        new = connect(old_db.with_name("new.db"), create=True)
        assert new.execute("PRAGMA page_size").fetchone() == (16384,)
        new.close()
    finally:
        db.close()


def test_rows_an_earlier_version_wrote_after_an_upgrade_are_filled_too(tmp_path: Path) -> None:
    """Run an earlier version on an upgraded file (it makes its indexes again and writes
    deliveries without `newest_recv`), and the next upgrade fills those rows."""
    path = tmp_path / "cloud.db"
    db = connect(path, create=True, sync="off")
    store(db, parse_body(body([reading(1, "s1", T0, 1.0, "C")])), T0 + 1)
    db.close()
    with sqlite3.connect(path, isolation_level=None) as conn:
        conn.executescript(OLD_SCHEMA)
        old_store(conn, [reading(2, "s1", T0 - 7, 2.0, "C")], T0 + 2)
    db = connect(path, create=True, sync="off")
    try:
        assert indexes(db) == NEW_INDEXES
        assert [r[0] for r in db.execute("SELECT newest_recv FROM deliveries ORDER BY id")] == [
            T0 + 0.5, T0 - 6.5
        ]  # fmt: skip
        s = summarize(db, T0 + 3)
        assert (s["recent"], s["last_received_at"], s["upstream_lag"]) == arrivals(db, T0 + 3)
    finally:
        db.close()
