"""Ground truth: every line the simulator sends, recorded in a SQLite file (`--record sent.db`).

One row per line handed to an output, with the identity `edge-sim verify` matches against the
cloud: the sensor, the device time written on the line (rounded to the millisecond as sent)
and the value, plus the run and line number, the output, when it was sent, and the fault that
made it a bad line (garbage, invalid UTF-8, over-long, NaN), if any. A file can hold several
runs; each run gets a row in `runs`.

Rows are buffered and inserted in batches (`executemany`, one commit per flush) so recording
keeps up with the fastest feed; `synchronous=NORMAL` in WAL mode, because a lost tail after a
power cut only loses ground truth, never data.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import TracebackType

from simulator.signals import Line

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run        INTEGER PRIMARY KEY,
    started_at REAL NOT NULL,
    output     TEXT NOT NULL,
    format     TEXT NOT NULL,
    seed       INTEGER NOT NULL,
    rate       REAL NOT NULL,
    sensors    TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS sent (
    run       INTEGER NOT NULL,
    seq       INTEGER NOT NULL,
    sensor    TEXT NOT NULL,
    value     REAL,
    unit      TEXT,
    ts        REAL NOT NULL,
    sent_at   REAL NOT NULL,
    output    TEXT NOT NULL,
    fault     TEXT,
    discarded INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (run, seq)
);
"""
#: `sent.seq` is the line number within its run, 1-based (the line index + 1, as line faults
#: count). `value` is NULL for garbage and NaN lines; `discarded` marks lines that were still in
#: the port when it vanished (an `outage` fault), lost at the source rather than by the agent.

_INSERT = (
    "INSERT INTO sent (run, seq, sensor, value, unit, ts, sent_at, output, fault)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


class Recorder:
    """Appends sent lines to a record file. One owner; `add` and `flush` run on its thread."""

    def __init__(
        self,
        path: str | Path,
        *,
        output: str,
        fmt: str,
        seed: int,
        rate: float,
        sensors: Sequence[str],
        flush_rows: int = 20_000,
        flush_interval: float = 0.5,
    ) -> None:
        self.path = Path(path)
        self.output = output
        self.flush_rows = flush_rows
        self.flush_interval = flush_interval
        self.rows = 0
        conn = sqlite3.connect(self.path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(SCHEMA)
        self._conn: sqlite3.Connection | None = conn
        cur = conn.execute(
            "INSERT INTO runs (started_at, output, format, seed, rate, sensors)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (time.time(), output, fmt, seed, rate, json.dumps(list(sensors))),
        )
        assert cur.lastrowid is not None
        self.run = cur.lastrowid
        self._pending: list[tuple[object, ...]] = []
        self._last_flush = time.monotonic()

    def add(self, lines: Iterable[Line], sent_at: float) -> None:
        """Record lines handed to the output at `sent_at` (wall clock)."""
        run, output = self.run, self.output
        self._pending.extend(
            (
                run,
                line.index + 1,
                line.sensor,
                line.value,
                line.unit,
                round(line.ts, 3),
                sent_at,
                output,
                line.fault,
            )
            for line in lines
        )
        if (
            len(self._pending) >= self.flush_rows
            or time.monotonic() - self._last_flush >= self.flush_interval
        ):
            self.flush()

    def discard(self, seqs: Iterable[int]) -> None:
        """Mark lines (by `seq`) as lost at the source: still in the port when it vanished."""
        self.flush()
        self._db().executemany(
            "UPDATE sent SET discarded = 1 WHERE run = ? AND seq = ?",
            [(self.run, s) for s in seqs],
        )

    def flush(self) -> None:
        """Insert what is buffered, in one transaction."""
        self._last_flush = time.monotonic()
        if not self._pending:
            return
        rows, self._pending = self._pending, []
        conn = self._db()
        conn.execute("BEGIN")
        try:
            conn.executemany(_INSERT, rows)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        self.rows += len(rows)

    def close(self) -> None:
        """Flush and close (idempotent)."""
        if self._conn is None:
            return
        try:
            self.flush()
        finally:
            self._conn.close()
            self._conn = None

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            raise sqlite3.ProgrammingError(f"the record {self.path} is closed")
        return self._conn

    def __enter__(self) -> Recorder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
