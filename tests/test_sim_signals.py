"""The simulator's signal models, line faults, formats and profiles: pure, seeded, on purpose."""

from __future__ import annotations

import itertools
import json
import math
import statistics
from pathlib import Path

import numpy as np
import pytest

from agent.config import ConfigError
from drivers.decoders import LineFramer, Oversized, csv_decoder, decode_json
from simulator.profiles import (
    build_clock,
    build_line_faults,
    build_models,
    build_timeline,
    load_profile,
    parse_fault_option,
    parse_profile,
    with_faults,
)
from simulator.signals import (
    GARBAGE_LINE,
    ClockStep,
    DeviceClock,
    Diurnal,
    Dropouts,
    Excursion,
    LineFault,
    LineFaults,
    LineFormat,
    LineGenerator,
    Recurring,
    SensorModel,
    SensorStream,
    Spikes,
    Steps,
    Stuck,
    Walk,
    default_models,
    format_csv,
    format_json,
    format_kv,
    format_line,
    parse_rate,
    parse_sensors,
)

REPO = Path(__file__).resolve().parent.parent
EVERYTHING = SensorModel(
    name="temp1",
    unit="C",
    base=21.0,
    noise=0.2,
    drift=0.5,
    diurnal=Diurnal(1.5, 30.0, 5.0),
    walk=Walk(0.05, 0.1),
    steps=Steps(20.0, 1.0),
    spikes=Spikes(10.0, 5.0),
    stuck=Stuck(30.0, 3.0),
    dropouts=Dropouts(0.05, 40.0, 2.0),
    excursions=(Excursion(at=10.0, rise=5.0, hold=5.0, to=35.0),),
)


def samples(model: SensorModel, n: int, dt: float = 0.1, seed: int = 7) -> list[float | None]:
    return SensorStream(model, seed, dt).next(n)


def raw(model: SensorModel, n: int, dt: float = 0.1, seed: int = 7) -> np.ndarray:
    return SensorStream(model, seed, dt).next_array(n)[0]


def test_same_seed_gives_identical_readings_whatever_the_block_sizes() -> None:
    whole = samples(EVERYTHING, 3000)
    assert whole == samples(EVERYTHING, 3000)
    stream = SensorStream(EVERYTHING, 7, 0.1)
    pieces: list[float | None] = []
    for size in (1, 7, 500, 2, 1490, 1000):
        pieces += stream.next(size)
    assert pieces == whole
    stream.reset()
    assert stream.next(3000) == whole


def test_different_seed_and_different_sensor_give_different_readings() -> None:
    a, b = samples(EVERYTHING, 500, seed=1), samples(EVERYTHING, 500, seed=2)
    assert sum(x != y for x, y in zip(a, b, strict=True)) > 400
    twin = SensorModel(name="temp2", unit="C", base=21.0, noise=0.2)
    one = SensorModel(name="temp1", unit="C", base=21.0, noise=0.2)
    assert samples(one, 200) != samples(twin, 200)


def test_line_generator_is_deterministic_and_random_access() -> None:
    models = parse_sensors("temp1,hum1,press1")
    gen = LineGenerator(models, rate=10.0, seed=3, garble_every=7, nan_every=5)
    lines = [gen.line(i, 1_700_000_000.0 + i / 10) for i in range(9000)]
    again = LineGenerator(models, rate=10.0, seed=3, garble_every=7, nan_every=5)
    assert [again.line(i, 1_700_000_000.0 + i / 10) for i in range(9000)] == lines
    # Going back recomputes from the start, with the same result.
    assert gen.line(4, 1_700_000_000.4) == lines[4]
    assert gen.line(8999, 1_700_000_899.9) == lines[8999]


def test_noise_is_gaussian_with_the_model_sigma() -> None:
    values = raw(SensorModel(name="n", base=0.0, noise=0.5), 20_000)
    assert abs(values.mean()) < 0.02
    assert values.std() == pytest.approx(0.5, rel=0.05)


def test_diurnal_peaks_when_told_and_drift_accumulates() -> None:
    day = SensorModel(name="d", base=10.0, diurnal=Diurnal(3.0, 100.0, 25.0), decimals=6)
    values = raw(day, 1000)  # t = 0 .. 99.9
    assert int(np.argmax(values)) == 250 and values.max() == pytest.approx(13.0)
    assert int(np.argmin(values)) == 750 and values.min() == pytest.approx(7.0)
    drifting = raw(SensorModel(name="d", base=0.0, drift=36.0), 101, dt=1.0)  # 36 per hour
    assert drifting[100] == pytest.approx(1.0)


def test_random_walk_wanders_and_reverting_walk_stays_bounded() -> None:
    walk = raw(SensorModel(name="w", base=0.0, walk=Walk(1.0)), 40_000, dt=1.0)
    steps = np.diff(walk)
    assert steps.std() == pytest.approx(1.0, rel=0.05)  # sigma per square-root second
    reverting = raw(SensorModel(name="w", base=0.0, walk=Walk(1.0, 0.5)), 40_000, dt=1.0)
    assert reverting.std() == pytest.approx(1.0, rel=0.1)  # sigma / sqrt(2 * revert)
    assert abs(walk).max() > 5 * abs(reverting).max() / 2


def test_steps_spikes_and_stuck_values() -> None:
    stepped = raw(SensorModel(name="s", base=0.0, steps=Steps(10.0, 2.0)), 10_000)  # 1000 s
    jumps = np.flatnonzero(np.diff(stepped) != 0)
    assert 70 < len(jumps) < 130  # one per 10 s on average
    assert len(np.unique(stepped)) == len(jumps) + 1  # flat between steps

    spiky = raw(SensorModel(name="s", base=0.0, spikes=Spikes(5.0, 9.0)), 10_000)
    hits = np.flatnonzero(spiky != 0)
    assert 150 < len(hits) < 250 and set(np.abs(spiky[hits]).tolist()) == {9.0}
    assert (spiky[hits] > 0).any() and (spiky[hits] < 0).any()

    stuck = SensorModel(name="s", base=0.0, noise=1.0, stuck=Stuck(20.0, 3.0))
    values = raw(stuck, 10_000)
    runs, run = [], 1
    for a, b in itertools.pairwise(values):
        if a == b:
            run += 1
        else:
            if run > 1:
                runs.append(run)
            run = 1
    assert 30 < len(runs) < 70
    assert all(r >= 30 for r in runs)  # 3 s at 10 samples a second, and more when they meet


def test_dropouts_skip_readings() -> None:
    each = samples(SensorModel(name="d", dropouts=Dropouts(probability=0.2)), 10_000)
    assert each.count(None) == pytest.approx(2000, rel=0.1)
    silences = samples(SensorModel(name="d", dropouts=Dropouts(every=50.0, duration=5.0)), 10_000)
    gaps, run = [], 0
    for v in silences:
        if v is None:
            run += 1
        elif run:
            gaps.append(run)
            run = 0
    assert 10 < len(gaps) < 35 and min(gaps) >= 50


def test_excursion_rises_to_its_level_and_falls() -> None:
    # "temperature rises to 35 over 2 minutes at t=60s, then falls"
    model = SensorModel(
        name="temp1",
        base=21.0,
        noise=0.05,
        excursions=(Excursion(60.0, 120.0, fall=120.0, to=35.0),),
    )
    values = raw(model, 4000)  # t = 0 .. 400 s
    at = {t: values[int(t * 10)] for t in (30, 60, 120, 180, 240, 300, 330)}
    assert at[30] == pytest.approx(21.0, abs=0.3) and at[60] == pytest.approx(21.0, abs=0.3)
    assert at[120] == pytest.approx(28.0, abs=0.3)
    assert at[180] == pytest.approx(35.0, abs=0.3)
    assert at[240] == pytest.approx(28.0, abs=0.3)
    assert at[300] == pytest.approx(21.0, abs=0.3) and at[330] == pytest.approx(21.0, abs=0.3)
    assert max(values) < 35.5
    again = Excursion(at=10.0, rise=1.0, hold=2.0, fall=1.0, by=5.0, every=20.0)
    assert [again.window(k) for k in range(2)] == [(10.0, 14.0), (30.0, 34.0)]
    with pytest.raises(ValueError, match="exactly one"):
        Excursion(at=0.0, rise=1.0)


def test_default_temperature_crosses_the_demo_threshold_every_minute() -> None:
    # config/demo.yaml: a 10 s mean of temp* above 25 raises an alert; cleared below 23.
    gen = LineGenerator(default_models(3), rate=30.0, seed=0)
    temps = [
        (gen.signal_time(i), gen.value(i)) for i in range(0, 30 * 130) if i % 3 == 0
    ]  # temp1: every third line
    means = []
    for start in range(0, 120, 10):
        window = [v for t, v in temps if start <= t < start + 10 and v is not None]
        means.append(statistics.mean(window))
    assert max(means[:4]) > 25 and min(means) < 23
    assert sum(m > 25 for m in means) >= 2  # once a minute


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
    assert (
        format_kv("temp1", 21.53, "C", ts) == b"sensor=temp1 value=21.53 unit=C ts=1764170000.123\n"
    )
    assert format_kv("door", 1.0, None, ts) == b"sensor=door value=1.0 ts=1764170000.123\n"
    assert format_json("t", math.nan, "C", ts).startswith(b'{"sensor":"t","value":NaN,')
    assert format_csv("t", math.nan, "C", ts) == b"t,nan,C,1764170000.123\n"
    with pytest.raises(ValueError):
        format_line("xml", "t", 1.0, None, ts)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        SensorModel(name="bad,name")
    with pytest.raises(ValueError):
        SensorModel(name="a b")


def _decoder(fmt: LineFormat):  # type: ignore[no-untyped-def]
    if fmt == "json":
        return decode_json
    if fmt == "csv":
        return csv_decoder()
    from agent.config import LineFormatConfig
    from drivers.decoders import decoder_for

    try:
        return decoder_for(LineFormatConfig.model_validate({"format": "kv", "wide": False}))
    except Exception as exc:  # the kv decoder is not there yet
        pytest.skip(f"no kv decoder: {exc}")


@pytest.mark.parametrize("fmt", ["json", "csv", "kv"])
def test_agent_decoders_read_every_line_and_reject_every_fault(fmt: LineFormat) -> None:
    from agent.events import Invalid, Sample

    decode = _decoder(fmt)
    faults = LineFaults(
        garble=LineFault(every=11),
        invalid_utf8=LineFault(every=7),
        oversize=LineFault(every=5),
        nan=LineFault(every=3),
        oversize_length=2000,
    )
    gen = LineGenerator(parse_sensors("temp1,door,hum1"), fmt=fmt, rate=5.0, seed=1, faults=faults)
    seen = set()
    for i in range(200):
        line = gen.line(i, 1_764_170_000.123 + i)
        assert line is not None
        n = i + 1
        expected = next(
            (
                k
                for k, every in (("garble", 11), ("invalid_utf8", 7), ("oversize", 5), ("nan", 3))
                if n % every == 0
            ),
            None,
        )
        assert line.fault == expected
        seen.add(line.fault)
        assert line.data.endswith(b"\n") and line.data.count(b"\n") == 1
        framer = LineFramer(1024)
        (framed,) = framer.feed(line.data)
        if line.fault == "oversize":
            assert isinstance(framed, Oversized) and len(line.data) == 2000
            # Only its length is wrong: a bigger bound reads it as the reading it carries.
            (framed,) = LineFramer(4096).feed(line.data)
        assert isinstance(framed, bytes)
        decoded = decode(framed)
        if line.fault in (None, "oversize"):
            assert line.value is not None
            assert decoded == [Sample(line.sensor, line.value, line.unit, round(line.ts, 3))]
        else:
            assert isinstance(decoded, Invalid), (line, decoded)
            if line.fault == "nan":
                assert decoded.reason == "nan"
            elif line.fault == "invalid_utf8":
                assert decoded.reason == "invalid_utf8"
            else:
                assert line.data == GARBAGE_LINE
    assert seen == {None, "garble", "invalid_utf8", "oversize", "nan"}


def test_probability_faults_are_seeded() -> None:
    faults = LineFaults(garble=LineFault(probability=0.1))
    gen = LineGenerator(parse_sensors("2"), seed=5, faults=faults)
    hits = [i for i in range(5000) if gen.fault(i) == "garble"]
    assert len(hits) == pytest.approx(500, rel=0.15)
    again = LineGenerator(parse_sensors("2"), seed=5, faults=faults)
    assert [i for i in range(5000) if again.fault(i) == "garble"] == hits
    other = LineGenerator(parse_sensors("2"), seed=6, faults=faults)
    assert [i for i in range(5000) if other.fault(i) == "garble"] != hits


def test_device_clock_skew_drift_and_steps() -> None:
    clock = DeviceClock(
        offset=-90.0, drift_ppm=100.0, steps=(ClockStep(20.0, 3600.0), ClockStep(40.0, -60.0))
    )
    assert clock.error(0.0) == -90.0
    assert clock.error(10.0) == pytest.approx(-90.0 + 0.001)
    assert clock.error(20.0) == pytest.approx(-90.0 + 0.002 + 3600.0)
    assert clock.error(50.0) == pytest.approx(-90.0 + 0.005 + 3540.0)
    assert DeviceClock().exact and not clock.exact


def test_rates_and_windows() -> None:
    assert parse_rate("20000") == 20000.0
    assert parse_rate("10/s") == 10.0
    assert parse_rate("1/min") == pytest.approx(1 / 60)
    assert parse_rate("30/h") == pytest.approx(1 / 120)
    assert parse_rate(2.5) == 2.5
    for bad in ("0", "fast", "-1", "1/day"):
        with pytest.raises(ValueError):
            parse_rate(bad)
    w = Recurring(at=10.0, duration=2.0, every=30.0)
    assert w.window(9.9) is None and w.window(10.0) == (10.0, 12.0)
    assert w.window(41.5) == (40.0, 42.0) and w.window(42.0) is None
    assert w.next_start(12.0) == 40.0 and Recurring(5.0, 1.0).next_start(6.0) is None
    gen = LineGenerator(parse_sensors("1"), rate=3.0)
    assert gen.index_at(1.0) == 3 and gen.index_at(1.01) == 4 and gen.index_at(0.0) == 0


def test_default_models_and_sensor_specs() -> None:
    names = [m.name for m in default_models(5)]
    assert names == ["temp1", "hum1", "press1", "temp2", "hum2"]
    assert [m.unit for m in parse_sensors("temp9,humidity,door")] == ["C", "%", None]
    with pytest.raises(ValueError):
        parse_sensors("a,a")


# --------------------------------------------------------------------------- profiles


def test_the_example_profile_loads_and_builds() -> None:
    profile = load_profile(REPO / "config" / "simulator.yaml")
    models = build_models(profile)
    assert [m.name for m in models] == ["temp1", "hum1", "press1"]
    assert profile.rate == 10.0 and profile.seed == 42 and profile.output.type == "serial"
    temp = models[0]
    assert temp.excursions == (Excursion(at=60.0, rise=120.0, hold=60.0, fall=120.0, to=35.0),)
    faults = build_line_faults(profile.faults)
    assert faults.garble == LineFault(every=500) and faults.oversize_length == 4096
    clock = build_clock(profile.faults)
    assert clock.offset == -2.0 and clock.steps == (ClockStep(480.0, -3600.0),)
    timeline = build_timeline(profile.faults)
    assert timeline.outages == (Recurring(300.0, 10.0),) and timeline.bursts == (
        Recurring(180.0, 5.0),
    )
    # The alert it promises: temp1 above 30 for minutes from about t=150s, not before t=60s.
    gen = LineGenerator(models, rate=profile.rate, seed=profile.seed, faults=faults)
    temp1 = [gen.value(i) for i in range(0, 3000, 3)]  # every 0.3 s, t = 0 .. 300 s
    assert max(v for v in temp1[:200] if v is not None) < 30
    for start in range(500, 800, 33):  # t = 150 .. 240 s, 10 s at a time
        window = [v for v in temp1[start : start + 33] if v is not None]
        assert statistics.median(window) > 30


def test_profile_errors_carry_file_line_and_column() -> None:
    text = """seed: 1
rate: fast
sensors:
  - name: temp1
    nois: 0.1
    excursions:
      - {at: 60s, rise: 2m}
  - name: temp1
faults:
  garble: {every: 0}
  outage: [{at: 10s, duration: 20s, every: 5s}]
output: {type: mqtt, topic: "sensors/#"}
"""
    with pytest.raises(ConfigError) as info:
        parse_profile(text, "sim.yaml")
    assert [str(i) for i in info.value.issues] == [
        "sim.yaml:2:7: rate: 'fast' is not a rate; write it as 20000, 10/s, 1/min or 30/h",
        "sim.yaml:5:5: sensors[0].nois: unknown key (did you mean 'noise'?)",
        "sim.yaml:7:9: sensors[0].excursions[0]: an excursion needs exactly one of `to` (a level) or `by`",
        "sim.yaml:10:19: faults.garble.every: Input should be greater than or equal to 1",
        "sim.yaml:11:12: faults.outage[0]: every must be longer than duration",
        "sim.yaml:12:9: output: topic must be a topic name, without the wildcards + and #",
    ]
    with pytest.raises(ConfigError) as info:
        parse_profile("sensors: [{name: a}, {name: a}]\n", "dup.yaml")
    assert str(info.value) == "dup.yaml:1:29: sensors[1].name: duplicate sensor 'a'"
    with pytest.raises(ConfigError, match=r"^out.yaml:1:16: output.type: .*'serial', 'mqtt'"):
        parse_profile("output: {type: telnet}\n", "out.yaml")


def test_fault_options_add_to_the_profile() -> None:
    assert parse_fault_option("outage:at=10s,duration=3s") == (
        "outage",
        {"at": "10s", "duration": "3s"},
    )
    assert parse_fault_option("garble:every=50") == ("garble", {"every": 50})
    profile = with_faults(
        parse_profile("faults: {outage: [{at: 1s, duration: 1s}], nan: {every: 3}}\n"),
        ["outage:at=10s,duration=3s", "garble:probability=0.5", "clock-step:at=5,by=-1h"],
    )
    assert len(profile.faults.outage) == 2 and profile.faults.nan is not None
    assert profile.faults.garble is not None and profile.faults.garble.probability == 0.5
    assert build_clock(profile.faults).steps == (ClockStep(5.0, -3600.0),)
    with pytest.raises(ValueError, match="unknown fault 'garbel' \\(did you mean 'garble'\\?\\)"):
        parse_fault_option("garbel:every=3")
    with pytest.raises(ValueError, match=r"garble\.every"):
        with_faults(parse_profile(""), ["garble:every=0"])
    with pytest.raises(ValueError, match="key=value"):
        parse_fault_option("garble:every")


def test_json_round_trip_of_a_generated_line() -> None:
    gen = LineGenerator(parse_sensors("door"), fmt="json", seed=2)
    line = gen.line(0, 1.5)
    assert line is not None
    assert json.loads(line.data) == {"sensor": "door", "value": line.value, "ts": 1.5}
