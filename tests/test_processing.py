"""Processing is pure: windows and rules are functions of (state, batch), tested with no I/O.

The numpy windows are checked against `RefWindow`, a plain-Python implementation of the same
definition that takes one reading at a time: on random readings, batchings and ticks
(hypothesis) both emit the same windows; count, min, max, first, last, rate and the EWMA to the
last bit, the others within 1e-9 of the magnitude of the values they summarise.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agent.config import ProcessingConfig, RuleConfig, WindowConfig
from agent.events import Event, NewEvent
from agent.processing import REBOOT_JUMP, Pipeline, Rule, SensorTable, Window

T0 = 1_700_000_000.0


def ev(seq: int, sensor: str, value: float, mono: float, t: float | None = None) -> Event:
    wall = T0 + mono if t is None else t
    return Event("readings", seq, "reading", wall, wall, mono, sensor, value, "C")


def window(grace: float = 0.0, **cfg: Any) -> Window:
    cfg.setdefault("name", "w")
    cfg.setdefault("size", 10.0)
    return Window(WindowConfig.model_validate(cfg), SensorTable(), grace=grace)


def feed(w: Window, events: list[Event]) -> list[NewEvent]:
    from agent.processing import ReadingBatch

    out = w.feed(ReadingBatch.from_events(events, w.table))
    return out.aggregates


# --------------------------------------------------------------------------- plain Python


def ref_cell(p: float, step: float, off: float) -> int:
    j = math.floor((p - off) / step)
    if j * step + off > p:
        j -= 1
    if (j + 1) * step + off <= p:
        j += 1
    return j


def ref_percentile(values: list[float], q: float) -> float:
    xs = sorted(values)
    h = (len(xs) - 1) * q / 100
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (h - lo)


@dataclass
class RefSeries:
    W: float = -math.inf
    W_mono: float = -math.inf
    W_recv: float = -math.inf
    closed: int | None = None
    ewma: float | None = None
    open: dict[int, list[tuple[float, float, float, float]]] = field(default_factory=dict)


class RefWindow:
    """The window definition, one reading at a time, in plain Python (tests only)."""

    def __init__(self, cfg: WindowConfig, grace: float) -> None:
        self.cfg = cfg
        self.step = cfg.hop
        self.n = round(cfg.size / cfg.hop)
        self.event = cfg.time == "event"
        self.lateness = cfg.lateness if self.event else grace
        self.delay = grace if self.event else 0.0
        self.off = cfg.offset if self.event else 0.0
        self.series: dict[str, RefSeries] = {}
        self.late: list[int] = []
        self.out: dict[tuple[str, int], dict[str, Any]] = {}

    def closable(self, W: float, lateness: float) -> int | None:
        if math.isinf(W):
            return None
        return ref_cell(W - lateness, self.step, self.off) - self.n

    def feed(self, e: Event) -> None:
        assert e.sensor is not None and e.value is not None
        globs = [self.cfg.sensors] if isinstance(self.cfg.sensors, str) else self.cfg.sensors
        import fnmatch

        if not any(fnmatch.fnmatchcase(e.sensor, g) for g in globs):
            return
        name = self.cfg.group or e.sensor
        s = self.series.setdefault(name, RefSeries())
        p = e.time if self.event else e.mono
        if p > s.W:
            s.W, s.W_mono, s.W_recv = p, e.mono, e.recv_time
        kc = self.closable(s.W, self.lateness)
        closed = (
            max(x for x in (s.closed, kc) if x is not None)
            if (s.closed, kc) != (None, None)
            else None
        )
        j = ref_cell(p, self.step, self.off)
        ks = [k for k in range(j - self.n + 1, j + 1) if closed is None or k > closed]
        if not ks:
            self.late.append(e.seq)
        else:
            alpha = self.cfg.ewma_alpha
            s.ewma = e.value if s.ewma is None else s.ewma + alpha * (e.value - s.ewma)
            for k in ks:
                s.open.setdefault(k, []).append((p, e.value, e.time, s.ewma))
        self.close(name, s, kc)

    def tick(self, now_mono: float, now_wall: float) -> None:
        for name, s in self.series.items():
            elapsed = now_mono - s.W_mono
            if elapsed < -REBOOT_JUMP:
                elapsed = now_wall - s.W_recv
            self.close(name, s, self.closable(s.W + max(elapsed, 0.0), self.lateness + self.delay))

    def close(self, name: str, s: RefSeries, kc: int | None) -> None:
        if kc is None or (s.closed is not None and kc <= s.closed):
            return
        s.closed = kc
        for k in sorted(k for k in s.open if k <= kc):
            self.out[(name, k)] = self.summarise(s.open.pop(k))

    def summarise(self, rows: list[tuple[float, float, float, float]]) -> dict[str, Any]:
        xs = [x for _, x, _, _ in rows]
        n = len(xs)
        mean = math.fsum(xs) / n
        first = min(range(n), key=lambda i: (rows[i][0], i))
        last = max(range(n), key=lambda i: (rows[i][0], i))
        dt = rows[last][0] - rows[first][0]
        values: dict[str, Any] = {
            "count": float(n),
            "sum": math.fsum(xs),
            "mean": mean,
            "min": min(xs),
            "max": max(xs),
            "std": math.sqrt(math.fsum((x - mean) ** 2 for x in xs) / n),
            "median": ref_percentile(xs, 50),
            "p95": ref_percentile(xs, 95),
            "first": xs[first],
            "last": xs[last],
            "rate": (xs[last] - xs[first]) / dt if dt > 0 else None,
            "ewma": rows[-1][3],
        }
        return {"values": values, "scale": max(abs(x) for x in xs), "abs": math.fsum(map(abs, xs))}


FUNCTIONS = ["mean", "min", "max", "sum", "count", "std", "median", "p95"]
FUNCTIONS += ["first", "last", "rate", "ewma"]
EXACT = {"count", "min", "max", "first", "last", "rate", "ewma"}


def check_against_reference(
    cfg: WindowConfig, grace: float, events: list[Event], plan: list[tuple[int, float]]
) -> None:
    """Feed `events` in the batches of `plan` (size, then a tick that far past the last
    reading's clock) to both implementations and compare everything they emit."""
    w = Window(cfg, SensorTable(), grace=grace)
    ref = RefWindow(cfg, grace)
    got: list[NewEvent] = []
    late: list[int] = []
    at = 0
    for size, tick_after in [*plan, (len(events), 1e4)]:
        chunk = events[at : at + size]
        at += len(chunk)
        if chunk:
            from agent.processing import ReadingBatch

            out = w.feed(ReadingBatch.from_events(chunk, w.table))
            got += out.aggregates
            late += [d.data["seq"] for d in out.deadletter if d.data]
            for e in chunk:
                ref.feed(e)
        if tick_after >= 0 and at:
            last = events[at - 1]
            now_mono, now_wall = last.mono + tick_after, last.recv_time + tick_after
            got += w.tick(now_mono, now_wall).aggregates
            ref.tick(now_mono, now_wall)
    assert late == ref.late
    assert w.late == len(ref.late)
    by_key = {}
    for agg in got:
        assert agg.data is not None and agg.sensor is not None
        key = (agg.sensor, agg.data["index"])
        assert key not in by_key, f"window {key} emitted twice"
        by_key[key] = agg
    assert set(by_key) == set(ref.out)
    for key, agg in by_key.items():
        assert agg.data is not None
        want = ref.out[key]
        assert agg.data["count"] == want["values"]["count"]
        for name, value in agg.data["values"].items():
            expected = want["values"][name]
            if name in EXACT or expected is None:
                assert value == expected, (key, name, value, expected)
            else:
                scale = want["abs"] if name == "sum" else max(abs(expected), want["scale"])
                # Relative, with a floor of two ulps of 0.0: among subnormals a relative
                # tolerance is less than one ulp (a median of [-5e-324, 5e-324] came out as
                # 5e-324 one way and 0.0 the other).
                tolerance = 1e-9 * scale + 2 * math.ulp(0.0)
                assert abs(value - expected) <= tolerance, (key, name, value, expected)


readings = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        st.one_of(st.floats(-1e6, 1e6, allow_nan=False), st.sampled_from([0.0, 1.0, -2.5])),
        st.floats(0, 0.7),  # monotonic step
        st.floats(-3, 1),  # event-time jitter (out of order)
    ),
    min_size=1,
    max_size=200,
)


def make_events(rows: list[tuple[str, float, float, float]], back: float = 0.0) -> list[Event]:
    events, mono = [], 100.0
    for i, (sensor, value, step, jitter) in enumerate(rows):
        mono += step
        # Processing time: an occasional reading from another input arrives a little behind.
        arrival = mono - back if (back and i % 7 == 3) else mono
        events.append(ev(i + 1, sensor, value, arrival, t=T0 + mono + jitter))
    return events


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rows=readings,
    event_time=st.booleans(),
    step=st.sampled_from([0.3, 0.5, 1.0]),
    n=st.integers(1, 3),
    lateness=st.sampled_from([0.0, 0.5, 2.0]),
    grace=st.sampled_from([0.0, 1.0]),
    group=st.booleans(),
    plan=st.lists(st.tuples(st.integers(1, 60), st.sampled_from([-1.0, -1.0, 0.0, 0.4, 5.0]))),
)
@example(  # a median half way between 0.0 and the smallest subnormal rounds either way
    rows=[("a", 0.0, 0.0, 0.0), ("a", 5e-324, 0.0, 0.0)],
    event_time=False,
    step=0.3,
    n=1,
    lateness=0.0,
    grace=0.0,
    group=False,
    plan=[],
)
def test_numpy_windows_agree_with_plain_python(
    rows: list[tuple[str, float, float, float]],
    event_time: bool,
    step: float,
    n: int,
    lateness: float,
    grace: float,
    group: bool,
    plan: list[tuple[int, float]],
) -> None:
    cfg = WindowConfig.model_validate(
        {
            "name": "w",
            "sensors": ["a", "b*"] if not group else "*",
            "group": "all" if group else None,
            "size": step * n,
            "step": step,
            "functions": FUNCTIONS,
            "time": "event" if event_time else "processing",
            "lateness": lateness if event_time else 0.0,
            "offset": 0.25 if event_time else 0.0,
            "ewma_alpha": 0.3,
        }
    )
    check_against_reference(cfg, grace, make_events(rows, back=0.0 if event_time else 1.5), plan)


# --------------------------------------------------------------------------- windows


def test_tumbling_mean_closes_when_the_watermark_passes_its_end() -> None:
    w = window()
    assert feed(w, [ev(1, "a", 1.0, 1.0), ev(2, "a", 3.0, 9.9)]) == []
    (agg,) = feed(w, [ev(3, "a", 100.0, 10.0)])
    assert agg.kind == "aggregate" and agg.sensor == "a" and agg.value == 2.0
    assert agg.data is not None and agg.data["count"] == 2 and agg.data["window"] == "w"
    assert agg.mono == 10.0 and agg.data["function"] == "mean"


def test_processing_time_waits_the_grace_for_readings_in_flight() -> None:
    w = window(grace=2.0)
    feed(w, [ev(1, "a", 1.0, 9.0)])
    assert feed(w, [ev(2, "a", 1.0, 11.0)]) == []  # another input's reading may still come
    feed(w, [ev(3, "a", 3.0, 9.5)])  # ... and it does: still counted
    (agg,) = feed(w, [ev(4, "a", 5.0, 12.0)])
    assert agg.data is not None and agg.data["count"] == 2 and agg.value == 2.0


def test_windows_run_on_monotonic_time_not_wall_time() -> None:
    """A wall-clock step (NTP at boot) must neither split nor merge a window."""
    w = window()
    feed(w, [ev(1, "a", 1.0, 1.0, t=0.0)])  # wall time 1970: no RTC, before NTP
    assert feed(w, [ev(2, "a", 3.0, 2.0, t=T0)]) == []  # clock stepped
    (agg,) = w.tick(now_mono=10.0, now_wall=T0 + 8).aggregates
    assert agg.value == 2.0 and agg.data is not None and agg.data["count"] == 2


def test_tick_closes_windows_without_new_readings() -> None:
    w = window(grace=1.0)
    feed(w, [ev(1, "a", 5.0, 3.0), ev(2, "b", 7.0, 4.0)])
    assert w.tick(now_mono=10.5, now_wall=0).aggregates == []
    out = w.tick(now_mono=11.0, now_wall=0).aggregates
    assert sorted((a.sensor, a.value) for a in out) == [("a", 5.0), ("b", 7.0)]
    assert w.tick(now_mono=100.0, now_wall=0).aggregates == []  # empty windows emit nothing


def test_hopping_windows_overlap() -> None:
    w = window(size=10, step=5, function="count")
    out = feed(w, [ev(i, "a", 1.0, float(i)) for i in range(1, 20)])
    out += w.tick(now_mono=100, now_wall=0).aggregates
    got = [(a.data["start"] - T0, a.data["count"]) for a in out if a.data]
    # Windows [-5,5) [0,10) [5,15) [10,20) [15,25): every reading is in two of them.
    assert [round(s) for s, _ in got] == [-5, 0, 5, 10, 15]
    assert [c for _, c in got] == [4, 9, 10, 10, 5]


def test_group_window_is_one_series_over_many_sensors() -> None:
    w = window(sensors=["room*", "hall"], group="house", functions=["max", "count"])
    feed(w, [ev(1, "room1", 20.0, 1), ev(2, "room2", 25.0, 2), ev(3, "hall", 19.0, 3)])
    feed(w, [ev(4, "garage", 99.0, 4)])
    (agg,) = w.tick(now_mono=20, now_wall=0).aggregates
    assert agg.sensor == "house" and agg.value == 25.0
    assert agg.data is not None and agg.data["values"] == {"max": 25.0, "count": 3.0}


def test_event_time_late_readings_go_to_deadletter_with_the_reason() -> None:
    w = window(time="event", lateness=5.0)
    assert feed(w, [ev(1, "a", 1.0, 1.0, t=T0 + 5), ev(2, "a", 2.0, 2.0, t=T0 + 13)]) == []
    from agent.processing import ReadingBatch

    def one(seq: int, value: float, t: float) -> Any:
        return w.feed(
            ReadingBatch.from_events([ev(seq, "a", value, float(seq), t=T0 + t)], w.table)
        )

    out = one(3, 3.0, 9)  # 4 s behind the newest: within the allowed lateness
    assert out.deadletter == [] and out.aggregates == []
    (agg,) = one(4, 0.0, 21).aggregates  # the watermark passes 10 + 5: [0, 10) closes
    assert agg.data is not None and agg.data["count"] == 2 and agg.value == 2.0
    assert agg.data["start"] == T0 and agg.data["end"] == T0 + 10 and agg.time == T0 + 10
    (dead,) = one(5, 7.0, 8).deadletter  # for [0, 10), closed: late
    assert dead.kind == "deadletter" and dead.data is not None
    assert dead.data["reason"] == "late" and dead.data["seq"] == 5
    assert dead.data["source"] == "window:w" and "lateness 5s" in dead.data["detail"]
    assert dead.raw is not None and json.loads(dead.raw)["value"] == 7.0
    assert w.late == 1


def test_event_time_windows_align_on_the_clock_with_an_offset() -> None:
    w = window(time="event", size=300, offset=60, function="count")
    feed(w, [ev(1, "a", 1.0, 1.0, t=1_700_000_123.0)])
    (agg,) = w.tick(now_mono=1000, now_wall=0).aggregates
    assert agg.data is not None
    assert agg.data["start"] % 300 == 60 and agg.data["end"] - agg.data["start"] == 300


def test_aligned_processing_time_and_a_clock_step() -> None:
    """Boundaries on the wall clock ("every 10s on the 10"). When the clock is stepped, the
    open window still ends when it should (on the monotonic clock), and the new alignment is
    taken at that boundary: the windows after it are on the 10 of the new wall clock."""
    w = window(size=10, align=True, function="count")
    anchor = T0 + 3.0  # wall = mono + anchor
    out = feed(w, [ev(i, "a", 1.0, m, t=m + anchor) for i, m in enumerate([1.0, 4.0, 6.5], 1)])
    # NTP steps the wall clock 2.5 s forward at mono 7 (wall 10 on the old clock).
    new = anchor + 2.5
    out += feed(w, [ev(i, "a", 1.0, m, t=m + new) for i, m in enumerate([7.0, 8.0, 12.0], 4)])
    out += feed(w, [ev(i, "a", 1.0, m, t=m + new) for i, m in enumerate([18.0, 25.0], 7)])
    out += w.tick(now_mono=45.0, now_wall=45.0 + new).aggregates
    spans = [(a.data["start"] - T0, a.data["end"] - T0, a.data["count"]) for a in out if a.data]
    assert spans == [(0.0, 10.0, 3), (10.0, 20.0, 3), (22.5, 30.0, 1), (30.0, 40.0, 1)]
    # [10, 20) on the old clock took the readings at mono 7, 8 and 12: not split by the step.
    # The first window on the new clock began at the switch (mono 17, wall 22.5): partial.
    assert [bool(a.data and a.data.get("partial")) for a in out] == [False, False, True, False]


def test_a_reboot_closes_open_processing_time_windows() -> None:
    w = window(function="count")
    feed(w, [ev(1, "a", 1.0, 5000.0)])
    (agg,) = feed(w, [ev(2, "a", 1.0, 3.0)])  # the monotonic clock restarted
    assert agg.data is not None and agg.data["count"] == 1
    (agg,) = w.tick(now_mono=20.0, now_wall=0).aggregates
    assert agg.data is not None and agg.data["count"] == 1 and agg.data["index"] == 0


def test_empty_windows_can_be_filled() -> None:
    w = window(size=1, functions=["mean", "count"], fill=0.0)
    out = feed(w, [ev(1, "a", 4.0, 0.5), ev(2, "a", 6.0, 3.5)])
    out += w.tick(now_mono=5, now_wall=0).aggregates
    got = [(a.data["index"], a.value, a.data["count"], a.data.get("filled")) for a in out if a.data]
    assert got == [
        (0, 4.0, 1, None),
        (1, 0.0, 0, True),
        (2, 0.0, 0, True),
        (3, 6.0, 1, None),
        (4, 0.0, 0, True),  # [4, 5) is over at 5, and empty
    ]
    w = window(size=1, functions=["mean"], fill="previous")
    out = feed(w, [ev(1, "a", 4.0, 0.5), ev(2, "a", 6.0, 2.5)])
    out += w.tick(now_mono=5, now_wall=0).aggregates
    assert [a.value for a in out] == [4.0, 4.0, 6.0, 6.0, 6.0]


def test_percentiles_keep_a_bounded_sample() -> None:
    w = window(functions=["p50", "p99", "count"], max_samples=100)
    feed(w, [ev(i, "a", float(i), 1.0 + i / 10000) for i in range(1, 1001)])
    (agg,) = w.tick(now_mono=20, now_wall=0).aggregates
    assert agg.data is not None and agg.data["approximate"] is True
    assert agg.data["count"] == 1000 and abs(agg.value - 500) < 10  # type: ignore[operator]
    assert len(w.samples) == 0


def test_window_snapshot_restore_continues_exactly() -> None:
    events = make_events([("a", float(i % 7), 0.3, 0.0) for i in range(60)])
    cfg = WindowConfig.model_validate(
        {"name": "w", "size": 2, "step": 1, "functions": FUNCTIONS, "time": "event"}
    )
    whole = Window(cfg, SensorTable())
    from agent.processing import ReadingBatch

    expected = whole.feed(ReadingBatch.from_events(events, whole.table)).aggregates
    expected += whole.tick(1e9, 1e9).aggregates
    a = Window(cfg, SensorTable())
    got = a.feed(ReadingBatch.from_events(events[:25], a.table)).aggregates
    b = Window(cfg, SensorTable())
    b.restore(json.loads(json.dumps(a.snapshot())))
    got += b.feed(ReadingBatch.from_events(events[25:], b.table)).aggregates
    got += b.tick(1e9, 1e9).aggregates
    assert [(g.sensor, g.data) for g in got] == [(e.sensor, e.data) for e in expected]


# --------------------------------------------------------------------------- rules


def agg(value: float, sensor: str = "t1", window_name: str = "w", t: float = 1.0) -> NewEvent:
    data = {"window": window_name, "time": "processing", "values": {"mean": value}}
    return NewEvent("aggregate", t, t, t, sensor, value, "C", data)


def rule(**cfg: Any) -> Rule:
    cfg.setdefault("name", "hot")
    return Rule(RuleConfig.model_validate(cfg), SensorTable(), {}, "mean")


def kinds(alerts: list[NewEvent]) -> list[str]:
    return [a.kind.removeprefix("alert.") for a in alerts]


def test_threshold_rule_hysteresis_pairs_raised_and_cleared() -> None:
    r = rule(window="w", above=30, clear_below=28)
    out = r.on_aggregates([agg(25), agg(31), agg(32), agg(29), agg(27.5), agg(31)])
    assert kinds(out) == ["raised", "cleared", "raised"]
    ids = [a.data["alert_id"] for a in out if a.data]
    assert ids[0] == ids[1] and ids[2] != ids[0]
    assert out[0].value == 31 and out[1].value == 27.5
    assert out[0].data is not None and out[0].data["severity"] == "warning"
    assert out[1].data is not None and out[1].data["raised_value"] == 31


def test_rule_ignores_other_windows_and_sensors() -> None:
    r = rule(window="w", sensors="temp*", above=30)
    assert r.on_aggregates([agg(99, window_name="other"), agg(99, sensor="hum1")]) == []


@pytest.mark.parametrize(
    ("cfg", "values", "expected"),
    [
        ({"below": 5, "clear_above": 7}, [6, 4, 6, 8, 3], ["raised", "cleared", "raised"]),
        (
            {"outside": [10, 20], "hysteresis": 1},
            [15, 21, 20.5, 19, 9],
            ["raised", "cleared", "raised"],
        ),
        ({"inside": [10, 20]}, [5, 15, 19, 25, 12], ["raised", "cleared", "raised"]),
        ({"above": 30, "samples": 3}, [31, 32, 29, 31, 31, 31, 25], ["raised", "cleared"]),
        ({"above": 30, "deadband": 2}, [31, 29.5, 28, 31], ["raised", "cleared", "raised"]),
    ],
)
def test_conditions(cfg: dict[str, Any], values: list[float], expected: list[str]) -> None:
    r = rule(window="w", **cfg)
    out = r.on_aggregates([agg(v, t=float(i)) for i, v in enumerate(values)])
    assert kinds(out) == expected


def test_deadband_ignores_small_changes() -> None:
    r = rule(window="w", above=30, deadband=2)
    # 31 raises; 29.5 is within 2 of 31: ignored, the alert stays; 28 clears.
    out = r.on_aggregates([agg(31, t=0), agg(29.5, t=1), agg(28, t=2)])
    assert kinds(out) == ["raised", "cleared"] and out[1].value == 28


def test_for_duration_and_cooldown() -> None:
    r = rule(window="w", above=30, **{"for": "2m", "cooldown": "10m"})
    out = r.on_aggregates([agg(31, t=0), agg(31, t=60), agg(31, t=119)])
    assert out == []
    out = r.on_aggregates([agg(31, t=120)])
    assert kinds(out) == ["raised"]
    out = r.on_aggregates([agg(20, t=130), agg(40, t=200), agg(40, t=400), agg(40, t=729)])
    assert kinds(out) == ["cleared"]  # cooling down until 730
    assert kinds(r.on_aggregates([agg(40, t=731)])) == ["raised"]


def test_rate_of_change_rule() -> None:
    r = rule(window="w", of="rate", above=0.5)
    out = r.on_aggregates([agg(20, t=0), agg(21, t=10), agg(31, t=20), agg(31, t=30)])
    assert kinds(out) == ["raised", "cleared"]
    assert out[0].value == 1.0


def test_rules_on_readings_and_a_window_function() -> None:
    cfg = ProcessingConfig.model_validate(
        {
            "windows": [{"name": "w", "size": 10, "functions": ["mean", "max"]}],
            "rules": [
                {"name": "spike", "window": "w", "function": "max", "above": 50},
                {"name": "raw", "sensors": ["t1"], "above": 40, "samples": 2},
            ],
        }
    )
    p = Pipeline(cfg, grace=0)
    out = p.feed([ev(1, "t1", 20, 1), ev(2, "t1", 45, 2), ev(3, "t2", 99, 3), ev(4, "t1", 45, 4)])
    assert [(a.kind, a.data["rule"], a.sensor) for a in out.alerts if a.data] == [
        ("alert.raised", "raw", "t1")
    ]
    out = p.tick(30, T0 + 30)
    got = sorted((a.data["rule"], a.sensor, a.value) for a in out.alerts if a.data)
    assert got == [("spike", "t2", 99.0)]
    assert out.alerts[0].data is not None and out.alerts[0].data["window"]["values"]["max"] == 99


def test_stale_sensor_raises_after_silence_and_clears_on_a_reading() -> None:
    cfg = ProcessingConfig.model_validate(
        {"rules": [{"name": "quiet", "sensors": ["door", "pump*"], "stale": "30s"}]}
    )
    p = Pipeline(cfg)
    assert p.tick(100, T0 + 100).alerts == []  # the rule starts watching
    p.feed([ev(1, "pump1", 1.0, 100.0)])
    assert p.tick(110, T0 + 110).alerts == []
    out = p.tick(135, T0 + 135)
    # "door" was never heard from since the rule started (expected by name); pump1 for 35s.
    assert sorted(a.sensor for a in out.alerts) == ["door", "pump1"]  # type: ignore[type-var]
    assert p.tick(200, T0 + 200).alerts == []  # raised once
    out = p.feed([ev(2, "pump1", 2.0, 201.0)])
    (cleared,) = out.alerts
    assert cleared.kind == "alert.cleared" and cleared.sensor == "pump1"
    assert cleared.data is not None and cleared.data["reason"] == "reading"


def test_pipeline_state_round_trips_through_json() -> None:
    cfg = ProcessingConfig.model_validate(
        {
            "windows": [{"name": "w", "size": 10}],
            "rules": [{"name": "hot", "window": "w", "above": 30, "clear_below": 28}],
        }
    )
    p = Pipeline(cfg, grace=0)
    p.feed([ev(1, "a", 40.0, 1.0)])
    alerts = p.feed([ev(2, "a", 40.0, 11.0)]).alerts
    assert kinds(alerts) == ["raised"]
    q = Pipeline(cfg, grace=0)
    restored = q.restore(json.loads(json.dumps(p.snapshot())))
    assert restored.windows == {} and restored.cleared == []
    # Restored state knows the alert is raised: not raised twice; clears with the same id.
    assert q.feed([ev(3, "a", 10.0, 21.0)]).alerts == []
    alerts = q.feed([ev(4, "a", 10.0, 31.0)]).alerts
    assert kinds(alerts) == ["cleared"]
    assert alerts[0].data is not None and alerts[0].data["alert_id"] == "hot:a:1"


def test_reconfigure_keeps_unchanged_state_and_clears_changed_rules() -> None:
    base = {
        "windows": [{"name": "w", "size": 10}],
        "rules": [
            {"name": "hot", "window": "w", "above": 30},
            {"name": "cold", "window": "w", "below": 50},
            {"name": "warm", "window": "w", "above": 20},
        ],
    }
    p = Pipeline(ProcessingConfig.model_validate(base), grace=0)
    p.feed([ev(1, "a", 40.0, 1.0), ev(2, "a", 40.0, 5.0)])
    assert kinds(p.feed([ev(3, "a", 40.0, 11.0)]).alerts) == ["raised"] * 3
    changed = {
        "windows": base["windows"],
        "rules": [
            {"name": "hot", "window": "w", "above": 35},
            {"name": "warm", "window": "w", "above": 20},
        ],
    }
    rebuild, cleared = p.reconfigure(ProcessingConfig.model_validate(changed), 12.0, T0 + 12)
    assert rebuild == {}  # the window did not change: its open window is kept
    got = sorted((a.data["rule"], a.data["reason"]) for a in cleared if a.data)
    assert got == [("cold", "rule_removed"), ("hot", "rule_changed")]
    assert all(a.kind == "alert.cleared" and a.value is None for a in cleared)
    out = p.feed([ev(4, "a", 10.0, 21.0)])
    # The open window [10, 20) kept its reading (mean 40): "hot" starts afresh and raises,
    # "warm" kept its raised alert and does not raise it again.
    assert [(a.data["rule"], a.kind) for a in out.alerts if a.data] == [("hot", "alert.raised")]
    assert out.aggregates[0].value == 40.0
    counters = p.snapshot()["counters"]
    assert counters == {"hot:a": 2, "cold:a": 1, "warm:a": 1}  # alert ids never repeat


# --------------------------------------------------------------------------- configuration


def config_errors(text: str) -> list[str]:
    from agent.config import ConfigError, parse_config

    with pytest.raises(ConfigError) as caught:
        parse_config(text, "agent.yaml")
    return [str(i) for i in caught.value.issues]


def test_the_first_versions_processing_config_still_reads() -> None:
    from agent.config import parse_config

    cfg = parse_config(
        """
processing:
  windows: [{name: mean_1m, sensors: "*", size: 1m, function: mean}]
  rules: [{name: hot, window: mean_1m, sensors: "t*", above: 35, clear_below: 32}]
"""
    )
    (w,) = cfg.processing.windows
    assert w.all_functions == ("mean",) and w.hop == 60.0 and w.time == "processing"
    (r,) = cfg.processing.rules
    assert r.above == 35 and r.clear_below == 32 and r.severity == "warning"


def test_processing_config_errors_point_at_the_line() -> None:
    errors = config_errors(
        """
processing:
  windows:
    - {name: w, size: 10s, step: 3s, functions: [mean, p101]}
    - {name: v, size: 10s, lateness: 5s}
  rules:
    - {name: r2, above: 1, below: 0}
    - {name: r3, stale: 1m, window: v}
    - {name: r4, above: 5, clear_below: 7}
  actions:
    - {type: command, name: a, argv: []}
    - {type: siren, name: b}
"""
    )
    text = "\n".join(errors)
    assert "agent.yaml:4:" in text and "unknown window function 'p101'" in text
    assert "agent.yaml:5:" in text and "lateness applies to event-time windows" in text
    assert "agent.yaml:7:" in text and "(got above, below)" in text
    assert "a stale rule watches readings arriving; drop window" in text
    assert "clear_below must not be above 'above'" in text
    assert "processing.actions[0].argv" in text
    assert "processing.actions[1].type" in text
    errors = config_errors(
        """
processing:
  windows:
    - {name: w, size: 10s, step: 3s}
    - {name: v, size: 10s, function: max}
    - {name: v, size: 10s}
  rules:
    - {name: r1, window: v, function: p95, above: 1}
    - {name: r1, window: nope, above: 1}
"""
    )
    text = "\n".join(errors)
    assert "agent.yaml:4:" in text and "size (10s) must be a whole number of steps (3s)" in text
    errors = config_errors(
        """
processing:
  windows:
    - {name: v, size: 10s, function: max}
    - {name: v, size: 10s}
  rules:
    - {name: r1, window: v, function: p95, above: 1}
    - {name: r1, window: nope, above: 1}
"""
    )
    assert errors == [
        "agent.yaml:5:14: processing.windows[1].name: duplicate name 'v'",
        "agent.yaml:7:39: processing.rules[0].function: window 'v' does not compute 'p95' "
        "(it computes max)",
        "agent.yaml:8:14: processing.rules[1].name: duplicate name 'r1'",
        "agent.yaml:8:26: processing.rules[1].window: no window named 'nope' (known windows: v)",
    ]
