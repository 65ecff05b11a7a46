"""The simulator's signal models and line formats: pure, deterministic, and on purpose."""

from __future__ import annotations

import json
import math

import pytest

from simulator.signals import (
    GARBAGE_LINE,
    LineFormat,
    LineGenerator,
    SensorModel,
    Signal,
    default_models,
    format_csv,
    format_json,
    parse_sensors,
)

NOISY = SensorModel(name="temp1", unit="C", base=21.0, amplitude=1.5, period=30.0, noise=0.2)


def test_same_seed_gives_identical_readings() -> None:
    times = [i * 0.1 for i in range(500)]
    a = Signal(NOISY, seed=7).values(times)
    b = Signal(NOISY, seed=7).values(times)
    assert a == b
    # Order of evaluation does not matter: noise is a function of t, not a random stream.
    assert [Signal(NOISY, seed=7).value_at(t) for t in reversed(times)] == a[::-1]


def test_different_seed_gives_different_readings() -> None:
    times = [i * 0.1 for i in range(200)]
    a = Signal(NOISY, seed=1).values(times)
    b = Signal(NOISY, seed=2).values(times)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 190


def test_sensors_with_the_same_seed_get_different_noise() -> None:
    other = SensorModel(name="temp2", unit="C", base=21.0, amplitude=1.5, period=30.0, noise=0.2)
    times = [i * 0.1 for i in range(100)]
    assert Signal(NOISY, 3).values(times) != Signal(other, 3).values(times)


def test_noise_is_gaussian_with_the_model_sigma() -> None:
    flat = SensorModel(name="n", base=0.0, noise=0.5)
    values = Signal(flat, seed=11).values([i * 0.01 for i in range(20_000)])
    mean = sum(values) / len(values)
    sigma = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    assert abs(mean) < 0.02
    assert sigma == pytest.approx(0.5, rel=0.05)


def test_excursion_crosses_its_height_inside_its_window_only() -> None:
    model = SensorModel(
        name="temp1",
        unit="C",
        base=21.0,
        amplitude=0.5,
        period=40.0,
        noise=0.1,
        excursion_every=30.0,
        excursion_start=10.0,
        excursion_height=15.0,
        excursion_duration=8.0,
    )
    signal = Signal(model, seed=5)
    threshold = model.base + model.excursion_height * 0.9
    dt = 0.05
    times = [i * dt for i in range(int(100 / dt))]
    above = [t for t in times if signal.value_at(t) > threshold]
    assert above, "the excursion never crossed the threshold"
    windows = [model.excursion_window(k) for k in range(3)]
    assert windows[0] == (10.0, 18.0)
    for start, end in windows:
        inside = [t for t in above if start <= t < end]
        # The plateau is the middle half of the window: several seconds above the threshold.
        assert len(inside) * dt >= (end - start) / 2 * 0.9
    assert all(any(s <= t < e for s, e in windows) for t in above)
    assert max(signal.value_at(t) for t in times if t < 10.0) < model.base + 2


def test_line_formats_match_the_agent_decoders() -> None:
    ts = 1764170000.123
    assert format_json("temp1", 21.53, "C", ts) == (
        b'{"sensor":"temp1","value":21.53,"unit":"C","ts":1764170000.123}\n'
    )
    assert (
        format_json("door", 1.0, None, ts) == b'{"sensor":"door","value":1.0,"ts":1764170000.123}\n'
    )
    assert format_csv("temp1", 21.53, "C", ts) == b"temp1,21.53,C,1764170000.123\n"
    assert format_csv("door", 1.0, None, ts) == b"door,1.0,,1764170000.123\n"
    assert format_json("t", math.nan, "C", ts).startswith(b'{"sensor":"t","value":NaN,')
    assert format_csv("t", math.nan, "C", ts) == b"t,nan,C,1764170000.123\n"


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_line_generator_round_robin_and_faults(fmt: LineFormat) -> None:
    models = parse_sensors("temp1,hum1,press1")
    gen = LineGenerator(models, fmt=fmt, rate=10.0, seed=3, garble_every=7, nan_every=5)
    lines = [gen.line(i, 1_700_000_000.0 + i / 10) for i in range(40)]
    assert [ln.sensor for ln in lines[:6]] == ["temp1", "hum1", "press1"] * 2
    for ln in lines:
        number = ln.index + 1
        if number % 7 == 0:
            assert ln.fault == "garble" and ln.data == GARBAGE_LINE
        elif number % 5 == 0:
            assert ln.fault == "nan" and ln.value is not None and math.isnan(ln.value)
        else:
            assert ln.fault is None
        if ln.fault != "garble":
            assert ln.data.endswith(b"\n") and ln.data.count(b"\n") == 1
            if fmt == "json":
                obj = json.loads(ln.data)
                assert obj["sensor"] == ln.sensor and obj["ts"] == round(ln.ts, 3)
            else:
                sensor, value, unit, ts = ln.data.decode().rstrip("\n").split(",")
                assert (sensor, unit, float(ts)) == (ln.sensor, ln.unit or "", round(ln.ts, 3))
                assert math.isnan(float(value)) == (ln.fault == "nan")
    again = LineGenerator(models, fmt=fmt, rate=10.0, seed=3, garble_every=7, nan_every=5)
    assert [again.line(i, 1_700_000_000.0 + i / 10) for i in range(40)] == lines


def test_default_models_and_sensor_specs() -> None:
    names = [m.name for m in default_models(5)]
    assert names == ["temp1", "hum1", "press1", "temp2", "hum2"]
    assert [m.unit for m in parse_sensors("temp9,humidity,door")] == ["C", "%", None]
    with pytest.raises(ValueError):
        parse_sensors("a,a")
    with pytest.raises(ValueError):
        SensorModel(name="bad,name")


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_agent_decoders_read_the_lines(fmt: LineFormat) -> None:
    from agent.events import Invalid, Sample
    from drivers.decoders import csv_decoder, decode_json

    decode = decode_json if fmt == "json" else csv_decoder()
    models = parse_sensors("temp1,door")
    gen = LineGenerator(models, fmt=fmt, rate=5.0, seed=1, garble_every=4, nan_every=3)
    for i in range(12):
        line = gen.line(i, 1_764_170_000.123 + i)
        decoded = decode(line.data.rstrip(b"\n"))
        if line.fault is None:
            assert line.value is not None
            assert decoded == [Sample(line.sensor, line.value, line.unit, round(line.ts, 3))]
        else:
            assert isinstance(decoded, Invalid)
            if line.fault == "nan":
                assert decoded.reason == "nan"
