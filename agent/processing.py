"""On-device processing: windows over readings, and rules over readings and windows.

Everything here is pure and synchronous (invariant 7): a function of (state, batch of readings)
with no I/O and no clock of its own (`tick` is handed the clocks), so it is testable without a
broker or a disk. Its state is plain data (`snapshot` / `restore`), committed by the processor
with its cursor; a window whose state is missing can be rebuilt by feeding it the readings it
needs again (`rebuild`), silently.

Windows. A window of `size` starts every `step` (tumbling: step = size) on a grid
`start(k) = k * step + offset`; window `k` covers `[start(k), start(k + n))`, `n = size / step`.
The time axis is either processing time, the monotonic clock (invariant 6: a wall-clock step
neither splits nor merges a window; `align` puts the boundaries on the wall clock through an
anchor `wall - mono`, re-measured at a window boundary after a clock step), or event time, the
device's time. Each series (a sensor, or a group of sensors) has a watermark `W`, the newest time
it has seen; window `k` closes once `start(k + n) <= W - lateness` (processing time waits the
processor's grace instead), or, on `tick`, once the watermark moved on by the monotonic time
elapsed since, so a window closes on time when no more readings come. A reading that only falls
into closed windows is late: counted, and kept in `deadletter` with reason `late`.

A batch is folded in with numpy: readings become (series, window) rows, sorted once, reduced
with `ufunc.reduceat`, and merged into the open windows, which are columns sorted by
(series, window). Mergeable functions keep running sums (Chan's formula for the variance);
median and percentiles keep the window's values (at most `max_samples`, evenly thinned beyond);
the EWMA is a recurrence, run in a plain loop over the batch.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.config import ProcessingConfig, RuleConfig, WindowConfig, percentile_of
from agent.events import Event, NewEvent

Arr = npt.NDArray[Any]

#: The closed index of a series that has closed nothing yet.
NEVER = -(2**62)
#: The monotonic clock going back by more than this means the machine rebooted.
REBOOT_JUMP = 30.0
#: Aligned processing-time windows re-measure `wall - mono` when it moved by more than this.
ALIGN_TOLERANCE = 1.0
#: At most this many empty windows are filled in for one series at a time.
MAX_FILL = 1000
#: Version of the snapshot format; another version is rebuilt by replay instead.
STATE_VERSION = 2

_COLUMNS: tuple[str, ...] = ("n", "total", "mn", "mx", "m2", "fp", "fv", "lp", "lv", "tmin")
_COLUMNS += ("tmax", "ew", "recv", "mono")


def fingerprint(model: WindowConfig | RuleConfig) -> str:
    """A short digest of a window's or rule's definition: state is kept only while it holds."""
    text = json.dumps(model.model_dump(mode="json", by_alias=True), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cells(p: Arr, step: float, offset: float) -> Arr:
    """The grid cell `j` of each time, `start(j) <= p < start(j + 1)`, `start(j) = j*step + off`.

    Floor of the quotient, then corrected against the boundaries as computed, so that a time
    exactly on a boundary is in the cell that starts there, whatever the rounding.
    """
    j = np.floor((p - offset) / step).astype(np.int64)
    j -= (j * step + offset > p).astype(np.int64)
    j += ((j + 1) * step + offset <= p).astype(np.int64)
    return j


def _running_max(groups: Arr, p: Arr) -> Arr:
    """For each position, the largest `p` so far (in order) among positions of its group."""
    order = np.argsort(groups, kind="stable")
    g, v = groups[order], p[order]
    by_value = np.argsort(v, kind="stable")
    rank = np.empty(len(v), np.int64)
    rank[by_value] = np.arange(len(v))
    dense = np.concatenate(([0], np.cumsum(g[1:] != g[:-1])))
    # Groups are separated by a stride larger than any rank, so one running max serves all.
    best = np.maximum.accumulate(dense * len(v) + rank) - dense * len(v)
    out = np.empty(len(p))
    out[order] = v[by_value][best]
    return out


def percentile(kept: _Samples | None, q: float) -> float:
    """numpy's default ("linear") percentile of the kept values, without its per-call cost."""
    if kept is None or not kept.kept:
        return math.nan
    xs: list[float] = np.sort(kept.values()).tolist()
    h = (len(xs) - 1) * q / 100.0
    lo = math.floor(h)
    a, b = xs[lo], xs[min(lo + 1, len(xs) - 1)]
    t = h - lo
    # numpy's lerp: from the nearer end, so a percentile of equal values is that value.
    return a + (b - a) * t if t < 0.5 else b - (b - a) * (1.0 - t)


def _none_if_nan(x: float) -> float | None:
    return None if x != x else x


# --------------------------------------------------------------------------- batches


class SensorTable:
    """Sensor names as small integer codes, shared by the windows and rules of a pipeline."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.codes: dict[str, int] = {}

    def code(self, name: str) -> int:
        """The code of `name`, given one if it is new."""
        found = self.codes.get(name)
        if found is None:
            found = self.codes[name] = len(self.names)
            self.names.append(name)
        return found

    def encode(self, names: Sequence[str]) -> Arr:
        """Codes of many names at once."""
        try:
            return np.fromiter(map(self.codes.__getitem__, names), np.int64, len(names))
        except KeyError:
            return np.fromiter(map(self.code, names), np.int64, len(names))


@dataclass(slots=True)
class ReadingBatch:
    """Readings as columns, in log order: what windows and rules are fed."""

    seq: Arr
    code: Arr
    value: Arr
    time: Arr
    mono: Arr
    recv: Arr
    unit: list[str | None]

    def __len__(self) -> int:
        return len(self.seq)

    @classmethod
    def from_events(cls, events: Sequence[Event], table: SensorTable) -> ReadingBatch:
        """Columns of the readings among `events` (events without a sensor or value are skipped)."""
        sensors = [e.sensor for e in events]
        values = [e.value for e in events]
        if None in sensors or None in values:
            events = [e for e in events if e.sensor is not None and e.value is not None]
            sensors = [e.sensor for e in events]
            values = [e.value for e in events]
        n = len(events)
        return cls(
            seq=np.fromiter([e.seq for e in events], np.int64, n),
            code=table.encode(sensors),  # type: ignore[arg-type]
            value=np.array(values, dtype=np.float64),
            time=np.fromiter([e.time for e in events], np.float64, n),
            mono=np.fromiter([e.mono for e in events], np.float64, n),
            recv=np.fromiter([e.recv_time for e in events], np.float64, n),
            unit=[e.unit for e in events],
        )

    def take(self, idx: Arr) -> ReadingBatch:
        """The readings at positions `idx`, in that order."""
        units = self.unit
        return ReadingBatch(
            self.seq[idx],
            self.code[idx],
            self.value[idx],
            self.time[idx],
            self.mono[idx],
            self.recv[idx],
            [units[i] for i in idx.tolist()],
        )


@dataclass(slots=True)
class Output:
    """What processing a batch (or a tick) produced, for the `aggregates`, `alerts` and
    `deadletter` streams."""

    aggregates: list[NewEvent] = field(default_factory=list)
    alerts: list[NewEvent] = field(default_factory=list)
    deadletter: list[NewEvent] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.aggregates or self.alerts or self.deadletter)

    def extend(self, other: Output) -> None:
        """Append another output's events after these."""
        self.aggregates.extend(other.aggregates)
        self.alerts.extend(other.alerts)
        self.deadletter.extend(other.deadletter)


# --------------------------------------------------------------------------- windows


@dataclass(slots=True)
class _Samples:
    """A window's values for median and percentiles, thinned to every `stride`-th when full."""

    parts: list[Arr]
    kept: int = 0
    seen: int = 0
    stride: int = 1

    def add(self, values: Arr, limit: int) -> None:
        positions = np.arange(self.seen, self.seen + len(values))
        self.seen += len(values)
        if self.stride > 1:
            values = values[positions % self.stride == 0]
        self.parts.append(values)
        self.kept += len(values)
        while self.kept > limit:
            merged = np.concatenate(self.parts)[::2]
            self.parts, self.kept, self.stride = [merged], len(merged), self.stride * 2

    def values(self) -> Arr:
        return np.concatenate(self.parts) if self.parts else np.empty(0)


class _Table:
    """Open windows as columns, one row per (series, window index), sorted by both."""

    def __init__(self, s: Arr, k: Arr, cols: dict[str, Arr]) -> None:
        self.s, self.k, self.cols = s, k, cols

    @classmethod
    def empty(cls) -> _Table:
        cols = {c: np.empty(0, np.int64 if c == "n" else np.float64) for c in _COLUMNS}
        return cls(np.empty(0, np.int64), np.empty(0, np.int64), cols)

    def __len__(self) -> int:
        return len(self.s)

    def take(self, idx: Arr) -> _Table:
        return _Table(self.s[idx], self.k[idx], {c: v[idx] for c, v in self.cols.items()})

    def concat(self, other: _Table) -> _Table:
        return _Table(
            np.concatenate((self.s, other.s)),
            np.concatenate((self.k, other.k)),
            {c: np.concatenate((v, other.cols[c])) for c, v in self.cols.items()},
        )


def _sort_keys(s: Arr, k: Arr) -> Arr:
    """Indices that sort rows by (s, k), stable."""
    if not len(s):
        return np.empty(0, np.int64)
    kmin, kmax = int(k.min()), int(k.max())
    span = kmax - kmin + 1
    if span < 2**40 and int(s.max()) < 2**22:
        return np.argsort(s * span + (k - kmin), kind="stable")
    return np.lexsort((k, s))


@dataclass(slots=True)
class _Fn:
    name: str
    kind: str
    q: float = 0.0


class Window:
    """One configured window over every series it covers; see the module docstring.

    `feed` and `tick` are never called concurrently (the processor owns the pipeline).
    """

    def __init__(self, cfg: WindowConfig, table: SensorTable, *, grace: float = 2.0) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.table = table
        self.fp = fingerprint(cfg)
        self.size = cfg.size
        self.step = cfg.hop
        self.n = max(1, round(cfg.size / cfg.hop))
        self.event_time = cfg.time == "event"
        self.aligned = cfg.align
        self.lateness = cfg.lateness if self.event_time else grace
        self.tick_delay = grace if self.event_time else 0.0
        self.offset = cfg.offset if (self.event_time or self.aligned) else 0.0
        self.fns: list[_Fn] = []
        for name in cfg.all_functions:
            q = percentile_of(name)
            self.fns.append(_Fn(name, "pct", q) if q is not None else _Fn(name, name))
        kinds = {f.kind for f in self.fns}
        self.need_std = "std" in kinds
        self.need_ends = bool(kinds & {"first", "last", "rate"})
        self.need_ewma = "ewma" in kinds
        self.need_samples = "pct" in kinds
        self.globs = [cfg.sensors] if isinstance(cfg.sensors, str) else list(cfg.sensors)
        self.late = 0
        self._series_of = np.empty(0, np.int64)
        self.series: list[str] = []
        self._series_index: dict[str, int] = {}
        self.W = np.empty(0)
        self.W_mono = np.empty(0)
        self.W_recv = np.empty(0)
        self.closed = np.empty(0, np.int64)
        self.min_k = np.empty(0, np.int64)
        self.ewma = np.empty(0)
        self.units: list[str | None] = []
        self.previous: dict[int, dict[str, float | None]] = {}
        self.open = _Table.empty()
        self.samples: dict[tuple[int, int], _Samples] = {}
        # Processing time: p = mono + anchor, with the anchor 0 unless aligned.
        self.anchor = 0.0 if not self.aligned else math.nan
        self.switch: tuple[float, float] | None = None  # (mono of the switch, new anchor)
        self.epoch_start = -math.inf  # windows starting earlier are clipped to this
        self.mono_hw = -math.inf

    @property
    def grid(self) -> tuple[float, float, float, bool, bool]:
        """What places the windows in time: two definitions with the same grid number their
        windows alike."""
        return (self.size, self.step, self.offset, self.event_time, self.aligned)

    # ------------------------------------------------------------------ series

    def matches(self, sensor: str) -> bool:
        """Whether this window covers `sensor`."""
        return any(fnmatch.fnmatchcase(sensor, g) for g in self.globs)

    def _series(self, codes: Arr) -> Arr:
        known = len(self._series_of)
        if known < len(self.table.names):
            more = np.full(len(self.table.names) - known, -1, np.int64)
            for i, name in enumerate(self.table.names[known:]):
                if self.matches(name):
                    more[i] = self._add_series(self.cfg.group or name)
            self._series_of = np.concatenate((self._series_of, more))
        return self._series_of[codes]

    def _add_series(self, name: str) -> int:
        found = self._series_index.get(name)
        if found is not None:
            return found
        index = self._series_index[name] = len(self.series)
        self.series.append(name)
        self.W = np.append(self.W, -math.inf)
        self.W_mono = np.append(self.W_mono, -math.inf)
        self.W_recv = np.append(self.W_recv, -math.inf)
        self.closed = np.append(self.closed, NEVER)
        self.min_k = np.append(self.min_k, -NEVER)
        self.ewma = np.append(self.ewma, math.nan)
        self.units.append(None)
        return index

    def _closable(self, W: Arr, lateness: float) -> Arr:
        """The highest window index that has closed once the watermark is `W`."""
        out = np.full(len(W), NEVER, np.int64)
        fin = np.isfinite(W)
        if fin.any():
            out[fin] = cells(W[fin] - lateness, self.step, self.offset) - self.n
        return out

    # ------------------------------------------------------------------ feeding

    def feed(self, batch: ReadingBatch, *, silent: bool = False) -> Output:
        """Fold readings (log order) in; return the aggregates of the windows that closed and
        the late readings. `silent` (rebuilding state) emits and counts nothing."""
        out = Output()
        s_all = self._series(batch.code)
        idx = np.flatnonzero(s_all >= 0)
        if not len(idx):
            return out
        b = batch if len(idx) == len(batch) else batch.take(idx)
        s = s_all[idx]
        if self.event_time:
            self._fold(b, s, b.time, out, silent)
            return out
        start = 0
        while start < len(b):
            mono, recv = b.mono[start:], b.recv[start:]
            ahead = np.maximum(np.maximum.accumulate(mono), self.mono_hw)
            back = np.flatnonzero(mono < ahead - REBOOT_JUMP)
            cut, event = (int(back[0]), "reboot") if len(back) else (len(mono), "")
            if self.aligned:
                if self.anchor != self.anchor:
                    self.anchor = float(recv[0] - mono[0])
                if self.switch is None:
                    drift = np.flatnonzero(
                        np.abs(recv[:cut] - mono[:cut] - self.anchor) > ALIGN_TOLERANCE
                    )
                    if len(drift):
                        self._plan_switch(float(mono[drift[0]]), float(recv[drift[0]]))
                if self.switch is not None:
                    due = np.flatnonzero(mono[:cut] >= self.switch[0])
                    if len(due):
                        cut, event = int(due[0]), "switch"
            if cut:
                part = np.arange(start, start + cut)
                sub = b.take(part) if cut < len(b) else b
                self._fold(sub, s[part], sub.mono + self.anchor, out, silent)
                self.mono_hw = max(self.mono_hw, float(sub.mono.max()))
            if event == "reboot":
                self._restart(out, silent)
            elif event == "switch":
                self._switch(out, silent)
            start += cut
        return out

    def _fold(self, b: ReadingBatch, s: Arr, p: Arr, out: Output, silent: bool) -> None:
        n, step, off = self.n, self.step, self.offset
        j = cells(p, step, off)
        first_k = j - (n - 1)
        # The watermark of each series, and the reading that moved it.
        present, inv = np.unique(s, return_inverse=True)
        top = np.full(len(present), -math.inf)
        np.maximum.at(top, inv, p)
        at = np.full(len(present), len(p), np.int64)
        np.minimum.at(at, inv, np.where(p == top[inv], np.arange(len(p)), len(p)))
        W_before = self.W[present]
        W_after = np.maximum(W_before, top)
        closed_before = self.closed[s]
        # Fast path: nothing in this batch can fall into a window closed before it arrived.
        reach = np.maximum(self.closed[present], self._closable(W_after, self.lateness))[inv]
        if (first_k > reach).all():
            lo = first_k
        else:
            running = np.maximum(_running_max(s, p), self.W[s])
            closed_at = np.maximum(closed_before, self._closable(running, self.lateness))
            lo = np.maximum(first_k, closed_at + 1)
        count = j - lo + 1
        late = count <= 0
        if late.any():
            self._late(b, np.flatnonzero(late), p, out, silent)
        moved = W_after > W_before
        if moved.any():
            self.W[present[moved]] = W_after[moved]
            self.W_mono[present[moved]] = b.mono[at[moved]]
            self.W_recv[present[moved]] = b.recv[at[moved]]
        ok = np.flatnonzero(~late)
        if len(ok):
            self._add(b, s, p, j, lo, count, ok)
        self._close(present, self._closable(self.W[present], self.lateness), out, silent)

    def _add(self, b: ReadingBatch, s: Arr, p: Arr, j: Arr, lo: Arr, count: Arr, ok: Arr) -> None:
        np.minimum.at(self.min_k, s[ok], lo[ok])
        y = self._ewma(s[ok], b.value[ok]) if self.need_ewma else None
        if self.n == 1:
            rows, row_k = ok, j[ok]
        else:
            reps = count[ok]
            rows = np.repeat(ok, reps)
            firsts = np.cumsum(reps) - reps
            row_k = np.repeat(lo[ok], reps) + (np.arange(len(rows)) - np.repeat(firsts, reps))
            if y is not None:
                y = np.repeat(y, reps)
        row_s = s[rows]
        order = _sort_keys(row_s, row_k)
        r = rows[order]
        gs_all, gk_all = row_s[order], row_k[order]
        edge = np.concatenate(([True], (gs_all[1:] != gs_all[:-1]) | (gk_all[1:] != gk_all[:-1])))
        starts = np.flatnonzero(edge)
        total_rows = len(r)
        cnt = np.diff(np.append(starts, total_rows))
        x = b.value[r]
        cols: dict[str, Arr] = {"n": cnt.astype(np.int64)}
        cols["total"] = np.add.reduceat(x, starts)
        cols["mn"] = np.minimum.reduceat(x, starts)
        cols["mx"] = np.maximum.reduceat(x, starts)
        if self.need_std:
            dev = x - np.repeat(cols["total"] / cnt, cnt)
            cols["m2"] = np.add.reduceat(dev * dev, starts)
        else:
            cols["m2"] = np.zeros(len(starts))
        if self.need_ends:
            pp = p[r]
            pos = np.arange(total_rows)
            lowest = np.repeat(np.minimum.reduceat(pp, starts), cnt)
            first = np.minimum.reduceat(np.where(pp == lowest, pos, total_rows), starts)
            highest = np.repeat(np.maximum.reduceat(pp, starts), cnt)
            last = np.maximum.reduceat(np.where(pp == highest, pos, -1), starts)
            cols["fp"], cols["fv"] = pp[first], x[first]
            cols["lp"], cols["lv"] = pp[last], x[last]
        else:
            for c in ("fp", "fv", "lp", "lv"):
                cols[c] = np.zeros(len(starts))
        t = b.time[r]
        cols["tmin"] = np.minimum.reduceat(t, starts)
        cols["tmax"] = np.maximum.reduceat(t, starts)
        tail = starts + cnt - 1  # rows keep log order within a window: its last arrival
        cols["ew"] = y[order][tail] if y is not None else np.zeros(len(starts))
        cols["recv"] = b.recv[r][tail]
        cols["mono"] = b.mono[r][tail]
        gs, gk = gs_all[starts], gk_all[starts]
        if self.need_samples:
            limit = self.cfg.max_samples
            for g, (si, ki) in enumerate(zip(gs.tolist(), gk.tolist(), strict=True)):
                kept = self.samples.get((si, ki))
                if kept is None:
                    kept = self.samples[(si, ki)] = _Samples([])
                kept.add(x[starts[g] : starts[g] + cnt[g]], limit)
        last_of = np.full(len(self.series), -1, np.int64)
        np.maximum.at(last_of, s[ok], ok)
        for si in np.flatnonzero(last_of >= 0).tolist():
            self.units[si] = b.unit[int(last_of[si])]
        self._merge(_Table(gs, gk, cols))

    def _ewma(self, s: Arr, x: Arr) -> Arr:
        """The moving average after each reading, per series in log order (a recurrence: no
        numpy primitive computes it, so a plain loop over the batch)."""
        order = np.argsort(s, kind="stable")
        alpha = self.cfg.ewma_alpha
        state = self.ewma
        ss, xs = s[order].tolist(), x[order].tolist()
        ys = [0.0] * len(xs)
        current, y = -1, math.nan
        for i, (si, xi) in enumerate(zip(ss, xs, strict=True)):
            if si != current:
                if current >= 0:
                    state[current] = y
                current, y = si, float(state[si])
            y = xi if y != y else y + alpha * (xi - y)
            ys[i] = y
        if current >= 0:
            state[current] = y
        out = np.empty(len(xs))
        out[order] = ys
        return out

    def _merge(self, new: _Table) -> None:
        old = self.open
        if not len(old):
            self.open = new
            return
        kmin = min(int(old.k.min()), int(new.k.min()))
        span = max(int(old.k.max()), int(new.k.max())) - kmin + 1
        if span < 2**40 and max(int(old.s.max()), int(new.s.max())) < 2**22:
            old_key = old.s * span + (old.k - kmin)
            new_key = new.s * span + (new.k - kmin)
            pos = np.minimum(np.searchsorted(old_key, new_key), len(old_key) - 1)
            hit = old_key[pos] == new_key
        else:
            lookup = {
                (a, c): i
                for i, (a, c) in enumerate(zip(old.s.tolist(), old.k.tolist(), strict=True))
            }
            found = [
                lookup.get(key, -1) for key in zip(new.s.tolist(), new.k.tolist(), strict=True)
            ]
            pos = np.array(found, np.int64)
            hit = pos >= 0
            pos = np.maximum(pos, 0)
        if hit.any():
            io, inew = pos[hit], np.flatnonzero(hit)
            a, c = old.cols, new.cols
            n1, n2 = a["n"][io], c["n"][inew]
            if self.need_std:
                delta = c["total"][inew] / n2 - a["total"][io] / n1
                a["m2"][io] += c["m2"][inew] + delta * delta * (n1 * n2 / (n1 + n2))
            a["total"][io] += c["total"][inew]
            a["n"][io] = n1 + n2
            a["mn"][io] = np.minimum(a["mn"][io], c["mn"][inew])
            a["mx"][io] = np.maximum(a["mx"][io], c["mx"][inew])
            if self.need_ends:
                earlier = c["fp"][inew] < a["fp"][io]  # a tie keeps the one that came first
                a["fp"][io] = np.where(earlier, c["fp"][inew], a["fp"][io])
                a["fv"][io] = np.where(earlier, c["fv"][inew], a["fv"][io])
                later = c["lp"][inew] >= a["lp"][io]
                a["lp"][io] = np.where(later, c["lp"][inew], a["lp"][io])
                a["lv"][io] = np.where(later, c["lv"][inew], a["lv"][io])
            a["tmin"][io] = np.minimum(a["tmin"][io], c["tmin"][inew])
            a["tmax"][io] = np.maximum(a["tmax"][io], c["tmax"][inew])
            for col in ("ew", "recv", "mono"):
                a[col][io] = c[col][inew]
        if not hit.all():
            merged = old.concat(new.take(np.flatnonzero(~hit)))
            self.open = merged.take(_sort_keys(merged.s, merged.k))

    def _late(self, b: ReadingBatch, idx: Arr, p: Arr, out: Output, silent: bool) -> None:
        if silent:
            return
        self.late += len(idx)
        axis = "event time" if self.event_time else "arrival (monotonic) time"
        for i in idx.tolist():
            sensor = self.table.names[int(b.code[i])]
            reading = {
                "seq": int(b.seq[i]),
                "sensor": sensor,
                "value": float(b.value[i]),
                "unit": b.unit[i],
                "time": float(b.time[i]),
                "recv_time": float(b.recv[i]),
            }
            out.deadletter.append(
                NewEvent(
                    kind="deadletter",
                    time=float(b.time[i]),
                    recv_time=float(b.recv[i]),
                    mono=float(b.mono[i]),
                    sensor=sensor,
                    value=float(b.value[i]),
                    unit=b.unit[i],
                    data={
                        "reason": "late",
                        "detail": f"window {self.name}: its {axis} {float(p[i]):.3f} falls in "
                        f"windows already closed (allowed lateness {self.lateness:g}s)",
                        "source": f"window:{self.name}",
                        "seq": int(b.seq[i]),
                    },
                    raw=json.dumps(reading, separators=(",", ":")).encode(),
                )
            )

    # ------------------------------------------------------------------ closing

    def tick(self, now_mono: float, now_wall: float) -> Output:
        """Close the windows whose time is up at these clocks, even with no new readings."""
        out = Output()
        if not self.event_time:
            if now_mono < self.mono_hw - REBOOT_JUMP:
                self._restart(out, False)
                return out
            if self.aligned and self.anchor == self.anchor:
                if self.switch is None and abs(now_wall - now_mono - self.anchor) > ALIGN_TOLERANCE:
                    self._plan_switch(now_mono, now_wall)
                if self.switch is not None and now_mono >= self.switch[0]:
                    self._switch(out, False)
        if not len(self.series):
            return out
        elapsed = now_mono - self.W_mono
        # A monotonic clock behind the one the watermark was seen with: a reboot since.
        rebooted = elapsed < -REBOOT_JUMP
        elapsed = np.where(rebooted, now_wall - self.W_recv, elapsed)
        W_now = self.W + np.maximum(elapsed, 0.0)
        everyone = np.arange(len(self.series))
        self._close(everyone, self._closable(W_now, self.lateness + self.tick_delay), out, False)
        return out

    def next_close(self, now_mono: float) -> float:
        """Monotonic time at which `tick` will next have something to close (inf: nothing)."""
        if not len(self.open):
            return math.inf
        k = self.open.k + self.n
        end = k * self.step + self.offset
        at = end + self.lateness + self.tick_delay - self.W[self.open.s] + self.W_mono[self.open.s]
        return float(at.min())

    def _close(self, series: Arr, reach: Arr, out: Output, silent: bool) -> None:
        before = self.closed[series]
        after = np.maximum(before, reach)
        advanced = after > before
        if not advanced.any():
            return
        self.closed[series[advanced]] = after[advanced]
        rows = np.flatnonzero(self.open.k <= self.closed[self.open.s])
        fills: list[tuple[int, int]] = []
        if self.cfg.fill is not None:
            for si, b0, a0 in zip(
                series[advanced].tolist(),
                before[advanced].tolist(),
                after[advanced].tolist(),
                strict=True,
            ):
                first = max(b0 + 1, int(self.min_k[si]))
                fills.extend((si, k) for k in range(max(first, a0 - MAX_FILL + 1), a0 + 1))
        self._emit(rows, fills, None, out, silent)

    def _emit(
        self,
        rows: Arr,
        fills: list[tuple[int, int]],
        cut: float | None,
        out: Output,
        silent: bool,
    ) -> None:
        if not len(rows) and not fills:
            return
        closing = self.open.take(rows)
        if len(rows):
            keep = np.ones(len(self.open), bool)
            keep[rows] = False
            self.open = self.open.take(np.flatnonzero(keep))
        samples = [
            self.samples.pop((a, c), None)
            for a, c in zip(closing.s.tolist(), closing.k.tolist(), strict=True)
        ]
        if silent:
            return
        events = self._aggregates(closing, samples, cut)
        if fills:
            have = set(zip(closing.s.tolist(), closing.k.tolist(), strict=True))
            keyed = list(
                zip(zip(closing.s.tolist(), closing.k.tolist(), strict=True), events, strict=True)
            )
            keyed += [(key, self._filled(*key)) for key in fills if key not in have]
            keyed.sort(key=lambda item: item[0])
            events = [e for _, e in keyed]
        out.aggregates.extend(events)

    def _values(self, t: _Table, samples: list[_Samples | None]) -> dict[str, list[float | None]]:
        c = t.cols
        n = c["n"].astype(np.float64)
        out: dict[str, list[float | None]] = {}
        with np.errstate(divide="ignore", invalid="ignore"):
            for f in self.fns:
                if f.kind == "mean":
                    v = c["total"] / n
                elif f.kind == "sum":
                    v = c["total"]
                elif f.kind == "count":
                    v = n
                elif f.kind == "min":
                    v = c["mn"]
                elif f.kind == "max":
                    v = c["mx"]
                elif f.kind == "std":
                    v = np.sqrt(np.maximum(c["m2"], 0.0) / n)
                elif f.kind == "first":
                    v = c["fv"]
                elif f.kind == "last":
                    v = c["lv"]
                elif f.kind == "rate":
                    dt = c["lp"] - c["fp"]
                    v = np.where(dt > 0, (c["lv"] - c["fv"]) / np.where(dt > 0, dt, 1.0), np.nan)
                elif f.kind == "ewma":
                    v = c["ew"]
                else:
                    v = np.array([percentile(kept, f.q) for kept in samples])
                out[f.name] = [_none_if_nan(x) for x in v.tolist()]
        return out

    def _bounds(self, k: Arr, cut: float | None) -> tuple[Arr, Arr, Arr]:
        start = k * self.step + self.offset
        end = (k + self.n) * self.step + self.offset
        partial = start < self.epoch_start
        start = np.maximum(start, self.epoch_start)
        if cut is not None:
            partial |= end > cut
            end = np.minimum(end, cut)
        return start, end, partial

    def _aggregates(
        self, t: _Table, samples: list[_Samples | None], cut: float | None
    ) -> list[NewEvent]:
        if not len(t):
            return []
        values = self._values(t, samples)
        start_p, end_p, partial = self._bounds(t.k, cut)
        c = t.cols
        if self.event_time or self.aligned:
            start_w, end_w = start_p, end_p
        else:
            shift = c["recv"] - c["mono"]
            start_w, end_w = start_p + shift, end_p + shift
        mono = c["mono"] if self.event_time else end_p - self.anchor
        names = [f.name for f in self.fns]
        primary = values[names[0]]
        approx = [bool(kept is not None and kept.stride > 1) for kept in samples]
        events = []
        rows = zip(t.s.tolist(), t.k.tolist(), c["n"].tolist(), strict=True)
        for i, (si, k, n) in enumerate(rows):
            data: dict[str, Any] = {
                "window": self.name,
                "function": names[0],
                "values": {name: values[name][i] for name in names},
                "size": self.size,
                "step": self.step,
                "time": "event" if self.event_time else "processing",
                "start": float(start_w[i]),
                "end": float(end_w[i]),
                "index": k,
                "count": n,
                "first_time": float(c["tmin"][i]),
                "last_time": float(c["tmax"][i]),
            }
            if partial[i]:
                data["partial"] = True
            if approx[i]:
                data["approximate"] = True
            if self.cfg.fill == "previous":
                self.previous[si] = data["values"]
            events.append(
                NewEvent(
                    kind="aggregate",
                    time=float(end_w[i]),
                    recv_time=float(c["recv"][i]),
                    mono=float(mono[i]),
                    sensor=self.series[si],
                    value=primary[i],
                    unit=self.units[si],
                    data=data,
                )
            )
        return events

    def _filled(self, si: int, k: int) -> NewEvent:
        start_p, end_p, partial = self._bounds(np.array([k], np.int64), None)
        fill = self.cfg.fill
        names = [f.name for f in self.fns]
        if fill == "previous":
            before = self.previous.get(si, {})
            values = {name: before.get(name) for name in names}
        else:
            values = {
                name: (0.0 if f.kind == "count" else fill)
                for name, f in zip(names, self.fns, strict=True)
            }
        shift = 0.0
        if not (self.event_time or self.aligned):
            shift = float(self.W_recv[si] - self.W_mono[si])
        start, end = float(start_p[0]) + shift, float(end_p[0]) + shift
        mono = float(end_p[0]) - self.anchor if not self.event_time else float(self.W_mono[si])
        data: dict[str, Any] = {
            "window": self.name,
            "function": names[0],
            "values": values,
            "size": self.size,
            "step": self.step,
            "time": "event" if self.event_time else "processing",
            "start": start,
            "end": end,
            "index": k,
            "count": 0,
            "filled": True,
        }
        if partial[0]:
            data["partial"] = True
        value = values[names[0]]
        return NewEvent(
            kind="aggregate",
            time=end,
            recv_time=end,
            mono=mono,
            sensor=self.series[si],
            value=None if value is None else float(value),
            unit=self.units[si],
            data=data,
        )

    # ------------------------------------------------------------------ clock events

    def _plan_switch(self, mono: float, wall: float) -> None:
        """The wall clock moved against the monotonic one: take the new anchor at the next
        boundary of the current grid, so no window is split or merged."""
        p = mono + self.anchor
        boundary = float((cells(np.array([p]), self.step, self.offset)[0] + 1) * self.step)
        boundary += self.offset
        self.switch = (boundary - self.anchor, wall - mono)

    def _switch(self, out: Output, silent: bool) -> None:
        assert self.switch is not None
        at_mono, anchor = self.switch
        cut = at_mono + self.anchor
        # Hopping windows still open at the boundary end there (partial); tumbling ones end
        # there anyway.
        self._emit(np.arange(len(self.open)), [], cut, out, silent)
        self.samples.clear()
        self.anchor, self.switch = anchor, None
        self.epoch_start = at_mono + anchor
        first = int(cells(np.array([self.epoch_start]), self.step, self.offset)[0])
        self.W[:] = self.epoch_start
        self.W_mono[:] = at_mono
        self.W_recv[:] = self.epoch_start
        self.closed[:] = first - self.n
        self.min_k[:] = first - self.n + 1

    def _restart(self, out: Output, silent: bool) -> None:
        """The monotonic clock restarted (a reboot): what is open ends now, and time starts over."""
        self._emit(np.arange(len(self.open)), [], None, out, silent)
        self.samples.clear()
        self.W[:] = -math.inf
        self.W_mono[:] = -math.inf
        self.W_recv[:] = -math.inf
        self.closed[:] = NEVER
        self.min_k[:] = -NEVER
        self.mono_hw = -math.inf
        self.epoch_start = -math.inf
        self.switch = None
        if self.aligned:
            self.anchor = math.nan

    # ------------------------------------------------------------------ rebuilding

    def mark_emitted(self, sensor: str, index: int) -> None:
        """An aggregate of window `index` for `sensor` is already in the log (found while
        rebuilding without a snapshot): it and every earlier window of the series are closed."""
        si = self._series_index.get(sensor)
        if si is None:
            return
        self.closed[si] = max(int(self.closed[si]), index)
        if len(self.open):
            stale = np.flatnonzero((self.open.s == si) & (self.open.k <= index))
            if len(stale):
                self._emit(stale, [], None, Output(), True)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, Any]:
        """State as plain data."""
        return {
            "fp": self.fp,
            "grid": list(self.grid),
            "series": self.series,
            "W": self.W.tolist(),
            "W_mono": self.W_mono.tolist(),
            "W_recv": self.W_recv.tolist(),
            "closed": self.closed.tolist(),
            "min_k": self.min_k.tolist(),
            "ewma": self.ewma.tolist(),
            "units": self.units,
            "previous": {str(k): v for k, v in self.previous.items()},
            "open": {
                "s": self.open.s.tolist(),
                "k": self.open.k.tolist(),
                **{c: v.tolist() for c, v in self.open.cols.items()},
            },
            "samples": [
                [a, c, kept.seen, kept.stride, kept.values().tolist()]
                for (a, c), kept in self.samples.items()
            ],
            "late": self.late,
            "anchor": self.anchor,
            "switch": self.switch,
            "epoch_start": self.epoch_start,
            "mono_hw": self.mono_hw,
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load what `snapshot` returned (for this same definition: check `fp` first)."""
        self.series = list(state["series"])
        self._series_index = {name: i for i, name in enumerate(self.series)}
        self._series_of = np.empty(0, np.int64)
        self.W = np.array(state["W"], np.float64)
        self.W_mono = np.array(state["W_mono"], np.float64)
        self.W_recv = np.array(state["W_recv"], np.float64)
        self.closed = np.array(state["closed"], np.int64)
        self.min_k = np.array(state["min_k"], np.int64)
        self.ewma = np.array(state["ewma"], np.float64)
        self.units = list(state["units"])
        self.previous = {int(k): v for k, v in state["previous"].items()}
        o = state["open"]
        self.open = _Table(
            np.array(o["s"], np.int64),
            np.array(o["k"], np.int64),
            {c: np.array(o[c], np.int64 if c == "n" else np.float64) for c in _COLUMNS},
        )
        self.samples = {
            (int(a), int(c)): _Samples([np.array(v, np.float64)], len(v), int(seen), int(stride))
            for a, c, seen, stride, v in state["samples"]
        }
        self.late = int(state["late"])
        self.anchor = float(state["anchor"])
        switch = state["switch"]
        self.switch = None if switch is None else (float(switch[0]), float(switch[1]))
        self.epoch_start = float(state["epoch_start"])
        self.mono_hw = float(state["mono_hw"])


# --------------------------------------------------------------------------- rules


@dataclass(slots=True)
class _RuleState:
    """Where one sensor stands with one rule."""

    alert_id: str | None = None
    raised_value: float | None = None
    raised_time: float | None = None
    streak: int = 0
    since: float | None = None
    cooldown_until: float = -math.inf
    ref: float | None = None
    prev_t: float | None = None
    prev_v: float | None = None
    seen_mono: float = -math.inf
    seen_wall: float = -math.inf

    def dump(self) -> list[Any]:
        return [
            self.alert_id,
            self.raised_value,
            self.raised_time,
            self.streak,
            self.since,
            self.cooldown_until,
            self.ref,
            self.prev_t,
            self.prev_v,
            self.seen_mono,
            self.seen_wall,
        ]

    @classmethod
    def load(cls, v: list[Any]) -> _RuleState:
        return cls(*v)


@dataclass(slots=True)
class _Sample:
    """One value a rule looks at: a reading, or an aggregate's chosen function."""

    sensor: str
    t: float  # monotonic (readings, processing-time windows) or event time: for durations
    value: float
    time: float
    recv_time: float
    mono: float
    unit: str | None
    window: dict[str, Any] | None


class Rule:
    """One configured rule over readings or over a window's aggregates, per sensor.

    An alert is a pair of events sharing an alert id, `alert.raised` then `alert.cleared`;
    while raised it is not raised again. Durations (`for`, `cooldown`, `stale`) run on the
    monotonic clock for readings and on the window's own time axis for aggregates.
    """

    def __init__(
        self,
        cfg: RuleConfig,
        table: SensorTable,
        counters: dict[str, int],
        function: str | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.fp = fingerprint(cfg)
        self.table = table
        self.counters = counters
        self.function = cfg.function or function
        self.globs = [cfg.sensors] if isinstance(cfg.sensors, str) else list(cfg.sensors)
        self.states: dict[str, _RuleState] = {}
        self._match = np.empty(0, bool)
        self._matched: dict[str, bool] = {}
        self.kind = next(
            k
            for k in ("above", "below", "outside", "inside", "stale")
            if getattr(cfg, k) is not None
        )
        h = cfg.hysteresis
        # Raise beyond `raise_at`, clear beyond `clear_at` (hysteresis), per kind.
        self.raise_at: tuple[float, float] = (0.0, 0.0)
        self.clear_at: tuple[float, float] = (0.0, 0.0)
        if cfg.above is not None:
            clear = cfg.clear_below if cfg.clear_below is not None else cfg.above - h
            self.raise_at, self.clear_at = (cfg.above, cfg.above), (clear, clear)
        elif cfg.below is not None:
            clear = cfg.clear_above if cfg.clear_above is not None else cfg.below + h
            self.raise_at, self.clear_at = (cfg.below, cfg.below), (clear, clear)
        elif cfg.outside is not None:
            lo, hi = cfg.outside
            self.raise_at, self.clear_at = (lo, hi), (lo + h, hi - h)
        elif cfg.inside is not None:
            lo, hi = cfg.inside
            self.raise_at, self.clear_at = (lo, hi), (lo - h, hi + h)
        # Sensors named without a glob are expected: a stale rule counts from its start.
        self.expected = [g for g in self.globs if not any(ch in g for ch in "*?[")]

    def matches(self, sensor: str) -> bool:
        """Whether this rule watches `sensor` (cached per name)."""
        hit = self._matched.get(sensor)
        if hit is None:
            hit = self._matched[sensor] = any(fnmatch.fnmatchcase(sensor, g) for g in self.globs)
        return hit

    def _raises(self, v: float) -> bool:
        lo, hi = self.raise_at
        kind = self.kind
        if kind == "above":
            return v > hi
        if kind == "below":
            return v < lo
        if kind == "outside":
            return v < lo or v > hi
        return lo <= v <= hi

    def _clears(self, v: float) -> bool:
        lo, hi = self.clear_at
        kind = self.kind
        if kind == "above":
            return v < lo
        if kind == "below":
            return v > hi
        if kind == "outside":
            return lo <= v <= hi
        return v < lo or v > hi

    def _raises_all(self, v: Arr) -> Arr:
        lo, hi = self.raise_at
        kind = self.kind
        if kind == "above":
            return v > hi
        if kind == "below":
            return v < lo
        if kind == "outside":
            return (v < lo) | (v > hi)
        return (lo <= v) & (v <= hi)

    def _clears_all(self, v: Arr) -> Arr:
        lo, hi = self.clear_at
        kind = self.kind
        if kind == "above":
            return v < lo
        if kind == "below":
            return v > hi
        if kind == "outside":
            return (lo <= v) & (v <= hi)
        return (v < lo) | (v > hi)

    def _codes(self, codes: Arr) -> Arr:
        known = len(self._match)
        if known < len(self.table.names):
            more = np.array([self.matches(n) for n in self.table.names[known:]], bool)
            self._match = np.concatenate((self._match, more))
        return self._match[codes]

    # ------------------------------------------------------------------ feeding

    def on_readings(self, b: ReadingBatch) -> list[NewEvent]:
        """Alerts from a batch of readings (rules without a window, and stale rules)."""
        mine = self._codes(b.code)
        idx = np.flatnonzero(mine)
        if not len(idx):
            return []
        if self.kind == "stale":
            return self._seen(b, idx)
        if not (self.cfg.deadband or self.cfg.of == "rate"):
            idx = self._needing_a_look(b, idx)
        out = []
        names, units = self.table.names, b.unit
        columns = zip(
            b.code[idx].tolist(),
            b.mono[idx].tolist(),
            b.value[idx].tolist(),
            b.time[idx].tolist(),
            b.recv[idx].tolist(),
            idx.tolist(),
            strict=True,
        )
        for code, mono, value, t, recv, i in columns:
            alert = self._step(_Sample(names[code], mono, value, t, recv, mono, units[i], None))
            if alert is not None:
                out.append(alert)
        return out

    def _needing_a_look(self, b: ReadingBatch, idx: Arr) -> Arr:
        """The readings that can change something: those of sensors where a raise or clear
        condition holds at least once in the batch, or that have a raise pending."""
        x = b.value[idx]
        codes = b.code[idx]
        present, inv = np.unique(codes, return_inverse=True)
        raising = np.bincount(inv, weights=self._raises_all(x), minlength=len(present)) > 0
        clearing = np.bincount(inv, weights=self._clears_all(x), minlength=len(present)) > 0
        wanted = np.zeros(len(present), bool)
        names = self.table.names
        for i, code in enumerate(present.tolist()):
            st = self.states.get(names[code])
            if st is not None and st.alert_id is not None:
                wanted[i] = clearing[i]
            else:
                wanted[i] = raising[i] or (st is not None and st.streak > 0)
        return idx[wanted[inv]]

    def on_aggregates(self, aggregates: Iterable[NewEvent]) -> list[NewEvent]:
        """Alerts from a window's aggregates (in the order the window closed them)."""
        out = []
        for agg in aggregates:
            data = agg.data or {}
            if data.get("window") != self.cfg.window or agg.sensor is None:
                continue
            if not self.matches(agg.sensor):
                continue
            value = (data.get("values") or {}).get(self.function, agg.value)
            if value is None:
                continue
            t = agg.mono if data.get("time") == "processing" else float(data.get("end", agg.time))
            sample = _Sample(
                agg.sensor, t, float(value), agg.time, agg.recv_time, agg.mono, agg.unit, data
            )
            alert = self._step(sample)
            if alert is not None:
                out.append(alert)
        return out

    def _step(self, x: _Sample) -> NewEvent | None:
        st = self.states.get(x.sensor)
        if st is None:
            st = self.states[x.sensor] = _RuleState()
        v = x.value
        if self.cfg.deadband:
            if st.ref is not None and abs(v - st.ref) < self.cfg.deadband:
                return None
            st.ref = v
        if self.cfg.of == "rate":
            prev_t, prev_v = st.prev_t, st.prev_v
            st.prev_t, st.prev_v = x.t, v
            if prev_t is None or prev_v is None or x.t <= prev_t:
                return None
            v = (v - prev_v) / (x.t - prev_t)
        if st.alert_id is not None:
            if not self._clears(v):
                return None
            alert = self._alert("alert.cleared", st, x, v, reason="condition")
            st.alert_id, st.raised_value, st.raised_time = None, None, None
            st.cooldown_until = x.t + self.cfg.cooldown
            st.streak, st.since = 0, None
            return alert
        if not self._raises(v):
            st.streak, st.since = 0, None
            return None
        st.streak += 1
        if st.since is None:
            st.since = x.t
        if st.streak < self.cfg.samples or x.t - st.since < self.cfg.for_:
            return None
        if x.t < st.cooldown_until:
            return None
        st.alert_id = self._next_id(x.sensor)
        st.raised_value, st.raised_time = v, x.time
        return self._alert("alert.raised", st, x, v)

    def _next_id(self, sensor: str) -> str:
        """`<rule>:<sensor>:<n>`, n counting per rule and sensor: so an alert's id depends on
        that sensor's history only, not on how readings were batched, and never repeats."""
        key = f"{self.name}:{sensor}"
        n = self.counters[key] = self.counters.get(key, 0) + 1
        return f"{key}:{n}"

    # ------------------------------------------------------------------ stale sensors

    def _seen(self, b: ReadingBatch, idx: Arr) -> list[NewEvent]:
        codes = b.code[idx]
        last = np.full(len(self.table.names), -1, np.int64)
        np.maximum.at(last, codes, idx)
        out = []
        names = self.table.names
        for code in np.flatnonzero(last >= 0).tolist():
            i = int(last[code])
            sensor = names[code]
            st = self.states.get(sensor)
            if st is None:
                st = self.states[sensor] = _RuleState()
            st.seen_mono, st.seen_wall = float(b.mono[i]), float(b.recv[i])
            if st.alert_id is not None:
                sample = _Sample(
                    sensor,
                    st.seen_mono,
                    float(b.value[i]),
                    float(b.time[i]),
                    st.seen_wall,
                    st.seen_mono,
                    b.unit[i],
                    None,
                )
                out.append(self._alert("alert.cleared", st, sample, sample.value, reason="reading"))
                st.alert_id, st.raised_value, st.raised_time = None, None, None
                st.cooldown_until = st.seen_mono + self.cfg.cooldown
        return out

    def on_tick(self, now_mono: float, now_wall: float) -> list[NewEvent]:
        """Stale sensors: raise for each watched sensor silent for longer than `stale`."""
        if self.kind != "stale":
            return []
        assert self.cfg.stale is not None
        for sensor in self.expected:
            if sensor not in self.states:
                self.states[sensor] = _RuleState(seen_mono=now_mono, seen_wall=now_wall)
        out = []
        for sensor, st in self.states.items():
            if st.alert_id is not None:
                continue
            age = now_mono - st.seen_mono
            if age < -REBOOT_JUMP:  # seen before a reboot: only the wall clock spans it
                age = now_wall - st.seen_wall
            if age <= self.cfg.stale or now_mono < st.cooldown_until:
                continue
            st.alert_id = self._next_id(sensor)
            st.raised_value, st.raised_time = age, now_wall
            sample = _Sample(sensor, now_mono, age, now_wall, now_wall, now_mono, "s", None)
            alert = self._alert("alert.raised", st, sample, age)
            assert alert.data is not None
            alert.data["last_seen"] = st.seen_wall if st.seen_wall > -math.inf else None
            out.append(alert)
        return out

    # ------------------------------------------------------------------ events

    def condition(self) -> dict[str, Any]:
        """The rule's condition as configured, carried in each alert."""
        cfg = self.cfg
        keys = ("above", "clear_below", "below", "clear_above", "outside", "inside", "stale")
        out: dict[str, Any] = {k: getattr(cfg, k) for k in keys if getattr(cfg, k) is not None}
        if self.kind == "above" and cfg.clear_below is None:
            out["clear_below"] = self.clear_at[0] if cfg.hysteresis else None
        if self.kind == "below" and cfg.clear_above is None and cfg.hysteresis:
            out["clear_above"] = self.clear_at[1]
        if isinstance(out.get("outside"), tuple) or isinstance(out.get("inside"), tuple):
            out = {k: list(v) if isinstance(v, tuple) else v for k, v in out.items()}
        if cfg.of != "value":
            out["of"] = cfg.of
        if cfg.hysteresis:
            out["hysteresis"] = cfg.hysteresis
        return out

    def _alert(
        self, kind: str, st: _RuleState, x: _Sample, value: float, reason: str | None = None
    ) -> NewEvent:
        assert st.alert_id is not None
        data: dict[str, Any] = {
            "alert_id": st.alert_id,
            "rule": self.name,
            "severity": self.cfg.severity,
            **self.condition(),
            "window": x.window,
        }
        if self.function is not None and x.window is not None:
            data["function"] = self.function
        if kind == "alert.cleared":
            data["reason"] = reason
            data["raised_value"] = st.raised_value
            data["raised_time"] = st.raised_time
        return NewEvent(
            kind=kind,
            time=x.time,
            recv_time=x.recv_time,
            mono=x.mono,
            sensor=x.sensor,
            value=value,
            unit=x.unit,
            data=data,
        )

    def clear_all(
        self, reason: str, now_mono: float, now_wall: float, severity: str | None = None
    ) -> list[NewEvent]:
        """Clear every raised alert (its rule changed or went away), so each has its pair."""
        out = []
        for sensor, st in self.states.items():
            if st.alert_id is None:
                continue
            out.append(
                NewEvent(
                    kind="alert.cleared",
                    time=now_wall,
                    recv_time=now_wall,
                    mono=now_mono,
                    sensor=sensor,
                    value=None,
                    data={
                        "alert_id": st.alert_id,
                        "rule": self.name,
                        "severity": severity or self.cfg.severity,
                        "reason": reason,
                        "raised_value": st.raised_value,
                        "raised_time": st.raised_time,
                    },
                )
            )
            st.alert_id = None
        return out

    def adopt(self, sensor: str, alert_id: str, value: float | None, time: float | None) -> None:
        """Know an alert as raised (rebuilt from the `alerts` stream)."""
        st = self.states.get(sensor)
        if st is None:
            st = self.states[sensor] = _RuleState()
        st.alert_id, st.raised_value, st.raised_time = alert_id, value, time

    def snapshot(self) -> dict[str, Any]:
        """State as plain data."""
        return {
            "fp": self.fp,
            "severity": self.cfg.severity,
            "states": {s: st.dump() for s, st in self.states.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load what `snapshot` returned."""
        self.states = {s: _RuleState.load(v) for s, v in state["states"].items()}


# --------------------------------------------------------------------------- pipeline


@dataclass(slots=True)
class Restored:
    """What `Pipeline.restore` could not take from the snapshot, and must be rebuilt."""

    # Windows to rebuild by replaying readings, each with whether the aggregates already in
    # the log are on its grid (same size, step, offset and time axis): those are not repeated.
    windows: dict[str, bool] = field(default_factory=dict)
    rules_from_log: bool = False  # raised alerts to rebuild from the `alerts` stream
    cleared: list[NewEvent] = field(default_factory=list)  # alerts of changed/removed rules


class Pipeline:
    """Every configured window and rule, fed together: readings in; aggregates, alerts and
    late readings out."""

    def __init__(
        self, cfg: ProcessingConfig, *, grace: float = 2.0, table: SensorTable | None = None
    ) -> None:
        self.cfg = cfg
        self.grace = grace
        self.table = table or SensorTable()
        self.counters: dict[str, int] = {}
        self.windows: dict[str, Window] = {
            w.name: Window(w, self.table, grace=grace) for w in cfg.windows
        }
        self.rules: dict[str, Rule] = {r.name: self._rule(r) for r in cfg.rules}

    def _rule(self, cfg: RuleConfig) -> Rule:
        window = self.windows.get(cfg.window) if cfg.window else None
        primary = window.cfg.all_functions[0] if window else None
        return Rule(cfg, self.table, self.counters, primary)

    @property
    def late(self) -> int:
        """Readings that came after every window they belong to had closed."""
        return sum(w.late for w in self.windows.values())

    def batch(self, readings: Sequence[Event] | ReadingBatch) -> ReadingBatch:
        """Readings as the columns windows and rules take."""
        if isinstance(readings, ReadingBatch):
            return readings
        return ReadingBatch.from_events(readings, self.table)

    def feed(self, readings: Sequence[Event] | ReadingBatch) -> Output:
        """Aggregates, alerts and late readings caused by a batch of readings."""
        b = self.batch(readings)
        out = Output()
        if not len(b):
            return out
        for w in self.windows.values():
            out.extend(w.feed(b))
        for rule in self.rules.values():
            if rule.cfg.window is None:
                out.alerts.extend(rule.on_readings(b))
        out.alerts.extend(self._rules_on(out.aggregates))
        return out

    def tick(self, now_mono: float, now_wall: float) -> Output:
        """Aggregates of windows whose time is up, and their alerts; stale sensors."""
        out = Output()
        for w in self.windows.values():
            out.extend(w.tick(now_mono, now_wall))
        out.alerts.extend(self._rules_on(out.aggregates))
        for rule in self.rules.values():
            out.alerts.extend(rule.on_tick(now_mono, now_wall))
        return out

    def next_due(self, now_mono: float) -> float:
        """Monotonic time at which `tick` may next close a window."""
        return min((w.next_close(now_mono) for w in self.windows.values()), default=math.inf)

    def _rules_on(self, aggregates: list[NewEvent]) -> list[NewEvent]:
        if not aggregates:
            return []
        return [
            alert
            for rule in self.rules.values()
            if rule.cfg.window is not None
            for alert in rule.on_aggregates(aggregates)
        ]

    def rebuild(self, names: Iterable[str], readings: Sequence[Event] | ReadingBatch) -> None:
        """Feed readings already processed to the named windows only, emitting nothing: their
        state is rebuilt by replay (a new or changed window, or a lost snapshot)."""
        b = self.batch(readings)
        for name in names:
            self.windows[name].feed(b, silent=True)

    # ------------------------------------------------------------------ state

    def snapshot(self) -> dict[str, Any]:
        """The whole processing state, for the processor to commit with its cursor."""
        return {
            "v": STATE_VERSION,
            "windows": {name: w.snapshot() for name, w in self.windows.items()},
            "rules": {name: r.snapshot() for name, r in self.rules.items()},
            "counters": self.counters,
        }

    def restore(
        self, state: dict[str, Any] | None, now_mono: float = 0.0, now_wall: float = 0.0
    ) -> Restored:
        """Load a snapshot. Windows and rules whose definition changed start afresh (a changed
        rule's raised alerts are cleared); a snapshot of another version restores nothing."""
        result = Restored()
        if not isinstance(state, dict) or state.get("v") != STATE_VERSION:
            result.windows = dict.fromkeys(self.windows, True)
            result.rules_from_log = True
            return result
        self.counters.update({str(k): int(v) for k, v in state.get("counters", {}).items()})
        saved = state.get("windows", {})
        for name, w in self.windows.items():
            st = saved.get(name)
            if st is not None and st.get("fp") == w.fp:
                w.restore(st)
            else:
                result.windows[name] = st is not None and st.get("grid") == list(w.grid)
        saved_rules = state.get("rules", {})
        for name, st in saved_rules.items():
            rule = self.rules.get(name)
            if rule is not None and st.get("fp") == rule.fp:
                rule.restore(st)
                continue
            # The rule changed or went away: what it raised is cleared, then it starts afresh.
            old = Rule(_DUMMY, self.table, self.counters)
            old.name = name
            old.restore(st)
            reason = "rule_changed" if rule is not None else "rule_removed"
            severity = st.get("severity")
            result.cleared.extend(old.clear_all(reason, now_mono, now_wall, severity))
        return result

    def adopt_alerts(
        self, events: Iterable[Event], now_mono: float, now_wall: float
    ) -> list[NewEvent]:
        """Rebuild which alerts are raised, and the alert counters, from the `alerts` stream
        (when there is no usable snapshot). Alerts of rules no longer configured are cleared."""
        open_alerts: dict[str, Event] = {}
        for e in events:
            data = e.data or {}
            alert_id = str(data.get("alert_id", ""))
            key, _, tail = alert_id.rpartition(":")
            if tail.isdigit():
                self.counters[key] = max(self.counters.get(key, 0), int(tail))
            if e.kind == "alert.raised":
                open_alerts[alert_id] = e
            elif e.kind == "alert.cleared":
                open_alerts.pop(alert_id, None)
        cleared: list[NewEvent] = []
        for alert_id, e in open_alerts.items():
            data = e.data or {}
            name, sensor = str(data.get("rule", "")), e.sensor or ""
            rule = self.rules.get(name)
            if rule is not None:
                rule.adopt(sensor, alert_id, e.value, e.time)
                continue
            orphan = Rule(_DUMMY, self.table, self.counters)
            orphan.name = name
            orphan.adopt(sensor, alert_id, e.value, e.time)
            severity = data.get("severity")
            cleared.extend(orphan.clear_all("rule_removed", now_mono, now_wall, severity))
        return cleared

    def reconfigure(
        self, cfg: ProcessingConfig, now_mono: float, now_wall: float
    ) -> tuple[dict[str, bool], list[NewEvent]]:
        """Switch to a new configuration, keeping the state of unchanged windows and rules.

        Returns the windows to rebuild by replay (new or changed; True for those whose grid did
        not change, so the aggregates already in the log are not repeated) and the alerts cleared
        because their rule changed or went away.
        """
        old_windows, old_rules = self.windows, self.rules
        self.cfg = cfg
        self.windows = {}
        rebuild: dict[str, bool] = {}
        for wc in cfg.windows:
            kept = old_windows.get(wc.name)
            if kept is not None and kept.fp == fingerprint(wc):
                self.windows[wc.name] = kept
            else:
                fresh = self.windows[wc.name] = Window(wc, self.table, grace=self.grace)
                rebuild[wc.name] = kept is not None and kept.grid == fresh.grid
        self.rules = {}
        cleared: list[NewEvent] = []
        for rc in cfg.rules:
            kept_rule = old_rules.get(rc.name)
            if kept_rule is not None and kept_rule.fp == fingerprint(rc):
                self.rules[rc.name] = kept_rule
            else:
                if kept_rule is not None:
                    cleared.extend(kept_rule.clear_all("rule_changed", now_mono, now_wall))
                self.rules[rc.name] = self._rule(rc)
        for name, gone in old_rules.items():
            if name not in self.rules:
                cleared.extend(gone.clear_all("rule_removed", now_mono, now_wall))
        return rebuild, cleared


#: A stand-in definition for rules that are no longer configured, to clear their alerts.
_DUMMY = RuleConfig.model_validate({"name": "-", "above": 0})
