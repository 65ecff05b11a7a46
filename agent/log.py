"""The event log: SQLite in WAL mode, one writer, group commit, cursors, quota.

Every event enters the agent here before anything else happens to it (write-ahead). The log is
the channel between producers (drivers, processors) and consumers (processors, forwarders,
actions): each consumer keeps named cursors, reads what was committed after them, and moves
them only once its own effect is durable.

Concurrency: one writer task owns the write connection; `submit` only queues. Readers share a
second connection. Consumers only ever see committed events, because the in-memory heads they
wait on are advanced after the COMMIT returns. The newest committed events of each stream are
also kept in memory (`RECENT`, and while a consumer reads behind the head, what it still
needs, up to `queue_size`): readings as the very objects submitted, now with their seq, other
events built once when committed. Consumers that keep up, which in steady state is all of
them, read them without a query and without each building its own copy. Events handed out
(and readings once submitted) are shared and must be treated as read-only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import sqlite3
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain, islice, repeat, starmap
from operator import attrgetter, countOf
from pathlib import Path
from typing import Any

import aiosqlite

from agent.config import LogConfig
from agent.events import Event, NewEvent, Reading, Rejected, Stream

log = logging.getLogger(__name__)

# Streams are stored as small integers: a reading row is written a million times a day on a
# Pi's SD card, and the stream name would otherwise be a third of its key.
STREAM_CODES: dict[Stream, int] = {
    Stream.READINGS: 1,
    Stream.AGGREGATES: 2,
    Stream.ALERTS: 3,
    Stream.AGENT: 4,
    Stream.DEADLETTER: 5,
}
CODE_STREAMS = {code: stream for stream, code in STREAM_CODES.items()}

#: The page size of new logs. Every commit rewrites the pages it touched in the WAL: the
#: rightmost leaf of the events table and its parents, the cursors page. At 4 KiB pages those
#: dominate what an SD card gets at 10 commits/s (bench/soak.py setup, input and log only:
#: 380 bytes written per reading at 4 KiB, 317 at 2 KiB, 266 at 1 KiB, for ~76 stored).
PAGE_SIZE = 1024

#: Page cache per connection (writer and reader), KiB.
CACHE_KIB = 512

#: Committed events kept in memory per stream for consumers that keep up, besides those of the
#: latest commit (a few commits' worth at the rates a Pi sees; older reads go to SQLite).
#: A commit can be larger (up to `max_batch`): its events are all kept until the next one, so
#: a consumer that was at the head still finds the whole commit here during a burst.
RECENT = 2048
#: A consumer that reads behind the head keeps the events after it in memory, besides the
#: latest commit, up to the log's `queue_size` (50,000 by default): the one bound on the
#: readings a burst holds in memory on either side of the log. During a burst an upstream
#: reads some thousands of readings behind the input (in bench/e2e.py mode b: 9,000 at the
#: median, 35,000 at most). Trimmed to `RECENT`, the cache lost what it was about to read: it
#: read them back from SQLite instead, each row a hand-over of the GIL with the writer (3-5 µs
#: a row, where memory costs nothing), fell further behind and never caught up while the burst
#: lasted; end to end went from 112-121k readings/s to 82-88k. A read holds the events after it
#: for `HOLD` seconds, so in steady state the cache stays at `RECENT`, and a consumer that
#: stopped reading (an upstream backing off in an outage) holds nothing.
HOLD = 1.0
#: Readings this close to the head are read on the event loop's own thread (see `read`).
HOT = 250_000

_STREAMS = tuple(Stream)  # iterating the enum class itself runs a Python generator each time

# The order in which a full disk gives up events: readings first, alerts and gaps never.
DROP_ORDER = (Stream.READINGS, Stream.DEADLETTER, Stream.AGGREGATES)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    kind TEXT,
    time REAL,
    recv_time REAL NOT NULL,
    mono REAL NOT NULL,
    sensor TEXT,
    value REAL,
    unit TEXT,
    data TEXT,
    raw BLOB,
    PRIMARY KEY (stream, seq)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS heads (stream INTEGER PRIMARY KEY, seq INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS cursors (
    consumer TEXT NOT NULL,
    stream INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    state TEXT,
    updated REAL NOT NULL,
    PRIMARY KEY (consumer, stream)
);
"""

_INSERT = (
    "INSERT INTO events (stream, seq, kind, time, recv_time, mono, sensor, value, unit, data, raw)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_SELECT = (
    "SELECT seq, coalesce(kind, 'reading'), coalesce(time, recv_time), recv_time, mono, sensor,"
    " value, unit, data, raw FROM events"
)
# Readings (no data, no raw: the bulk of a backlog) as `Reading`'s positional arguments, for
# `starmap` straight into the constructor: no wrapper per row (that was half the cost). As
# Readings rather than Events, a consumer gets the same type from disk as from memory, and
# the row has no constant kind column to build (with both, 20-30 % less per row).
_SELECT_READINGS = (
    "SELECT sensor, value, unit, coalesce(time, recv_time), recv_time, mono, '', seq"
    f" FROM events WHERE stream={STREAM_CODES[Stream.READINGS]} AND seq>? AND seq<=?"
    " ORDER BY seq LIMIT ?"
)


#: Each stream's newest seq as `(code, seq)` rows, for tools reading the log beside the agent:
#: the newest row's seq, or the `heads` row a drop left when it emptied the stream (commits do
#: not write `heads`, to spare the SD card a page per commit).
HEADS_SQL = (
    "WITH codes(code) AS (VALUES "
    + ", ".join(f"({c})" for c in STREAM_CODES.values())
    + ") SELECT code, max(coalesce((SELECT max(seq) FROM events WHERE stream=code), 0),"
    " coalesce((SELECT seq FROM heads WHERE stream=code), 0)) FROM codes"
)


class LogError(Exception):
    """The log cannot be opened or written."""


@dataclass(slots=True, frozen=True)
class CursorUpdate:
    """Move `consumer`'s cursor on `stream` to `seq` (and keep its state), in the same commit."""

    consumer: str
    stream: Stream
    seq: int
    state: str | None = None


@dataclass(slots=True)
class Committed:
    """What a submission became: per stream, the seq of its first and last event."""

    ranges: dict[Stream, tuple[int, int]] = field(default_factory=dict)


class _Recent:
    """One stream's newest committed events, oldest first (see `RECENT`, `HOLD`).

    A list and the index of its oldest kept event: a read is a slice, where a deque walks from
    its end to the first event returned (thousands of steps a read for a consumer behind the
    head), and trimming moves the index, the dead head cut off in one move of what is left
    once it is an eighth as long.
    """

    __slots__ = ("_events", "_start")

    def __init__(self) -> None:
        self._events: list[Event] = []
        self._start = 0

    def __len__(self) -> int:
        return len(self._events) - self._start

    def __iter__(self) -> Iterator[Event]:
        return islice(self._events, self._start, None)

    def clear(self) -> None:
        self._events.clear()
        self._start = 0

    def append(self, event: Event) -> None:
        self._events.append(event)

    def extend(self, events: Iterable[Event]) -> None:
        self._events.extend(events)

    def after(self, seq: int, limit: int) -> list[Event] | None:
        """Up to `limit` events from `seq` + 1 on; None unless the first of them is here."""
        events, start = self._events, self._start
        if start == len(events):
            return None
        i = start + seq + 1 - events[start].seq
        if not start <= i < len(events):
            return None
        found = events[i : i + limit]
        return found if found[0].seq == seq + 1 else None  # contiguous, as it always is

    def keep(self, n: int) -> None:
        """Keep only the newest `n` events."""
        events = self._events
        self._start = start = max(self._start, len(events) - max(n, 0))
        if start >= 512 and start * 8 >= len(events):
            del events[:start]
            self._start = 0

    def drop_through(self, seq: int) -> None:
        """Drop the events up to `seq` (deleted from the log)."""
        if self._start < len(self._events):  # contiguous seqs: the newest says how many follow
            self.keep(self._events[-1].seq - seq)


@dataclass(slots=True)
class _Readers:
    """Where consumers read a stream lately (see `HOLD`): the lowest seq read after in the
    current window of `HOLD` seconds and in the one before it, and when the current began."""

    low: int = 0
    previous: int = 0
    since: float = float("-inf")

    def note(self, after: int, now: float) -> None:
        """A consumer read the events after `after`."""
        if now - self.since >= HOLD:  # a new window; the last one counts if it just ended
            self.previous = self.low if now - self.since < 2 * HOLD else after
            self.low, self.since = after, now
        elif after < self.low:
            self.low = after

    def floor(self, now: float, head: int) -> int:
        """The lowest seq read after within the last `HOLD` or so; `head` when none was."""
        if now - self.since >= 2 * HOLD:
            return head
        return self.low if now - self.since >= HOLD else min(self.low, self.previous)


@dataclass(slots=True)
class _Submission:
    readings: Sequence[Reading | Rejected]
    events: Mapping[Stream, Sequence[NewEvent]]
    cursors: Sequence[CursorUpdate]
    size: int
    rejected: int
    future: asyncio.Future[Committed]


@dataclass(slots=True)
class LogStats:
    """Counters the log keeps about itself, for `status` and for tests."""

    commits: int = 0
    events_written: int = 0
    last_commit_size: int = 0
    max_commit_size: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    pruned: dict[str, int] = field(default_factory=dict)
    write_errors: int = 0
    last_write_error: str | None = None


async def _run(db: aiosqlite.Connection, sql: str) -> None:
    """Run a statement to its end and release it: a PRAGMA that answers a row otherwise stays
    "in progress" until its cursor is collected, and a COMMIT meanwhile fails."""
    async with db.execute(sql) as cur:
        await cur.fetchall()


_UPSERT_CURSOR = (
    "INSERT INTO cursors (consumer, stream, seq, state, updated)"
    " VALUES (?, ?, ?, ?, ?) ON CONFLICT (consumer, stream) DO UPDATE"
    " SET seq=excluded.seq, state=excluded.state, updated=excluded.updated"
)


# A reading's row leaves `kind` NULL (its stream says it) and `time` NULL when it equals the
# receive time (a device that sends no clock): 15 of ~73 bytes per reading, which the SD card
# gets twice (WAL, then checkpoint) and the quota holds 25 % more of. Readers fill them in.
# Readings have statements of their own without the columns they leave NULL: the sqlite3
# module binds a None through its adapter lookup (a tuple, a dict lookup, two attribute
# lookups), which made an 11-column row cost 9.5 µs to insert here and the 8-column one 5.4.
def _readings_sql(rows: int, unit: bool) -> str:
    """An INSERT of `rows` readings: its first parameter is the first row's seq (the others
    count on from it), then each row's event time, receive time, mono, sensor, value and, with
    `unit`, unit. The time is stored NULL when it equals the receive time; without `unit` the
    unit is NULL."""
    code = STREAM_CODES[Stream.READINGS]
    width = 6 if unit else 5
    values = []
    for j in range(rows):
        t, recv, mono, sensor, value, u = (f"?{2 + width * j + k}" for k in range(6))
        values.append(
            f"({code}, ?1+{j}, nullif({t}, {recv}), {recv}, {mono}, {sensor}, {value}, "
            + (f"{u})" if unit else "NULL)")
        )
    return (
        "INSERT INTO events (stream, seq, time, recv_time, mono, sensor, value, unit) VALUES "
        + ", ".join(values)
    )


# Readings go in by statements of many rows (256, then what is left by halves: a handful of
# statements, each prepared once and cached by the sqlite3 module). One statement per row, as
# executemany runs them, costs twice the CPU, and the thread takes the GIL back after every
# statement: with the event loop busy (a burst) it waits for it each time, and the writer fell
# behind. A commit of 5,000 readings beside a busy loop took 0.7-0.9 s in statements of at most
# 64 rows and 0.3 s in statements of 256 (both at the default switch interval; see
# agent.daemon.tune_interpreter). Larger ones cost more than they save: a statement of 512 rows
# takes 25 ms to prepare, and all the sizes up to it hold 2.5 MiB (up to 256: 8 ms, 1.2 MiB).
_SIZES = (256, 128, 64, 32, 16, 8, 4, 2, 1)
_READINGS_SQL = {unit: [(n, _readings_sql(n, unit)) for n in _SIZES] for unit in (False, True)}
# A row's parameters in one C call each. Readings without a unit (most sensors send none)
# leave it out: the sqlite3 module binds a None through its adapter lookup, which costs more
# than the rest of the row's binding.
_FIELDS = {
    True: attrgetter("time", "recv_time", "mono", "sensor", "value", "unit"),
    False: attrgetter("time", "recv_time", "mono", "sensor", "value"),
}
_UNIT = attrgetter("unit")


def _insert_readings(conn: sqlite3.Connection, first_seq: int, readings: Sequence[Reading]) -> None:
    """Insert `readings` into the readings stream with seqs from `first_seq` on."""
    units = list(map(_UNIT, readings))
    unit = units.count(None) != len(units)
    width = 6 if unit else 5
    flat = tuple(chain.from_iterable(map(_FIELDS[unit], readings)))
    n, i = len(readings), 0
    for size, sql in _READINGS_SQL[unit]:
        while n - i >= size:
            conn.execute(sql, (first_seq + i, *flat[width * i : width * (i + size)]))
            i += size


def _write(
    conn: sqlite3.Connection,
    insert_readings: Callable[[sqlite3.Connection], None] | None,
    rows: Iterator[tuple[Any, ...]] | None,
    cursor_rows: Sequence[tuple[Any, ...]],
) -> None:
    """One commit's transaction, run in the database thread: readings by `insert_readings`,
    other events, then cursor moves."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        if insert_readings is not None:
            insert_readings(conn)
        if rows is not None:
            conn.executemany(_INSERT, rows)
        if cursor_rows:
            conn.executemany(_UPSERT_CURSOR, cursor_rows)
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def _full_reading_row(code: int, seq: int, r: Reading) -> tuple[Any, ...]:
    """A reading's row for logs created before rows were compact (NOT NULL kind and time),
    for `_INSERT` like any other event."""
    data = raw = None
    return (
        code,
        seq,
        "reading",
        r.time,
        r.recv_time,
        r.mono,
        r.sensor,
        r.value,
        r.unit,
        data,
        raw,
    )


def _rejected_row(code: int, seq: int, r: Rejected) -> tuple[Any, ...]:
    data = json.dumps({"reason": r.reason, "detail": r.detail, "source": r.source})
    return (
        code,
        seq,
        "deadletter",
        r.recv_time,
        r.recv_time,
        r.mono,
        None,
        None,
        None,
        data,
        r.raw,
    )


def _event_row(code: int, seq: int, e: NewEvent) -> tuple[Any, ...]:
    data = None if e.data is None else json.dumps(e.data, separators=(",", ":"))
    return (code, seq, e.kind, e.time, e.recv_time, e.mono, e.sensor, e.value, e.unit, data, e.raw)


def _readings_of(sub: _Submission) -> Sequence[Reading]:
    """The readings of a submission, its rejected input left out."""
    if not sub.rejected:
        return sub.readings  # type: ignore[return-value]
    return [r for r in sub.readings if type(r) is Reading]


def _to_event(stream: Stream, row: Sequence[Any]) -> Event:
    seq, kind, t, recv, mono, sensor, value, unit, data, raw = row
    return Event(
        stream=stream.value,
        seq=seq,
        kind=kind,
        time=t,
        recv_time=recv,
        mono=mono,
        sensor=sensor,
        value=value,
        unit=unit,
        data=None if data is None else json.loads(data),
        raw=raw,
    )


def _stored(stream: Stream, row: Sequence[Any]) -> Event:
    """The event a query would return for `row` as inserted: its data through the same JSON
    (tuples become lists, keys strings) and numbers in REAL columns as floats."""
    _, seq, kind, t, recv, mono, sensor, value, unit, data, raw = row
    return _to_event(
        stream,
        (
            seq,
            kind,
            float(t),
            float(recv),
            float(mono),
            sensor,
            None if value is None else float(value),
            unit,
            data,
            raw,
        ),
    )


#: How many moved-aside corrupt logs are kept next to the live one (the oldest go first), so
#: a card that corrupts files again and again does not fill up with them.
KEEP_CORRUPT = 2
# SQLite's primary result codes for "this file is damaged" (not: locked, unreadable, full).
_SQLITE_CORRUPT, _SQLITE_NOTADB = 11, 26


def _is_corruption(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return isinstance(code, int) and code & 0xFF in (_SQLITE_CORRUPT, _SQLITE_NOTADB)


def check_integrity(path: Path, mode: str = "quick") -> str | None:
    """What is wrong with the log at `path` (`PRAGMA quick_check` or `integrity_check`), or
    None when it is sound or does not exist yet. Errors that are not damage (a locked file,
    no permission, an I/O error) raise `LogError` instead: moving such a file aside would
    throw away a good log."""
    if not path.exists() or path.stat().st_size == 0:
        return None
    pragma = "integrity_check" if mode == "full" else "quick_check"
    try:
        db = sqlite3.connect(path, timeout=10, isolation_level=None)
    except sqlite3.Error as exc:
        raise LogError(f"cannot open the log {path}: {exc}") from exc
    try:
        rows = db.execute(f"PRAGMA {pragma}(5)").fetchall()
    except sqlite3.DatabaseError as exc:
        if _is_corruption(exc):
            return str(exc)
        raise LogError(f"cannot check the log {path}: {exc}") from exc
    finally:
        db.close()
    found = [str(r[0]) for r in rows]
    return None if found == ["ok"] else "; ".join(found)


def move_aside(path: Path) -> Path:
    """Rename a damaged log (and its WAL) to `<name>.corrupt-<UTC time>[-n]`; returns the new
    path. Older moved-aside copies beyond `KEEP_CORRUPT` are deleted."""

    def order(p: Path) -> tuple[str, int]:
        stamp, _, n = p.name.removeprefix(f"{path.name}.corrupt-").partition("-")
        return stamp, int(n) if n.isdigit() else 1

    def moved() -> list[Path]:
        found = path.parent.glob(f"{path.name}.corrupt-*")
        return sorted((p for p in found if not p.name.endswith("-wal")), key=order)

    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    same = [order(p)[1] for p in moved() if order(p)[0] == stamp]
    # Numbered past every copy of this second, so the newest always sorts last.
    suffix = f"-{max(same) + 1}" if same else ""
    target = path.with_name(f"{path.name}.corrupt-{stamp}{suffix}")
    os.replace(path, target)
    wal = Path(f"{path}-wal")
    if wal.exists():
        os.replace(wal, f"{target}-wal")
    # The shared-memory index only describes the moved WAL; a new log builds its own.
    Path(f"{path}-shm").unlink(missing_ok=True)
    for stale in moved()[:-KEEP_CORRUPT]:
        stale.unlink(missing_ok=True)
        Path(f"{stale}-wal").unlink(missing_ok=True)
    return target


class EventLog:
    """The durable, append-only, multi-stream event log. Open it with `EventLog.open`."""

    def __init__(self, path: Path, cfg: LogConfig) -> None:
        self.path = path
        self.cfg = cfg
        self.log_id = ""
        self.stats = LogStats()
        self._heads: dict[Stream, int] = dict.fromkeys(Stream, 0)
        self._tails: dict[Stream, int] = dict.fromkeys(Stream, 1)
        self._cursors: dict[tuple[str, Stream], int] = {}
        # A log created before reading rows were compact gets full rows (_full_reading_row).
        self._old_schema = False
        # The newest committed events per stream, contiguous seqs ending at the head.
        self._recent: dict[Stream, _Recent] = {s: _Recent() for s in Stream}
        # Where consumers read lately: what the cache still holds for them (see `_remember`).
        self._readers: dict[Stream, _Readers] = {s: _Readers() for s in Stream}
        self._writer_db: aiosqlite.Connection | None = None
        self._reader_db: aiosqlite.Connection | None = None
        self._hot_db: sqlite3.Connection | None = None
        self._pending: deque[_Submission] = deque()
        self._pending_size = 0
        self._wake = asyncio.Event()
        self._space = asyncio.Condition()
        self._committed = asyncio.Condition()
        self._closing = False
        self._writer_task: asyncio.Task[None] | None = None
        self._last_retention = 0.0
        self._retention_waiters: list[asyncio.Future[None]] = []
        #: Set when a corrupt log was moved aside at open: `moved_to` and `reason`.
        self.recovered: dict[str, str] | None = None

    # ------------------------------------------------------------------ lifecycle

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, path: str | Path, cfg: LogConfig | None = None) -> AsyncIterator[EventLog]:
        """Open (or create) the log at `path`; on exit, drain what was submitted and close."""
        self = cls(Path(path), cfg or LogConfig())
        await self._open()
        try:
            yield self
        finally:
            await self._close()

    async def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.cfg.integrity_check != "off":
            problem = await asyncio.to_thread(check_integrity, self.path, self.cfg.integrity_check)
            if problem is not None:
                self._recover(problem)
        try:
            db = await self._connect_writer()
        except sqlite3.DatabaseError as exc:
            # Corruption the check did not see (or the check is off): the same recovery, once.
            if not _is_corruption(exc) or self.recovered is not None:
                raise LogError(f"the log {self.path} is not usable: {exc}") from exc
            self._recover(str(exc))
            try:
                db = await self._connect_writer()
            except sqlite3.DatabaseError as again:
                raise LogError(f"the log {self.path} is not usable: {again}") from again
        self._writer_db = db
        self._reader_db = await aiosqlite.connect(self.path, isolation_level=None)
        await self._reader_db.execute("PRAGMA query_only=1")
        await self._reader_db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        self._last_retention = time.monotonic()
        self._writer_task = asyncio.create_task(self._writer(), name="log-writer")

    async def _connect_writer(self) -> aiosqlite.Connection:
        try:
            db = await aiosqlite.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise LogError(f"cannot open the log {self.path}: {exc}") from exc
        sync = "FULL" if self.cfg.synchronous == "full" else "NORMAL"
        try:
            # Takes effect only when the file is created (WAL fixes it after that).
            await _run(db, f"PRAGMA page_size={PAGE_SIZE}")
            await _run(db, "PRAGMA journal_mode=WAL")
            await _run(db, f"PRAGMA synchronous={sync}")
            # SQLite's default 2 MiB page cache is a twentieth of the agent's memory budget on a
            # Pi; the writer only ever touches the right edge of the events table.
            await _run(db, f"PRAGMA cache_size=-{CACHE_KIB}")
            # After a checkpoint the WAL file is cut back to this, so it stays bounded on disk.
            await _run(db, "PRAGMA journal_size_limit=16777216")
            await db.executescript(_SCHEMA)
            async with db.execute("PRAGMA table_info(events)") as cur:
                notnull = {row[1]: row[3] for row in await cur.fetchall()}
            old_schema = bool(notnull.get("kind") or notnull.get("time"))
            self._old_schema = old_schema
            self.log_id = await self._load_log_id(db)
            await self._load_positions(db)
        except sqlite3.DatabaseError:
            await db.close()
            raise
        return db

    def _recover(self, problem: str) -> None:
        """Move a corrupt log aside and start afresh: an agent that keeps collecting beats one
        that crash-loops on a file it cannot repair. The runtime records `log.recovered`."""
        try:
            moved = move_aside(self.path)
        except OSError as exc:
            raise LogError(
                f"the log {self.path} is corrupt ({problem}) and cannot be moved aside: {exc}"
            ) from exc
        log.error(
            "the log %s is corrupt (%s): moved it to %s and started a new log",
            self.path,
            problem,
            moved,
        )
        self.recovered = {"moved_to": str(moved), "reason": problem}
        self._heads = dict.fromkeys(Stream, 0)
        self._tails = dict.fromkeys(Stream, 1)
        self._cursors = {}
        for recent in self._recent.values():
            recent.clear()

    async def _load_log_id(self, db: aiosqlite.Connection) -> str:
        async with db.execute("SELECT value FROM meta WHERE key='log_id'") as cur:
            row = await cur.fetchone()
        if row is not None:
            return str(row[0])
        log_id = secrets.token_hex(6)
        await db.execute("INSERT INTO meta (key, value) VALUES ('log_id', ?)", (log_id,))
        return log_id

    async def _load_positions(self, db: aiosqlite.Connection) -> None:
        async with db.execute(HEADS_SQL) as cur:
            heads = {CODE_STREAMS[code]: seq for code, seq in await cur.fetchall()}
        for stream, code in STREAM_CODES.items():
            async with db.execute("SELECT min(seq) FROM events WHERE stream=?", (code,)) as cur:
                row = await cur.fetchone()
            lo = row[0] if row else None
            self._heads[stream] = heads[stream]
            self._tails[stream] = lo if lo is not None else heads[stream] + 1
        async with db.execute("SELECT consumer, stream, seq FROM cursors") as cur:
            async for consumer, code, seq in cur:
                self._cursors[(consumer, CODE_STREAMS[code])] = seq

    async def _close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._writer_task is not None:
            await self._writer_task
        if self._writer_db is not None:
            with contextlib.suppress(sqlite3.Error):
                await _run(self._writer_db, "PRAGMA wal_checkpoint(TRUNCATE)")
            await self._writer_db.close()
        if self._reader_db is not None:
            await self._reader_db.close()
        if self._hot_db is not None:
            self._hot_db.close()
            self._hot_db = None

    # ------------------------------------------------------------------ writing

    async def submit(
        self,
        readings: Sequence[Reading | Rejected] = (),
        events: Mapping[Stream, Sequence[NewEvent]] | None = None,
        cursors: Sequence[CursorUpdate] = (),
    ) -> asyncio.Future[Committed]:
        """Queue events (and cursor moves) for the next group commit.

        Input (`readings`) waits while the queue is full (back-pressure); then this returns a
        future that resolves once everything in this call is committed, all in one
        transaction. Readings go to the `readings` stream and `Rejected` input to `deadletter`.

        A submission without input never waits for room. What consumers submit (cursor moves,
        aggregates, alerts, gap and deadletter records) comes from events already committed,
        a little per batch they read, so it is bounded by their reading; and it must not queue
        behind the input it is there to drain: during a burst that keeps the queue full, every
        cursor move of an upstream and every alert of a processor waited for room behind it.
        """
        if self._closing:
            raise LogError("the log is closing")
        events = events or {}
        size = len(readings) + sum(len(v) for v in events.values()) + len(cursors)
        if readings:
            async with self._space:
                # A submission larger than the whole queue still goes in once it is empty.
                await self._space.wait_for(
                    lambda: (
                        self._pending_size == 0 or self._pending_size + size <= self.cfg.queue_size
                    )
                )
        future: asyncio.Future[Committed] = asyncio.get_running_loop().create_future()
        rejected = len(readings) - countOf(map(type, readings), Reading)
        self._pending.append(_Submission(readings, events, cursors, size, rejected, future))
        self._pending_size += size
        self._wake.set()
        return future

    async def append(
        self,
        readings: Sequence[Reading | Rejected] = (),
        events: Mapping[Stream, Sequence[NewEvent]] | None = None,
        cursors: Sequence[CursorUpdate] = (),
    ) -> Committed:
        """Submit and wait for the commit."""
        return await (await self.submit(readings, events, cursors))

    @property
    def queued(self) -> int:
        """Events and cursor moves waiting for the next commit."""
        return self._pending_size

    async def _writer(self) -> None:
        last_commit = 0.0
        failing = 0  # commits failed in a row: the retry pause grows with it, not with history
        while True:
            due = time.monotonic() - self._last_retention >= self.cfg.retention_interval
            if self._retention_waiters or due:
                await self._retention()
                for waiter in self._retention_waiters:
                    if not waiter.done():
                        waiter.set_result(None)
                self._retention_waiters.clear()
            if not self._pending:
                if self._closing:
                    return
                self._wake.clear()
                # Wake up for retention too, so an idle log still ages out old events.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.cfg.retention_interval):
                        await self._wake.wait()
                continue
            # Spacing commits trades a little latency for far fewer fsyncs (flash wear);
            # what arrives meanwhile joins this commit.
            delay = last_commit + self.cfg.commit_interval - time.monotonic()
            # A full batch is waiting: pausing could not make this commit any larger.
            if delay > 0 and not self._closing and self._pending_size < self.cfg.max_batch:
                await asyncio.sleep(delay)
            batch = self._take_batch()
            # Spaced start to start: an input handing on a batch every commit interval then
            # finds the writer ready, and its batch is committed in the same wake-up instead of
            # after a short sleep for the time the previous commit took (each wake-up of the
            # process costs tens of microseconds before any work on a Pi-class CPU or a VM).
            started = time.monotonic()
            try:
                await self._commit(batch)
            except sqlite3.Error as exc:
                # Disk full or I/O error: nothing of this batch is visible; keep it at the
                # front of the queue and retry, so inputs wait (back-pressure) instead of losing.
                self.stats.write_errors += 1
                self.stats.last_write_error = str(exc)
                failing += 1
                # Once per failing spell at error level; a full disk retries for hours.
                log.log(
                    logging.ERROR if failing == 1 else logging.DEBUG,
                    "log write failed, inputs wait while it retries: %s",
                    exc,
                )
                for sub in reversed(batch):
                    self._pending.appendleft(sub)
                await asyncio.sleep(min(5.0, 0.1 * 2 ** min(failing, 6)))
                continue
            if failing:
                log.warning("log writes work again after %d failed attempts", failing)
                failing = 0
            last_commit = started
            size = sum(s.size for s in batch)
            self._pending_size -= size
            async with self._space:
                self._space.notify_all()

    def _take_batch(self) -> list[_Submission]:
        batch = [self._pending.popleft()]
        total = batch[0].size
        while self._pending and total + self._pending[0].size <= self.cfg.max_batch:
            sub = self._pending.popleft()
            total += sub.size
            batch.append(sub)
        return batch

    async def _commit(self, batch: list[_Submission]) -> None:
        db = self._writer_db
        assert db is not None
        heads = dict(self._heads)
        starts: list[dict[Stream, int]] = []
        results: list[Committed] = []
        cursor_rows: list[tuple[Any, ...]] = []
        now = time.time()
        # Seqs are assigned here, by counting; the rows themselves are built by the functions
        # below, inside the database thread, overlapping the event loop's work.
        for sub in batch:
            start = dict(heads)
            starts.append(start)
            heads[Stream.DEADLETTER] += sub.rejected
            heads[Stream.READINGS] += len(sub.readings) - sub.rejected
            for stream, events in sub.events.items():
                heads[stream] += len(events)
            results.append(
                Committed(
                    {st: (start[st] + 1, heads[st]) for st in _STREAMS if heads[st] > start[st]}
                )
            )
            for c in sub.cursors:
                cursor_rows.append((c.consumer, STREAM_CODES[c.stream], c.seq, c.state, now))
        total = sum(heads[st] - self._heads[st] for st in _STREAMS)

        read_code, dead_code = STREAM_CODES[Stream.READINGS], STREAM_CODES[Stream.DEADLETTER]
        n_readings = heads[Stream.READINGS] - self._heads[Stream.READINGS]

        def insert_readings(conn: sqlite3.Connection) -> None:
            for sub, start in zip(batch, starts, strict=True):
                if readings := _readings_of(sub):
                    _insert_readings(conn, start[Stream.READINGS] + 1, readings)

        def full_rows() -> Iterator[tuple[Any, ...]]:
            for sub, start in zip(batch, starts, strict=True):
                seq = start[Stream.READINGS]
                for r in _readings_of(sub):
                    seq += 1
                    yield _full_reading_row(read_code, seq, r)

        def insert_full_rows(conn: sqlite3.Connection) -> None:
            conn.executemany(_INSERT, full_rows())

        def rows() -> Iterator[tuple[Any, ...]]:
            for sub, start in zip(batch, starts, strict=True):
                dead = start[Stream.DEADLETTER]
                for r in sub.readings if sub.rejected else ():
                    if type(r) is not Reading:
                        dead += 1
                        yield _rejected_row(dead_code, dead, r)  # type: ignore[arg-type]
                for stream, events in sub.events.items():
                    code, n = STREAM_CODES[stream], start[stream]
                    for e in events:
                        n += 1
                        yield _event_row(code, n, e)

        # No `heads` row per commit: the newest seq is in `events` itself; `_drop` writes the
        # head when it deletes, which is the only way a stream's newest events can vanish.
        # The whole transaction is one call into the database thread: one hand-over each way
        # per commit instead of one per statement (four), and no await between BEGIN and
        # COMMIT where a cancellation could leave the transaction open. aiosqlite has no public
        # way to run a function on its thread; `_execute` is what its own methods use.
        await db._execute(  # type: ignore[no-untyped-call]
            _write,
            db._conn,
            None if not n_readings else insert_full_rows if self._old_schema else insert_readings,
            rows() if total > n_readings else None,
            cursor_rows,
        )
        # Only now may consumers see the new events and sources be acknowledged.
        self._remember(batch, starts)
        self._heads = heads
        for sub in batch:
            for c in sub.cursors:
                self._cursors[(c.consumer, c.stream)] = c.seq
        self.stats.commits += 1
        self.stats.events_written += total
        self.stats.last_commit_size = total
        self.stats.max_commit_size = max(self.stats.max_commit_size, total)
        for sub, committed in zip(batch, results, strict=True):
            if not sub.future.done():
                sub.future.set_result(committed)
        async with self._committed:
            self._committed.notify_all()

    def _remember(self, batch: list[_Submission], starts: list[dict[Stream, int]]) -> None:
        """Keep the events just committed as consumers will read them (`RECENT`), for the
        streams some consumer reads (a stream nobody reads costs nothing; its cache restarts,
        contiguous again, once a consumer registers)."""
        watched = {s for _, s in self._cursors}
        for stream in _STREAMS:
            if stream not in watched:
                self._recent[stream].clear()
        keep_readings = Stream.READINGS in watched or Stream.DEADLETTER in watched
        recents = self._recent
        before = {stream: len(recents[stream]) for stream in _STREAMS}
        readings, dead = recents[Stream.READINGS], recents[Stream.DEADLETTER]
        for sub, start in zip(batch, starts, strict=True):
            if items := _readings_of(sub):
                # A reading is its own event once it has its seq (see `Reading`).
                seq = start[Stream.READINGS] + 1
                deque(map(setattr, items, repeat("seq"), range(seq, seq + len(items))), maxlen=0)
                if keep_readings:
                    readings.extend(items)
            if keep_readings and sub.rejected:
                n_dead = start[Stream.DEADLETTER]
                for r in sub.readings:
                    if type(r) is not Reading:
                        n_dead += 1
                        dead.append(_stored(Stream.DEADLETTER, _rejected_row(0, n_dead, r)))  # type: ignore[arg-type]
            for stream, events in sub.events.items():
                if stream not in watched:
                    continue
                recent, n = recents[stream], start[stream]
                for e in events:
                    n += 1
                    recent.append(_stored(stream, _event_row(0, n, e)))
        # The whole of this commit, and up to RECENT events before it, or as many as a
        # consumer reading lately still needs (up to queue_size).
        now = time.monotonic()
        for stream in _STREAMS:
            if before[stream] > RECENT:
                recent = recents[stream]
                head = self._heads[stream]
                need = min(self.cfg.queue_size, head - self._readers[stream].floor(now, head))
                recent.keep(len(recent) - before[stream] + min(before[stream], max(RECENT, need)))

    # ------------------------------------------------------------------ reading

    def head(self, stream: Stream) -> int:
        """The seq of the newest committed event of `stream` (0 when it never had one)."""
        return self._heads[stream]

    def _hot(self) -> sqlite3.Connection:
        """A connection of the event loop's thread for readings just past the memory cache.

        Through the database thread, every row is a hand-over of the GIL: the sqlite3 module
        lets it go for each step and takes it back to build the row, and with the event loop
        busy (a burst) each take waits for a switch. An upstream that fell just behind the
        cache then read a few thousand rows a second and fell further behind, for as long as
        the burst lasted. Rows this recent are in the page cache: reading them here costs the
        loop about a microsecond each, and nothing waits. Older ones (a backlog after an
        outage, maybe on an SD card) still go through the thread, which never blocks the loop.
        """
        if self._hot_db is None:
            # No busy wait here, on the loop: a read that finds the file locked goes through
            # the thread instead.
            self._hot_db = sqlite3.connect(self.path, isolation_level=None, timeout=0)
            self._hot_db.execute("PRAGMA query_only=1")
            self._hot_db.execute(f"PRAGMA cache_size=-{CACHE_KIB}")
        return self._hot_db

    def tail(self, stream: Stream) -> int:
        """The seq of the oldest event still kept (head + 1 when the stream is empty)."""
        return self._tails[stream]

    async def read(self, stream: Stream, after: int, limit: int = 500) -> list[Event]:
        """Committed events of `stream` with seq > `after`, oldest first, at most `limit`."""
        db = self._reader_db
        assert db is not None
        upto = self._heads[stream]
        if after >= upto:
            return []
        if upto - after <= self.cfg.queue_size:  # one further behind holds nothing
            self._readers[stream].note(after, time.monotonic())
        events = self._recent[stream].after(after, limit)
        if events is not None:
            return events
        if stream is Stream.READINGS:
            if upto - after <= HOT:
                try:
                    hot = self._hot().execute(_SELECT_READINGS, (after, upto, limit)).fetchall()
                except sqlite3.OperationalError:
                    pass  # busy: the loop never waits for a lock; the thread below does
                else:
                    return list(starmap(Reading, hot))
            async with db.execute(_SELECT_READINGS, (after, upto, limit)) as cur:
                return list(starmap(Reading, await cur.fetchall()))
        async with db.execute(
            _SELECT + " WHERE stream=? AND seq>? AND seq<=? ORDER BY seq LIMIT ?",
            (STREAM_CODES[stream], after, upto, limit),
        ) as cur:
            rows = await cur.fetchall()
        return [_to_event(stream, row) for row in rows]

    async def wait_for(self, stream: Stream, after: int, within: float | None = None) -> bool:
        """Wait until `stream` has a committed event past `after`; False after `within` s."""
        return await self.wait_any((stream,), {stream: after}, within)

    async def wait_any(
        self, streams: Iterable[Stream], after: Mapping[Stream, int], within: float | None = None
    ) -> bool:
        """Wait until any of `streams` has a committed event past its `after` seq."""
        streams = tuple(streams)

        def ready() -> bool:
            return any(self._heads[s] > after.get(s, 0) for s in streams)

        if ready():
            return True
        # asyncio.timeout, not wait_for: no task per wait (consumers wait once per commit).
        try:
            async with asyncio.timeout(within), self._committed:
                await self._committed.wait_for(ready)
        except TimeoutError:
            return False
        return True

    async def seq_at(self, stream: Stream, since: float) -> int:
        """The seq just before the first event received at or after wall time `since`.

        For replays "from a time": binary search on seq, since receive times follow seq
        except across clock steps.
        """
        lo, hi = self._tails[stream], self._heads[stream]
        while lo <= hi:
            mid = (lo + hi) // 2
            t = await self._recv_time_near(stream, mid)
            if t is None or t >= since:
                hi = mid - 1
            else:
                lo = mid + 1
        return lo - 1

    async def _recv_time_near(self, stream: Stream, seq: int) -> float | None:
        db = self._reader_db
        assert db is not None
        async with db.execute(
            "SELECT recv_time FROM events WHERE stream=? AND seq>=? ORDER BY seq LIMIT 1",
            (STREAM_CODES[stream], seq),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else float(row[0])

    # ------------------------------------------------------------------ cursors

    async def register(self, consumer: str, streams: Iterable[Stream]) -> None:
        """Make `consumer` known on `streams` (cursor 0 when new), so drops count against it."""
        missing = [s for s in streams if (consumer, s) not in self._cursors]
        if missing:
            await self.append(cursors=[CursorUpdate(consumer, s, 0) for s in missing])

    def cursor(self, consumer: str, stream: Stream) -> int:
        """Where `consumer` is on `stream`: the seq of the last event whose effect is durable."""
        return self._cursors.get((consumer, stream), 0)

    async def cursor_state(self, consumer: str, stream: Stream) -> str | None:
        """The state a consumer committed together with its cursor (processors keep theirs)."""
        db = self._reader_db
        assert db is not None
        async with db.execute(
            "SELECT state FROM cursors WHERE consumer=? AND stream=?",
            (consumer, STREAM_CODES[stream]),
        ) as cur:
            row = await cur.fetchone()
        return None if row is None else row[0]

    async def rewind(
        self, consumer: str, stream: Stream, *, seq: int | None = None, since: float | None = None
    ) -> int:
        """Move a consumer back (or forward) to replay from a seq or a wall time; returns the
        new cursor. The consumer next reads the events after it."""
        if (seq is None) == (since is None):
            raise ValueError("rewind takes exactly one of seq or since")
        target = seq if seq is not None else await self.seq_at(stream, since or 0.0)
        target = max(0, min(target, self._heads[stream]))
        await self.append(cursors=[CursorUpdate(consumer, stream, target)])
        return target

    def cursors(self) -> dict[tuple[str, Stream], int]:
        """Every consumer's cursor, by (consumer, stream)."""
        return dict(self._cursors)

    # ------------------------------------------------------------------ bounds

    async def disk_usage(self) -> int:
        """Bytes the log occupies: live pages of the database plus the WAL file."""
        db = self._writer_db
        assert db is not None
        values = []
        for pragma in ("page_count", "freelist_count", "page_size"):
            async with db.execute(f"PRAGMA {pragma}") as cur:
                row = await cur.fetchone()
                values.append(int(row[0]) if row else 0)
        pages, free, page_size = values
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except FileNotFoundError:
            wal = 0
        return (pages - free) * page_size + wal

    async def enforce_retention(self) -> None:
        """Apply the disk quota and the maximum age now (the writer also does it periodically).

        The pass runs in the writer task, the only one that writes, between two commits.
        """
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._retention_waiters.append(waiter)
        self._wake.set()
        await waiter

    async def _retention(self) -> None:
        self._last_retention = time.monotonic()
        db = self._writer_db
        assert db is not None
        try:
            await self._drop_aged()
            await self._drop_over_quota()
            await _run(db, "PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.Error as exc:
            log.error("retention pass failed, will retry: %s", exc)

    async def _drop_aged(self) -> None:
        cutoff = time.time() - self.cfg.max_age
        for stream in Stream:
            if self._tails[stream] > self._heads[stream]:
                continue
            first = await self._recv_time_near(stream, self._tails[stream])
            if first is None or first >= cutoff:
                continue
            upto = await self.seq_at(stream, cutoff)
            if upto >= self._tails[stream]:
                await self._drop(stream, upto, "max_age")

    async def _drop_over_quota(self) -> None:
        db = self._writer_db
        assert db is not None
        # Measure with the WAL folded back into the database, so its pages are not counted twice.
        await _run(db, "PRAGMA wal_checkpoint(TRUNCATE)")
        used = await self.disk_usage()
        if used <= self.cfg.quota:
            return
        # Free 10% below the quota, so a log at its bound is not trimmed on every commit.
        target = int(self.cfg.quota * 0.9)
        for stream in DROP_ORDER:
            kept = {s: self._heads[s] - self._tails[s] + 1 for s in Stream}
            total = sum(kept.values())
            if kept[stream] <= 0 or total <= 0:
                continue
            per_event = used / total
            n = min(kept[stream], max(1, int((used - target) / per_event) + 1))
            await self._drop(stream, self._tails[stream] + n - 1, "quota")
            await _run(db, "PRAGMA wal_checkpoint(TRUNCATE)")
            used = await self.disk_usage()
            if used <= target:
                return
        log.warning(
            "log is over its quota (%d > %d bytes) with nothing left to drop", used, self.cfg.quota
        )

    async def _drop(self, stream: Stream, upto: int, reason: str) -> None:
        """Delete events of `stream` with seq <= `upto`, telling consumers what they lose."""
        db = self._writer_db
        assert db is not None
        code = STREAM_CODES[stream]
        lo = self._tails[stream]
        async with db.execute(
            "SELECT count(*), min(recv_time), max(recv_time),"
            " min(coalesce(time, recv_time)), max(coalesce(time, recv_time))"
            " FROM events WHERE stream=? AND seq BETWEEN ? AND ?",
            (code, lo, upto),
        ) as cur:
            row = await cur.fetchone()
        assert row is not None
        count, first_recv, last_recv, first_time, last_time = row
        consumers = [seq for (_, s), seq in self._cursors.items() if s == stream]
        # Events every consumer already handled are pruned, not lost: only the ones some
        # consumer has not yet seen make a gap.
        slowest = min(consumers) if consumers else upto
        unconsumed = max(0, upto - max(slowest, lo - 1))
        now, mono = time.time(), time.monotonic()
        gap = None
        if unconsumed:
            gap = _event_row(
                STREAM_CODES[Stream.AGENT],
                self._heads[Stream.AGENT] + 1,
                NewEvent(
                    kind="gap",
                    time=now,
                    recv_time=now,
                    mono=mono,
                    data={
                        "stream": stream.value,
                        "reason": reason,
                        "count": count,
                        "unconsumed": unconsumed,
                        "first_seq": lo,
                        "last_seq": upto,
                        "first_recv_time": first_recv,
                        "last_recv_time": last_recv,
                        "first_time": first_time,
                        "last_time": last_time,
                    },
                ),
            )
        await db.execute("BEGIN IMMEDIATE")
        try:
            await db.execute(
                "DELETE FROM events WHERE stream=? AND seq BETWEEN ? AND ?", (code, lo, upto)
            )
            # The head survives in its own table, so seqs never repeat even when this
            # deletes every event of the stream (commits do not write it).
            await db.execute(
                "INSERT INTO heads (stream, seq) VALUES (?, ?)"
                " ON CONFLICT (stream) DO UPDATE SET seq=excluded.seq",
                (code, self._heads[stream]),
            )
            if gap is not None:
                await db.execute(_INSERT, gap)
                await db.execute(
                    "INSERT INTO heads (stream, seq) VALUES (?, ?)"
                    " ON CONFLICT (stream) DO UPDATE SET seq=excluded.seq",
                    (STREAM_CODES[Stream.AGENT], gap[1]),
                )
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error):
                await db.execute("ROLLBACK")
            raise
        self._tails[stream] = upto + 1
        self._recent[stream].drop_through(upto)
        bucket = self.stats.dropped if gap is not None else self.stats.pruned
        bucket[stream.value] = bucket.get(stream.value, 0) + count
        if gap is not None:
            self._recent[Stream.AGENT].append(_stored(Stream.AGENT, gap))
            self._heads[Stream.AGENT] = gap[1]
            log.warning(
                "dropped %d %s (seq %d..%d, %d not yet forwarded): %s",
                count,
                stream.value,
                lo,
                upto,
                unconsumed,
                reason,
            )
            async with self._committed:
                self._committed.notify_all()
