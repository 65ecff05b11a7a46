"""The delivery verdict: what the simulator sent (`--record sent.db`) against what reached the
local cloud (`edge-sim cloud --db cloud.db`).

A sent reading and a delivered `reading` event are the same reading when they have the same
sensor (the agent prepends its input's `sensor_prefix`), the same device time to the
millisecond (the agent forwards the device's `ts` as the event `time`) and the same value.
Per sensor this counts:

- `sent`: readings sent (fault lines and lines destroyed at the source left out);
- `delivered`: those found at the cloud; `lost`: the others;
- `reported` / `silent`: lost readings inside / outside a gap the agent reported. A gap is an
  `agent`-stream `gap` event at the cloud: an input that was disconnected (`input`, `from`,
  `to`: agent wall clock, compared with when the line was sent, widened by `slack` seconds),
  or readings the agent dropped for its disk quota or age (`stream: readings`; `first_time` ..
  `last_time` in device time, or `first_recv_time` .. `last_recv_time` in wall clock);
- `duplicates`: deliveries beyond the first of one reading under *another* event id (the
  cloud already drops resends of one id; those are counted in `resends_dropped`);
- `rejected`: fault lines sent (garbage, invalid UTF-8, over-long, NaN), which belong in the
  dead-letter stream, not among readings; `discarded`: lines still in the port when an outage
  closed it; `unexpected`: readings at the cloud within the run's time span that were never
  sent (another device, a wrong prefix);
- `latency_p50` / `latency_p99`: the cloud's `received_at` minus the time the line was sent.

Silent loss is the failure: `Report.silent_loss`, and `edge-sim verify` exits 1 on it.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Key = tuple[str, int, float]  # sensor as sent, device time in ms, value


class VerifyError(Exception):
    """A record or a cloud database that cannot be read."""


@dataclass(slots=True)
class SensorVerdict:
    """The counts for one sensor (or, as `Report.total`, for all of them)."""

    sensor: str
    sent: int = 0
    delivered: int = 0
    lost: int = 0
    reported: int = 0
    silent: int = 0
    duplicates: int = 0
    rejected: int = 0
    discarded: int = 0
    unexpected: int = 0
    latency_p50: float | None = None
    latency_p99: float | None = None

    def add(self, other: SensorVerdict) -> None:
        for name in (
            "sent", "delivered", "lost", "reported", "silent", "duplicates", "rejected",
            "discarded", "unexpected",
        ):  # fmt: skip
            setattr(self, name, getattr(self, name) + getattr(other, name))


@dataclass(slots=True)
class GapVerdict:
    """A gap the agent reported, and how many lost readings it accounts for."""

    id: str
    reason: str
    subject: str  # the input, or the stream the readings were dropped from
    start: float | None
    end: float | None
    clock: str  # "wall" (agent wall clock) or "device" (event time)
    covers: int = 0


@dataclass(slots=True)
class Report:
    """The whole verdict."""

    sent_path: str
    cloud_path: str
    prefix: str
    runs: int
    sensors: list[SensorVerdict]
    total: SensorVerdict
    gaps: list[GapVerdict]
    deadletter: dict[str, int]
    resends_dropped: int
    silent_examples: list[dict[str, Any]] = field(default_factory=list)

    @property
    def silent_loss(self) -> bool:
        return self.total.silent > 0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["silent_loss"] = self.silent_loss
        out["ok"] = not self.silent_loss
        return out


@dataclass(slots=True)
class _Sent:
    sensor: str
    ts: float
    value: float | None
    sent_at: float
    fault: str | None
    discarded: bool


def _connect_ro(path: Path, what: str) -> sqlite3.Connection:
    if not path.exists():
        raise VerifyError(f"{what} {path} does not exist")
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        conn.execute("SELECT 1 FROM sqlite_master").fetchall()
    except sqlite3.Error as e:
        raise VerifyError(f"{what} {path}: {e}") from e
    return conn


def _key(sensor: str, ts: float, value: float) -> Key:
    return sensor, round(ts * 1000), value + 0.0  # -0.0 and 0.0 are one value


def read_sent(path: Path) -> tuple[list[_Sent], int]:
    """The rows of a record file, and how many runs it holds."""
    conn = _connect_ro(path, "record")
    try:
        rows = conn.execute(
            "SELECT sensor, ts, value, sent_at, fault, discarded FROM sent ORDER BY run, seq"
        ).fetchall()
        (runs,) = conn.execute("SELECT count(*) FROM runs").fetchone()
    except sqlite3.Error as e:
        raise VerifyError(f"record {path} is not an edge-sim record: {e}") from e
    finally:
        conn.close()
    return [_Sent(r[0], r[1], r[2], r[3], r[4], bool(r[5])) for r in rows], int(runs)


def _percentile(sorted_values: list[float], p: float) -> float | None:
    if not sorted_values:
        return None
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def _guess_prefix(sent_sensors: Iterable[str], cloud_sensors: set[str]) -> str:
    """The sensor prefix that makes the most sent sensor names appear at the cloud."""
    votes: Counter[str] = Counter()
    for s in set(sent_sensors):
        for c in cloud_sensors:
            if c.endswith(s):
                votes[c[: len(c) - len(s)]] += 1
    if not votes:
        return ""
    best = max(votes.values())
    return "" if votes.get("", 0) == best else min(p for p, n in votes.items() if n == best)


def _gaps(conn: sqlite3.Connection) -> list[GapVerdict]:
    out = []
    for event_id, data_text in conn.execute(
        # `kind != 'reading'` lets SQLite use the cloud's partial index of the other kinds.
        "SELECT id, data FROM events WHERE stream = 'agent' AND kind = 'gap'"
        " AND kind != 'reading' ORDER BY time"
    ):
        try:
            data = json.loads(data_text) if data_text else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            continue
        if "input" in data:
            out.append(
                GapVerdict(
                    event_id,
                    str(data.get("reason", "disconnected")),
                    str(data["input"]),
                    _num(data.get("from")),
                    _num(data.get("to")),
                    "wall",
                )
            )
        elif data.get("stream") == "readings":
            reason = str(data.get("reason", "dropped"))
            out.append(
                GapVerdict(
                    event_id,
                    reason,
                    "readings",
                    _num(data.get("first_time")),
                    _num(data.get("last_time")),
                    "device",
                )
            )
            recv = (_num(data.get("first_recv_time")), _num(data.get("last_recv_time")))
            if recv[0] is not None and recv[1] is not None:
                # The same gap seen on the wall clock: matched too, counted once (see below).
                out.append(GapVerdict(event_id, reason, "readings", *recv, "wall"))
    return out


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _covering(gaps: list[GapVerdict], ts: float, sent_at: float, slack: float) -> GapVerdict | None:
    for g in gaps:
        if g.start is None or g.end is None:
            continue
        if g.clock == "device":
            if g.start - 0.0005 <= ts <= g.end + 0.0005:
                return g
        elif g.start - slack <= sent_at <= g.end + slack:
            return g
    return None


def verify(
    sent_rows: list[_Sent],
    conn: sqlite3.Connection,
    *,
    prefix: str | None = None,
    slack: float = 2.0,
    sent_path: str = "",
    cloud_path: str = "",
    runs: int = 1,
) -> Report:
    """Compare sent rows with a cloud database (an open connection to it)."""
    names = sorted({r.sensor for r in sent_rows})
    try:
        cloud_sensors = {
            s
            for (s,) in conn.execute(
                "SELECT DISTINCT sensor FROM events"
                " WHERE stream = 'readings' AND sensor IS NOT NULL"
            )
        }
        if prefix is None:
            prefix = _guess_prefix(names, cloud_sensors)
        wanted = {prefix + n: n for n in names}
        delivered: dict[Key, list[float]] = defaultdict(list)
        for sensor, value, t, received_at in conn.execute(
            "SELECT sensor, value, time, received_at FROM events"
            " WHERE stream = 'readings' AND kind = 'reading'"
        ):
            name = wanted.get(sensor)
            if name is not None and value is not None:
                delivered[_key(name, t, value)].append(received_at)
        gaps = _gaps(conn)
        deadletter: Counter[str] = Counter()
        for (data_text,) in conn.execute("SELECT data FROM events WHERE stream = 'deadletter'"):
            try:
                reason = json.loads(data_text).get("reason", "?") if data_text else "?"
            except (ValueError, AttributeError):
                reason = "?"
            deadletter[str(reason)] += 1
        row = conn.execute("SELECT value FROM counters WHERE name = 'duplicates'").fetchone()
        resends = int(row[0]) if row else 0
    except sqlite3.Error as e:
        raise VerifyError(f"cloud database {cloud_path}: {e}") from e

    verdicts = {n: SensorVerdict(n) for n in names}
    sent_at: dict[Key, list[float]] = defaultdict(list)
    lost_rows: dict[Key, list[_Sent]] = defaultdict(list)
    fault_keys: set[Key] = set()
    span: dict[str, tuple[float, float]] = {}
    for r in sent_rows:
        v = verdicts[r.sensor]
        lo, hi = span.get(r.sensor, (r.ts, r.ts))
        span[r.sensor] = (min(lo, r.ts), max(hi, r.ts))
        if r.discarded:
            v.discarded += 1
        elif r.fault is not None:
            v.rejected += 1
            if r.value is not None:
                fault_keys.add(_key(r.sensor, r.ts, r.value))
        elif r.value is not None:
            key = _key(r.sensor, r.ts, r.value)
            sent_at[key].append(r.sent_at)
            lost_rows[key].append(r)
            v.sent += 1

    latencies: dict[str, list[float]] = defaultdict(list)
    silent_examples: list[dict[str, Any]] = []
    covers: Counter[str] = Counter()
    for key, times in sent_at.items():
        v = verdicts[key[0]]
        received = sorted(delivered.get(key, ()))
        matched = min(len(times), len(received))
        v.delivered += matched
        v.duplicates += len(received) - matched
        times.sort()
        latencies[key[0]].extend(rx - tx for tx, rx in zip(times, received, strict=False))
        for r in lost_rows[key][matched:]:
            v.lost += 1
            gap = _covering(gaps, r.ts, r.sent_at, slack)
            if gap is None:
                v.silent += 1
                if len(silent_examples) < 10:
                    silent_examples.append(
                        {"sensor": r.sensor, "ts": r.ts, "value": r.value, "sent_at": r.sent_at}
                    )
            else:
                v.reported += 1
                covers[gap.id] += 1
    for key, received in delivered.items():
        if key in sent_at or key in fault_keys:
            continue
        lo, hi = span.get(key[0], (math.inf, -math.inf))
        if lo - 1.0 <= key[1] / 1000 <= hi + 1.0:
            verdicts[key[0]].unexpected += len(received)

    total = SensorVerdict("total")
    all_latencies: list[float] = []
    for name, v in verdicts.items():
        lat = sorted(latencies[name])
        v.latency_p50, v.latency_p99 = _percentile(lat, 50), _percentile(lat, 99)
        all_latencies.extend(lat)
        total.add(v)
    all_latencies.sort()
    total.latency_p50 = _percentile(all_latencies, 50)
    total.latency_p99 = _percentile(all_latencies, 99)
    # One row per gap event (a quota gap is matched on two clocks but reported once).
    shown: dict[str, GapVerdict] = {}
    for g in gaps:
        if g.id not in shown:
            g.covers = covers[g.id]
            shown[g.id] = g
    return Report(
        sent_path=sent_path,
        cloud_path=cloud_path,
        prefix=prefix,
        runs=runs,
        sensors=list(verdicts.values()),
        total=total,
        gaps=list(shown.values()),
        deadletter=dict(sorted(deadletter.items())),
        resends_dropped=resends,
        silent_examples=silent_examples,
    )


def verify_files(
    sent: str | Path, cloud: str | Path, *, prefix: str | None = None, slack: float = 2.0
) -> Report:
    """`verify` over a record file and a cloud database file."""
    rows, runs = read_sent(Path(sent))
    conn = _connect_ro(Path(cloud), "cloud database")
    try:
        return verify(
            rows,
            conn,
            prefix=prefix,
            slack=slack,
            sent_path=str(sent),
            cloud_path=str(cloud),
            runs=runs,
        )
    finally:
        conn.close()


# --------------------------------------------------------------------------- text


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.0f}"


def _when(t: float | None) -> str:
    if t is None:
        return "?"
    stamp = datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]
    return f"{stamp}Z"


def _row(v: SensorVerdict) -> tuple[object, ...]:
    return (
        v.sensor, v.sent, v.delivered, v.lost, v.reported, v.silent, v.duplicates,
        v.rejected, v.unexpected, _ms(v.latency_p50), _ms(v.latency_p99),
    )  # fmt: skip


def format_report(report: Report) -> str:
    """The verdict as a table for a terminal."""
    lines = [
        f"edge-sim verify: {report.sent_path} ({report.runs} run(s)) against "
        f"{report.cloud_path}, sensor prefix {report.prefix!r}",
        "",
    ]
    head = (
        "sensor", "sent", "delivered", "lost", "reported", "silent", "dupes", "rejected",
        "unexpected", "p50 ms", "p99 ms",
    )  # fmt: skip
    rows = [_row(v) for v in (*report.sensors, report.total)]
    widths = [max(len(str(x)) for x in col) for col in zip(head, *rows, strict=True)]
    for i, row in enumerate((head, *rows)):
        if i == len(rows):  # the total
            lines.append("  ".join("-" * w for w in widths))
        cells = [str(row[0]).ljust(widths[0])]
        cells += [str(x).rjust(w) for x, w in zip(row[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
    lines.append("")
    lines.append(f"gaps reported by the agent: {len(report.gaps)}")
    for g in report.gaps:
        span = f"{_when(g.start)} .. {_when(g.end)} ({g.clock} clock)"
        lines.append(f"  {g.reason} ({g.subject}): {span}; accounts for {g.covers} lost")
    dead = ", ".join(f"{k} {n}" for k, n in report.deadletter.items()) or "none"
    lines.append(
        f"dead letters at the cloud: {sum(report.deadletter.values())} ({dead}); "
        f"fault lines sent: {report.total.rejected}"
    )
    lines.append(f"resends the cloud dropped as duplicates: {report.resends_dropped}")
    if report.total.discarded:
        lines.append(f"lines destroyed at the source by outages: {report.total.discarded}")
    t = report.total
    if report.silent_loss:
        lines.append(f"verdict: SILENT LOSS: {t.silent} of {t.sent} readings lost without a gap")
        for ex in report.silent_examples:
            lines.append(
                f"  e.g. {ex['sensor']} value {ex['value']} ts {ex['ts']} "
                f"(sent {_when(ex['sent_at'])})"
            )
    elif t.lost:
        lines.append(f"verdict: OK: {t.lost} of {t.sent} readings lost, every one reported")
    else:
        lines.append(f"verdict: OK: all {t.sent} readings delivered")
    if t.sent and not t.delivered and t.unexpected == 0:
        lines.append("hint: nothing matched; is --prefix the agent input's sensor_prefix?")
    return "\n".join(lines)
