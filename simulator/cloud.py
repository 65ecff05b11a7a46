"""A local stand-in for the cloud ingestion endpoint: an aiohttp server over its own SQLite file.

Endpoints:
- `POST /ingest`: `{"log_id": str, "agent": str, "events": [event, ...]}`, optionally gzipped
  (`Content-Encoding: gzip`). Each event's `id` is `<log_id>:<stream>:<seq>`; an id already
  stored is counted as a duplicate, never stored twice. The batch is committed before the
  200 `{"accepted": n, "duplicates": d}` goes out, because the agent moves its cursor on 2xx.
  401 without the bearer token (when one is set), 400 `{"error": reason}` on a bad body,
  503 while `down`, 500 on an injected failure.
- `GET /api/summary`: a JSON snapshot for a live view (see `summarize`).
- `POST /control` (and `GET`): fault switches `{"down": bool, "fail_rate": float,
  "lose_ack_rate": float}`; any subset may be given. Guarded by the token like `/ingest`.

Faults: `fail_rate` answers that fraction of ingest POSTs with 500 before storing anything;
`lose_ack_rate` stores and commits the batch, then answers 500 anyway (a lost ack), which makes
the agent resend and exercises duplicate dropping. Both draw from a seeded random generator.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import sqlite3
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")

ALERT_KINDS = ("alert.raised", "alert.cleared")
RECENT_WINDOW = 10.0  # seconds, for `recent` in the summary
SUMMARY_ALERTS = 20

_SCHEMA = """
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
"""


class BatchError(ValueError):
    """An ingest body the endpoint refuses; the message is the 400 reason."""


@dataclass(frozen=True, slots=True)
class IngestEvent:
    """One validated event of an ingest batch."""

    id: str
    stream: str
    seq: int
    kind: str
    time: float
    recv_time: float
    sensor: str | None = None
    value: float | None = None
    unit: str | None = None
    data: Any = None
    raw: str | None = None


@dataclass(frozen=True, slots=True)
class IngestBatch:
    """A validated ingest body."""

    log_id: str | None
    agent: str | None
    events: list[IngestEvent]


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def parse_batch(body: Any) -> IngestBatch:
    """Validate a decoded ingest body; raise `BatchError` with the reason when it is bad."""
    if not isinstance(body, dict):
        raise BatchError("body must be a JSON object")
    log_id, agent = body.get("log_id"), body.get("agent")
    for key, v in (("log_id", log_id), ("agent", agent)):
        if v is not None and not isinstance(v, str):
            raise BatchError(f"{key} must be a string")
    if "events" not in body:
        raise BatchError("missing events")
    raw_events = body["events"]
    if not isinstance(raw_events, list):
        raise BatchError("events must be a list")
    return IngestBatch(
        log_id, agent, [_parse_event(i, e, log_id) for i, e in enumerate(raw_events)]
    )


def _parse_event(i: int, e: Any, log_id: str | None) -> IngestEvent:
    where = f"events[{i}]"
    if not isinstance(e, dict):
        raise BatchError(f"{where} must be an object")
    for key in ("id", "stream", "seq", "kind", "time", "recv_time"):
        if key not in e:
            raise BatchError(f"{where}: missing {key}")
    for key in ("id", "stream", "kind"):
        if not isinstance(e[key], str) or not e[key]:
            raise BatchError(f"{where}: {key} must be a non-empty string")
    if not isinstance(e["seq"], int) or isinstance(e["seq"], bool) or e["seq"] < 0:
        raise BatchError(f"{where}: seq must be an integer >= 0")
    for key in ("time", "recv_time"):
        if not _is_number(e[key]) or not math.isfinite(e[key]):
            raise BatchError(f"{where}: {key} must be a finite number")
    if log_id is not None and e["id"] != f"{log_id}:{e['stream']}:{e['seq']}":
        raise BatchError(
            f"{where}: id {e['id']!r} is not <log_id>:<stream>:<seq> "
            f"({log_id}:{e['stream']}:{e['seq']})"
        )
    for key in ("sensor", "unit", "raw"):
        if e.get(key) is not None and not isinstance(e[key], str):
            raise BatchError(f"{where}: {key} must be a string")
    value = e.get("value")
    if value is not None and (not _is_number(value) or not math.isfinite(value)):
        raise BatchError(f"{where}: value must be a finite number")
    return IngestEvent(
        id=e["id"],
        stream=e["stream"],
        seq=e["seq"],
        kind=e["kind"],
        time=float(e["time"]),
        recv_time=float(e["recv_time"]),
        sensor=e.get("sensor"),
        value=float(value) if value is not None else None,
        unit=e.get("unit"),
        data=e.get("data"),
        raw=e.get("raw"),
    )


def connect(db_path: str | Path, *, create: bool = False) -> sqlite3.Connection:
    """A connection to the endpoint's database, in WAL mode; `create` makes the schema."""
    if create:
        conn = sqlite3.connect(db_path, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.executescript(_SCHEMA)
    else:
        conn = sqlite3.connect(f"file:{Path(db_path)}?mode=rw", uri=True, isolation_level=None)
    # FULL: a 200 means the batch survives a power cut, not only a crash of this process.
    conn.execute("PRAGMA synchronous=FULL")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn


def _bump(conn: sqlite3.Connection, name: str, by: int = 1) -> None:
    conn.execute(
        "INSERT INTO counters (name, value) VALUES (?, ?) "
        "ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
        (name, by),
    )


def store_batch(
    conn: sqlite3.Connection, batch: IngestBatch, received_at: float
) -> tuple[int, int]:
    """Insert the batch in one committed transaction; return (accepted, duplicates)."""
    accepted = 0
    conn.execute("BEGIN IMMEDIATE")
    try:
        for ev in batch.events:
            cur = conn.execute(
                "INSERT OR IGNORE INTO events (id, log_id, agent, stream, seq, kind, sensor, value,"
                " unit, time, recv_time, received_at, data, raw)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    ev.id,
                    batch.log_id,
                    batch.agent,
                    ev.stream,
                    ev.seq,
                    ev.kind,
                    ev.sensor,
                    ev.value,
                    ev.unit,
                    ev.time,
                    ev.recv_time,
                    received_at,
                    json.dumps(ev.data) if ev.data is not None else None,
                    ev.raw,
                ),
            )
            if cur.rowcount != 1:
                continue
            accepted += 1
            conn.execute(
                "INSERT INTO streams (stream, count) VALUES (?, 1) "
                "ON CONFLICT (stream) DO UPDATE SET count = count + 1",
                (ev.stream,),
            )
            if ev.sensor is not None and ev.stream in ("readings", "aggregates"):
                _update_sensor(conn, ev)
        duplicates = len(batch.events) - accepted
        if duplicates:
            _bump(conn, "duplicates", duplicates)
        _bump(conn, "batches")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return accepted, duplicates


def _update_sensor(conn: sqlite3.Connection, ev: IngestEvent) -> None:
    conn.execute("INSERT OR IGNORE INTO sensors (sensor) VALUES (?)", (ev.sensor,))
    if ev.stream == "readings":
        # Backlogs arrive late and out of order: "last" means the newest event time.
        conn.execute(
            "UPDATE sensors SET count = count + 1,"
            " unit = CASE WHEN coalesce(last_time, :t) <= :t THEN :unit ELSE unit END,"
            " last_value = CASE WHEN coalesce(last_time, :t) <= :t THEN :value ELSE last_value END,"
            " last_time = max(coalesce(last_time, :t), :t)"
            " WHERE sensor = :sensor",
            {"t": ev.time, "unit": ev.unit, "value": ev.value, "sensor": ev.sensor},
        )
    else:
        conn.execute(
            "UPDATE sensors SET agg_kind = ?, agg_value = ?, agg_time = ?, agg_data = ?"
            " WHERE sensor = ? AND (agg_time IS NULL OR ? >= agg_time)",
            (
                ev.kind,
                ev.value,
                ev.time,
                json.dumps(ev.data) if ev.data is not None else None,
                ev.sensor,
                ev.time,
            ),
        )


def _counter(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _loads(text: str | None) -> Any:
    return json.loads(text) if text is not None else None


def summarize(conn: sqlite3.Connection, now: float) -> dict[str, Any]:
    """The live-view snapshot.

    `streams`: events stored per stream; `total`; `duplicates`; `recent`: events received in
    the last 10 s; `last_received_at`: server time of the newest batch; `upstream_lag`: now
    minus the newest `recv_time` in that batch (null before any event); `sensors`: per sensor
    `count`, `unit`, `last_value`, `last_time` (readings) and `aggregate` (the latest one);
    `alerts`: the last 20 alert.raised/alert.cleared events, newest first.
    """
    streams = {s: int(c) for s, c in conn.execute("SELECT stream, count FROM streams ORDER BY 1")}
    (recent,) = conn.execute(
        "SELECT count(*) FROM events WHERE received_at >= ?", (now - RECENT_WINDOW,)
    ).fetchone()
    (last_received,) = conn.execute("SELECT max(received_at) FROM events").fetchone()
    lag = None
    if last_received is not None:
        (newest_recv,) = conn.execute(
            "SELECT max(recv_time) FROM events WHERE received_at = ?", (last_received,)
        ).fetchone()
        lag = now - newest_recv
    sensors: dict[str, Any] = {}
    for row in conn.execute(
        "SELECT sensor, count, unit, last_value, last_time, agg_kind, agg_value, agg_time,"
        " agg_data FROM sensors ORDER BY sensor"
    ):
        sensor, count, unit, last_value, last_time, agg_kind, agg_value, agg_time, agg_data = row
        aggregate = None
        if agg_time is not None:
            aggregate = {
                "kind": agg_kind,
                "value": agg_value,
                "time": agg_time,
                "data": _loads(agg_data),
            }
        sensors[sensor] = {
            "count": count,
            "unit": unit,
            "last_value": last_value,
            "last_time": last_time,
            "aggregate": aggregate,
        }
    alerts = [
        {
            "id": r[0],
            "kind": r[1],
            "sensor": r[2],
            "value": r[3],
            "unit": r[4],
            "time": r[5],
            "recv_time": r[6],
            "received_at": r[7],
            "data": _loads(r[8]),
        }
        for r in conn.execute(
            "SELECT id, kind, sensor, value, unit, time, recv_time, received_at, data"
            " FROM events WHERE kind IN (?, ?) ORDER BY time DESC, seq DESC LIMIT ?",
            (*ALERT_KINDS, SUMMARY_ALERTS),
        )
    ]
    return {
        "now": now,
        "total": sum(streams.values()),
        "streams": streams,
        "duplicates": _counter(conn, "duplicates"),
        "batches": _counter(conn, "batches"),
        "recent": recent,
        "recent_window": RECENT_WINDOW,
        "last_received_at": last_received,
        "upstream_lag": lag,
        "sensors": sensors,
        "alerts": alerts,
    }


class CloudStore:
    """Synchronous read access to an endpoint's database, for tests and verification.

    Safe to use while a `CloudServer` writes the same file (WAL: readers never block it).
    """

    def __init__(self, db_path: str | Path) -> None:
        self._conn = connect(db_path)

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> CloudStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def event_ids(self, stream: str | None = None) -> set[str]:
        """The ids of the stored events (of one stream if given)."""
        if stream is None:
            return {r[0] for r in self._conn.execute("SELECT id FROM events")}
        return {
            r[0] for r in self._conn.execute("SELECT id FROM events WHERE stream = ?", (stream,))
        }

    def count(self, stream: str | None = None) -> int:
        """How many events are stored (in one stream if given)."""
        if stream is None:
            row = self._conn.execute("SELECT count(*) FROM events").fetchone()
        else:
            row = self._conn.execute(
                "SELECT count(*) FROM events WHERE stream = ?", (stream,)
            ).fetchone()
        return int(row[0])

    def duplicates(self) -> int:
        """How many events were received again after they were first stored."""
        return _counter(self._conn, "duplicates")

    def events(self, stream: str | None = None) -> list[dict[str, Any]]:
        """The stored events in arrival order, as dicts (`data` decoded)."""
        sql = "SELECT * FROM events" + (" WHERE stream = ?" if stream else "") + " ORDER BY rowid"
        cur = self._conn.execute(sql, (stream,) if stream else ())
        names = [d[0] for d in cur.description]
        rows = [dict(zip(names, r, strict=True)) for r in cur]
        for row in rows:
            row["data"] = _loads(row["data"])
        return rows

    def summary(self, now: float | None = None) -> dict[str, Any]:
        """The same snapshot as `GET /api/summary`."""
        return summarize(self._conn, time.time() if now is None else now)


@dataclass(slots=True)
class Faults:
    """The endpoint's fault switches, changed at run time through `POST /control`."""

    down: bool = False
    fail_rate: float = 0.0
    lose_ack_rate: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {"down": self.down, "fail_rate": self.fail_rate, "lose_ack_rate": self.lose_ack_rate}


def _error(status: int, reason: str) -> web.Response:
    return web.json_response({"error": reason}, status=status)


class CloudServer:
    """The ingestion endpoint. `start` binds (port 0 picks a free port), `stop` closes.

    All database work runs on one dedicated thread, so a commit's fsync never stalls the
    event loop and the connection is never shared between threads.
    """

    def __init__(
        self,
        db_path: str | Path,
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        fail_rate: float = 0.0,
        *,
        lose_ack_rate: float = 0.0,
        seed: int = 0,
        max_body: int = 32 * 1024 * 1024,
        clock: Callable[[], float] = time.time,
    ) -> None:
        for name, rate in (("fail_rate", fail_rate), ("lose_ack_rate", lose_ack_rate)):
            if not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        self.db_path = Path(db_path)
        self.host = host
        self.token = token
        self.faults = Faults(fail_rate=fail_rate, lose_ack_rate=lose_ack_rate)
        self.max_body = max_body
        self.clock = clock
        self._requested_port = port
        self._port: int | None = None
        self._rng = random.Random(seed)
        self._runner: web.AppRunner | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None

    @property
    def port(self) -> int:
        """The bound port (after `start`)."""
        if self._port is None:
            raise RuntimeError("the server is not started")
        return self._port

    @property
    def url(self) -> str:
        """`http://host:port`, without a trailing slash."""
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        """Open the database and start listening."""
        if self._runner is not None:
            return
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cloud-db")
        self._conn = await self._db(lambda: connect(self.db_path, create=True))
        app = web.Application(client_max_size=self.max_body)
        app.router.add_post("/ingest", self._ingest)
        app.router.add_get("/api/summary", self._summary)
        app.router.add_post("/control", self._control)
        app.router.add_get("/control", self._control)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self._requested_port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            await self._close_db()
            raise
        self._runner = runner
        self._port = int(runner.addresses[0][1])

    async def stop(self) -> None:
        """Stop listening (in-flight requests finish first) and close the database."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self._close_db()

    async def __aenter__(self) -> CloudServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def set_faults(
        self,
        *,
        down: bool | None = None,
        fail_rate: float | None = None,
        lose_ack_rate: float | None = None,
    ) -> None:
        """Change the fault switches; None leaves one as it is."""
        for name, rate in (("fail_rate", fail_rate), ("lose_ack_rate", lose_ack_rate)):
            if rate is not None and not 0.0 <= rate <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if down is not None:
            self.faults.down = down
        if fail_rate is not None:
            self.faults.fail_rate = fail_rate
        if lose_ack_rate is not None:
            self.faults.lose_ack_rate = lose_ack_rate

    async def summary(self) -> dict[str, Any]:
        """The snapshot served at `GET /api/summary`."""
        conn = self._require_conn()
        now = self.clock()
        result = await self._db(lambda: summarize(conn, now))
        result["faults"] = self.faults.as_dict()
        return result

    # --- internals ------------------------------------------------------------------------

    async def _db(self, fn: Callable[[], T]) -> T:
        if self._executor is None:
            raise RuntimeError("the server is not started")
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn)

    async def _close_db(self) -> None:
        if self._executor is None:
            return
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._db(conn.close)
        self._executor.shutdown(wait=True)
        self._executor = None

    def _require_conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise RuntimeError("the server is not started")
        return self._conn

    def _authorized(self, request: web.Request) -> bool:
        return self.token is None or request.headers.get("Authorization") == f"Bearer {self.token}"

    def _draw(self, rate: float) -> bool:
        return rate > 0.0 and self._rng.random() < rate

    async def _ingest(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if self.faults.down:
            return _error(503, "endpoint is down (fault switch)")
        if self._draw(self.faults.fail_rate):
            return _error(500, "injected failure (fail_rate)")
        try:
            # aiohttp undoes Content-Encoding: gzip/deflate itself, and enforces max_body.
            body = await request.read()
        except web.HTTPException:
            raise
        except Exception as e:
            return _error(400, f"cannot read the body: {e}")
        try:
            batch = parse_batch(json.loads(body))
        except BatchError as e:
            return _error(400, str(e))
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
            return _error(400, f"body is not JSON: {e}")
        conn = self._require_conn()
        received_at = self.clock()
        accepted, duplicates = await self._db(lambda: store_batch(conn, batch, received_at))
        if self._draw(self.faults.lose_ack_rate):
            return _error(500, "injected failure after commit (lose_ack_rate)")
        return web.json_response({"accepted": accepted, "duplicates": duplicates})

    async def _summary(self, request: web.Request) -> web.Response:
        return web.json_response(await self.summary())

    async def _control(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return _error(401, "missing or wrong bearer token")
        if request.method == "POST":
            try:
                body = await request.json()
            except ValueError as e:
                return _error(400, f"body is not JSON: {e}")
            try:
                self._apply_control(body)
            except (TypeError, ValueError) as e:
                return _error(400, str(e))
        return web.json_response(self.faults.as_dict())

    def _apply_control(self, body: Any) -> None:
        if not isinstance(body, Mapping):
            raise TypeError("body must be a JSON object")
        unknown = set(body) - {"down", "fail_rate", "lose_ack_rate"}
        if unknown:
            raise ValueError(f"unknown switches: {', '.join(sorted(unknown))}")
        down = body.get("down")
        if down is not None and not isinstance(down, bool):
            raise TypeError("down must be true or false")
        rates: dict[str, float | None] = {}
        for key in ("fail_rate", "lose_ack_rate"):
            v = body.get(key)
            if v is not None and not _is_number(v):
                raise TypeError(f"{key} must be a number")
            rates[key] = float(v) if v is not None else None
        self.set_faults(
            down=down, fail_rate=rates["fail_rate"], lose_ack_rate=rates["lose_ack_rate"]
        )
