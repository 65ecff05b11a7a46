"""Processing is pure: windows and rules are functions of (state, batch), tested with no I/O."""

from __future__ import annotations

import json
import math

from hypothesis import given, settings
from hypothesis import strategies as st

from agent.config import ProcessingConfig, RuleConfig, WindowConfig
from agent.events import Event, NewEvent
from agent.processing import Pipeline, ThresholdRule, TumblingMean


def ev(seq: int, sensor: str, value: float, mono: float, t: float | None = None) -> Event:
    wall = 1_700_000_000.0 + mono if t is None else t
    return Event("readings", seq, "reading", wall, wall, mono, sensor, value, "C")


def window(size: float = 10.0, sensors: str = "*") -> TumblingMean:
    return TumblingMean(WindowConfig(name="w", size=size, sensors=sensors))


def test_tumbling_mean_closes_when_next_window_starts() -> None:
    w = window()
    assert w.feed([ev(1, "a", 1.0, 1.0), ev(2, "a", 3.0, 9.9)]) == []
    out = w.feed([ev(3, "a", 100.0, 10.0)])
    assert len(out) == 1
    agg = out[0]
    assert agg.kind == "aggregate" and agg.sensor == "a" and agg.value == 2.0
    assert agg.data is not None and agg.data["count"] == 2 and agg.data["window"] == "w"
    assert agg.mono == 10.0


def test_windows_run_on_monotonic_time_not_wall_time() -> None:
    """A wall-clock step (NTP at boot) must neither split nor merge a window."""
    w = window()
    w.feed([ev(1, "a", 1.0, 1.0, t=0.0)])  # wall time 1970: no RTC, before NTP
    assert w.feed([ev(2, "a", 3.0, 2.0, t=1_700_000_000.0)]) == []  # clock stepped
    (agg,) = w.tick(now_mono=10.0)
    assert agg.value == 2.0 and agg.data is not None and agg.data["count"] == 2


def test_tick_closes_windows_without_new_readings() -> None:
    w = window()
    w.feed([ev(1, "a", 5.0, 3.0), ev(2, "b", 7.0, 4.0)])
    assert w.tick(now_mono=10.5, grace=1.0) == []
    out = w.tick(now_mono=11.0, grace=1.0)
    assert sorted((a.sensor, a.value) for a in out) == [("a", 5.0), ("b", 7.0)]
    assert w.tick(now_mono=100.0) == []  # empty windows emit nothing


def test_sensor_glob_and_late_readings_are_counted() -> None:
    w = window(sensors="temp*")
    w.feed([ev(1, "temp1", 1.0, 15.0), ev(2, "hum1", 50.0, 15.0)])
    assert "hum1" not in w.open
    w.feed([ev(3, "temp1", 9.0, 5.0)])  # a window already closed
    assert w.stats.late == 1


def test_snapshot_restore_continues_the_window() -> None:
    a = window()
    a.feed([ev(1, "a", 1.0, 1.0)])
    b = window()
    b.restore(json.loads(json.dumps(a.snapshot())))
    b.feed([ev(2, "a", 3.0, 2.0)])
    (agg,) = b.tick(20.0)
    assert agg.value == 2.0


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b", "c"]),
            st.floats(-1e6, 1e6, allow_nan=False),
            st.floats(0, 0.5),
        ),
        min_size=1,
        max_size=300,
    ),
    st.integers(1, 50),
)
def test_vectorised_mean_agrees_with_plain_python(
    rows: list[tuple[str, float, float]], split: int
) -> None:
    """Fed in any batching, the numpy window gives the plain-Python means of each window."""
    events, mono = [], 0.0
    for i, (sensor, value, step) in enumerate(rows):
        mono += step
        events.append(ev(i + 1, sensor, value, mono))
    w = window(size=1.0)
    got: list[NewEvent] = []
    for start in range(0, len(events), split):
        got.extend(w.feed(events[start : start + split]))
    got.extend(w.tick(math.inf))
    expected: dict[tuple[str, int], list[float]] = {}
    for e in events:
        assert e.sensor is not None and e.value is not None
        expected.setdefault((e.sensor, math.floor(e.mono)), []).append(e.value)
    assert len(got) == len(expected)
    for agg in got:
        assert agg.sensor is not None and agg.value is not None
        values = expected[(agg.sensor, round(agg.mono) - 1)]
        assert math.isclose(agg.value, math.fsum(values) / len(values), rel_tol=1e-9, abs_tol=1e-6)


def agg(value: float, sensor: str = "t1", window_name: str = "w") -> NewEvent:
    return NewEvent("aggregate", 1.0, 1.0, 1.0, sensor, value, "C", {"window": window_name})


def test_threshold_rule_hysteresis_pairs_raised_and_cleared() -> None:
    rule = ThresholdRule(RuleConfig(name="hot", window="w", above=30, clear_below=28))
    out = rule.feed([agg(25), agg(31), agg(32), agg(29), agg(27.5), agg(31)])
    assert [a.kind for a in out] == ["alert.raised", "alert.cleared", "alert.raised"]
    ids = [a.data["alert_id"] for a in out if a.data]
    assert ids[0] == ids[1] and ids[2] != ids[0]
    assert out[0].value == 31 and out[1].value == 27.5
    assert out[0].data is not None and out[0].data["severity"] == "warning"


def test_rule_ignores_other_windows_and_sensors() -> None:
    rule = ThresholdRule(RuleConfig(name="hot", window="w", sensors="temp*", above=30))
    assert rule.feed([agg(99, window_name="other"), agg(99, sensor="hum1")]) == []


def test_pipeline_state_round_trips_through_json() -> None:
    cfg = ProcessingConfig(
        windows=[WindowConfig(name="w", size=10)],
        rules=[RuleConfig(name="hot", window="w", above=30, clear_below=28)],
    )
    p = Pipeline(cfg)
    p.feed([ev(1, "a", 40.0, 1.0)])
    _, alerts = p.feed([ev(2, "a", 40.0, 11.0)])
    assert [a.kind for a in alerts] == ["alert.raised"]
    q = Pipeline(cfg)
    q.restore(json.loads(json.dumps(p.snapshot())))
    # Restored state knows the alert is raised: not raised twice; clears with the same id.
    _, alerts = q.feed([ev(3, "a", 10.0, 21.0)])
    assert alerts == []
    _, alerts = q.feed([ev(4, "a", 10.0, 31.0)])
    assert [a.kind for a in alerts] == ["alert.cleared"]
    assert alerts[0].data is not None and alerts[0].data["alert_id"] == "hot:a:1"
