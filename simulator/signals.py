"""Seeded sensor signal models, device clocks, line faults and the line formats a device sends.

A sensor's value at signal time t (seconds since the run started) is built in this order:

    smooth = base + diurnal(t) + drift * t + walk(t) + steps(t)
    smooth = each excursion applied to smooth      (`to`: pulled towards a level; `by`: added)
    value  = smooth + gaussian noise + spikes
    value  = held at an earlier value while stuck;  nothing is sent during a dropout

Everything is deterministic: each random ingredient of each sensor draws from its own numpy
generator, seeded from (seed, sensor name, ingredient), and draws exactly one number per
sample. So the same seed gives the same readings in every process, whatever the block sizes
the values are computed in, and adding a sensor does not change the others.

A `LineGenerator` turns the sensors into lines: line `i` (0-based) is a reading of sensor
`i % n` at signal time `i / rate`, encoded as JSON, CSV or key=value (the agent's decoders), or
replaced by a fault (garbage, invalid UTF-8, an over-long line, NaN) when the fault plan says so.
"""

from __future__ import annotations

import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import numpy.typing as npt

LineFormat = Literal["json", "csv", "kv"]
LINE_FORMATS: tuple[LineFormat, ...] = ("json", "csv", "kv")
FaultKind = Literal["garble", "invalid_utf8", "oversize", "nan"]
#: When several line faults hit the same line, the first of these wins.
FAULT_KINDS: tuple[FaultKind, ...] = ("garble", "invalid_utf8", "oversize", "nan")

#: What a `garble` fault sends instead of a reading: no decoder can make a reading of it.
GARBAGE_LINE = b"#$%^&*\n"
#: Bytes an `invalid_utf8` fault puts into a line: never valid UTF-8 anywhere.
INVALID_UTF8 = b"\xff\xfe"
#: The default length of an `oversize` line: four times the agent's default `max_line`.
OVERSIZE_LENGTH = 4096

_MASK64 = (1 << 64) - 1
_BLOCK = 4096  # samples per sensor computed at a time
# Names and units travel unquoted in CSV and key=value lines and as MQTT topic levels.
_BAD_NAME = re.compile(r'[\s,"\\=/+#\x00-\x1f\x7f]')
_BAD_UNIT = re.compile(r'[\s,"\\=\x00-\x1f\x7f]')
MAX_NAME = 128  # the agent's decoders reject longer sensor names
MAX_UNIT = 32

Array = npt.NDArray[np.float64]
Mask = npt.NDArray[np.bool_]


# --------------------------------------------------------------------------- sensor models


@dataclass(frozen=True, slots=True)
class Diurnal:
    """A sine day: `amplitude * cos(2 pi (t - peak) / period)`; the maximum at `peak`."""

    amplitude: float
    period: float = 86400.0
    peak: float = 0.0

    def __post_init__(self) -> None:
        if self.period <= 0:
            raise ValueError("diurnal period must be > 0")


@dataclass(frozen=True, slots=True)
class Walk:
    """A random walk: `sigma` per square-root second; `revert` > 0 pulls it back towards 0.

    With `revert` it is an Ornstein-Uhlenbeck process whose spread settles at
    `sigma / sqrt(2 * revert)`: a wander that stays bounded, as real ambient values do.
    """

    sigma: float
    revert: float = 0.0

    def __post_init__(self) -> None:
        if self.sigma < 0 or self.revert < 0:
            raise ValueError("walk sigma and revert must be >= 0")


@dataclass(frozen=True, slots=True)
class Steps:
    """Step changes at random moments, on average one `every` seconds, each N(0, size)."""

    every: float
    size: float

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError("steps every must be > 0")


@dataclass(frozen=True, slots=True)
class Spikes:
    """One-sample spikes of +-`height`, at random, on average one `every` seconds."""

    every: float
    height: float

    def __post_init__(self) -> None:
        if self.every <= 0:
            raise ValueError("spikes every must be > 0")


@dataclass(frozen=True, slots=True)
class Stuck:
    """The sensor repeats its last value for `duration` s, on average once `every` seconds."""

    every: float
    duration: float

    def __post_init__(self) -> None:
        if self.every <= 0 or self.duration <= 0:
            raise ValueError("stuck every and duration must be > 0")


@dataclass(frozen=True, slots=True)
class Dropouts:
    """Readings the sensor never sends: each one with `probability`, and/or silences of
    `duration` s starting on average once `every` seconds."""

    probability: float = 0.0
    every: float | None = None
    duration: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.probability < 1:
            raise ValueError("dropout probability must be in [0, 1)")
        if self.every is not None and (self.every <= 0 or self.duration <= 0):
            raise ValueError("dropouts every and duration must be > 0")


@dataclass(frozen=True, slots=True)
class Excursion:
    """A scripted excursion: from `at`, over `rise` s the value moves to the level `to` (or by
    `by`), stays `hold` s, and comes back over `fall` s; repeated every `every` s if set.

    "Temperature rises to 35 over 2 minutes at t=60s, then falls" is
    `Excursion(at=60, rise=120, to=35, fall=120)`.
    """

    at: float
    rise: float
    hold: float = 0.0
    fall: float = 0.0
    to: float | None = None
    by: float | None = None
    every: float | None = None

    def __post_init__(self) -> None:
        if (self.to is None) == (self.by is None):
            raise ValueError("an excursion needs exactly one of `to` (a level) or `by`")
        if min(self.rise, self.hold, self.fall) < 0:
            raise ValueError("excursion rise, hold and fall must be >= 0")
        if self.length <= 0:
            raise ValueError("an excursion must last longer than 0s")
        if self.every is not None and self.every < self.length:
            raise ValueError("excursion every must be >= rise + hold + fall")

    @property
    def length(self) -> float:
        return self.rise + self.hold + self.fall

    def window(self, k: int = 0) -> tuple[float, float]:
        """The k-th occurrence's [start, end) in signal time."""
        if k and self.every is None:
            raise ValueError("this excursion happens once")
        start = self.at + k * (self.every or 0.0)
        return start, start + self.length

    def weight(self, t: Array) -> Array:
        """How far the excursion has taken over at each t: 0 outside, 1 on its plateau."""
        x = t - self.at
        if self.every is not None:
            x = np.where(x >= 0, np.mod(x, self.every), x)
        end = self.length
        up = np.clip(x / self.rise, 0.0, 1.0) if self.rise > 0 else (x >= 0).astype(np.float64)
        down = (
            np.clip((end - x) / self.fall, 0.0, 1.0)
            if self.fall > 0
            else (x < end).astype(np.float64)
        )
        inside = (x >= 0) & (x < end)
        return np.where(inside, np.minimum(up, down), 0.0)

    def apply(self, smooth: Array, t: Array) -> Array:
        w = self.weight(t)
        if self.to is not None:
            return smooth + w * (self.to - smooth)
        assert self.by is not None
        return smooth + w * self.by


def check_name(name: str, what: str = "sensor name") -> None:
    """Raise ValueError unless `name` can travel in every line format and as a topic level."""
    if not name or len(name) > MAX_NAME or _BAD_NAME.search(name):
        raise ValueError(
            f"{what} {name!r} must be 1-{MAX_NAME} characters without spaces, control "
            'characters or any of , " \\ = / + #'
        )


@dataclass(frozen=True, slots=True)
class SensorModel:
    """How one simulated sensor behaves. Times are seconds of signal time; `drift` is per hour."""

    name: str
    unit: str | None = None
    base: float = 20.0
    decimals: int = 2  # what the device rounds to on the wire
    noise: float = 0.0  # sigma of the gaussian noise
    drift: float = 0.0  # change per hour
    diurnal: Diurnal | None = None
    walk: Walk | None = None
    steps: Steps | None = None
    spikes: Spikes | None = None
    stuck: Stuck | None = None
    dropouts: Dropouts | None = None
    excursions: tuple[Excursion, ...] = ()

    def __post_init__(self) -> None:
        check_name(self.name)
        if self.unit is not None and (
            not self.unit or len(self.unit) > MAX_UNIT or _BAD_UNIT.search(self.unit)
        ):
            raise ValueError(
                f"unit {self.unit!r} must be 1-{MAX_UNIT} characters without spaces, control "
                'characters or any of , " \\ ='
            )
        if self.noise < 0:
            raise ValueError("noise must be >= 0")
        if not 0 <= self.decimals <= 12:
            raise ValueError("decimals must be between 0 and 12")


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _uniform(key: int, index: int) -> float:
    """A uniform number in [0, 1) that depends only on (key, index)."""
    return (_mix64(key ^ _mix64(index)) >> 11) * 2.0**-53


# Each random ingredient of a sensor has its own generator, so that one draws the same
# numbers whatever the others do.
_NOISE, _WALK, _STEP_AT, _STEP_SIZE, _SPIKE_AT, _SPIKE_SIGN = range(6)
_STUCK_AT, _DROP_EACH, _DROP_AT = range(6, 9)


def _chance(every: float, dt: float) -> float:
    """The chance of an onset within one sample, for onsets on average `every` s apart."""
    return -math.expm1(-dt / every)


class SensorStream:
    """One sensor's samples, in order: sample k is at signal time `t0 + k * dt`.

    `next(n)` returns the next n values (rounded to the model's decimals; None where the sensor
    dropped out). The stream is stateful (walk, steps, stuck), so samples come in order only;
    `reset()` starts over, and gives the same samples again.
    """

    def __init__(self, model: SensorModel, seed: int, dt: float, t0: float = 0.0) -> None:
        if dt <= 0:
            raise ValueError("dt must be > 0")
        self.model = model
        self.seed = seed
        self.dt = dt
        self.t0 = t0
        self.reset()

    def reset(self) -> None:
        self.position = 0
        key = zlib.crc32(self.model.name.encode())
        root = self.seed & _MASK64
        self._rngs = [
            np.random.default_rng(np.random.SeedSequence(root, spawn_key=(key, i)))
            for i in range(9)
        ]
        self._walk = 0.0
        self._steps = 0.0
        self._stuck_until = -math.inf
        self._held = math.nan
        self._last = math.nan
        self._silent_until = -math.inf

    def times(self, n: int) -> Array:
        """The signal times of the next n samples."""
        k = np.arange(self.position, self.position + n, dtype=np.float64)
        return self.t0 + k * self.dt

    def next_array(self, n: int) -> tuple[Array, Mask]:
        """The next n raw values (not rounded) and a mask of which ones are sent."""
        m, dt, rng = self.model, self.dt, self._rngs
        t = self.times(n)
        smooth = np.full(n, m.base, dtype=np.float64)
        if m.diurnal is not None and m.diurnal.amplitude:
            d = m.diurnal
            smooth += d.amplitude * np.cos(2 * math.pi * (t - d.peak) / d.period)
        if m.drift:
            smooth += m.drift * t / 3600.0
        if m.walk is not None:
            smooth += self._walk_values(rng[_WALK].standard_normal(n), m.walk)
        if m.steps is not None:
            onset = rng[_STEP_AT].random(n) < _chance(m.steps.every, dt)
            size = rng[_STEP_SIZE].standard_normal(n) * m.steps.size
            offsets = self._steps + np.cumsum(np.where(onset, size, 0.0))
            self._steps = float(offsets[-1]) if n else self._steps
            smooth += offsets
        for excursion in m.excursions:
            smooth = excursion.apply(smooth, t)
        value = smooth
        if m.noise:
            value = value + rng[_NOISE].standard_normal(n) * m.noise
        if m.spikes is not None:
            onset = rng[_SPIKE_AT].random(n) < _chance(m.spikes.every, dt)
            sign = np.where(rng[_SPIKE_SIGN].random(n) < 0.5, -1.0, 1.0)
            value = value + np.where(onset, sign * m.spikes.height, 0.0)
        if m.stuck is not None:
            value = self._apply_stuck(value, t, rng[_STUCK_AT].random(n), m.stuck)
        sent = np.ones(n, dtype=np.bool_)
        if m.dropouts is not None:
            sent = self._apply_dropouts(t, m.dropouts, n)
        if n:
            self._last = float(value[-1])
        self.position += n
        return value, sent

    def next(self, n: int) -> list[float | None]:
        """The next n values as sent: rounded to the model's decimals, None for a dropout."""
        values, sent = self.next_array(n)
        d = self.model.decimals
        return [
            round(v, d) if s else None for v, s in zip(values.tolist(), sent.tolist(), strict=True)
        ]

    def _walk_values(self, z: Array, walk: Walk) -> Array:
        dt = self.dt
        if walk.revert == 0:
            out = self._walk + np.cumsum(z * walk.sigma * math.sqrt(dt))
        else:
            # Exact discretisation of the Ornstein-Uhlenbeck process.
            a = math.exp(-walk.revert * dt)
            b = walk.sigma * math.sqrt(-math.expm1(-2 * walk.revert * dt) / (2 * walk.revert))
            x = self._walk
            seq = []
            for zi in (z * b).tolist():
                x = a * x + zi
                seq.append(x)
            out = np.array(seq, dtype=np.float64)
        if len(out):
            self._walk = float(out[-1])
        return out

    def _apply_stuck(self, value: Array, t: Array, draws: Array, stuck: Stuck) -> Array:
        value = value.copy()
        if len(t) and self._stuck_until > t[0]:
            value[t < self._stuck_until] = self._held
        for k in np.flatnonzero(draws < _chance(stuck.every, self.dt)).tolist():
            if t[k] < self._stuck_until:
                continue
            previous = float(value[k - 1]) if k > 0 else self._last
            self._held = previous if not math.isnan(previous) else float(value[k])
            self._stuck_until = float(t[k]) + stuck.duration
            value[(t >= t[k]) & (t < self._stuck_until)] = self._held
        return value

    def _apply_dropouts(self, t: Array, dropouts: Dropouts, n: int) -> Mask:
        sent = np.ones(n, dtype=np.bool_)
        rng = self._rngs
        if dropouts.probability:
            sent &= rng[_DROP_EACH].random(n) >= dropouts.probability
        if dropouts.every is not None:
            draws = rng[_DROP_AT].random(n)
            if n and self._silent_until > t[0]:
                sent &= t >= self._silent_until
            for k in np.flatnonzero(draws < _chance(dropouts.every, self.dt)).tolist():
                if t[k] < self._silent_until:
                    continue
                self._silent_until = float(t[k]) + dropouts.duration
                sent &= ~((t >= t[k]) & (t < self._silent_until))
        return sent


# --------------------------------------------------------------------------- line formats
# These match the agent's decoders (drivers/decoders.py) byte for byte.


def _number(value: float, nan: str) -> str:
    return nan if math.isnan(value) else repr(value)


def _ts(ts: float) -> str:
    return repr(round(ts, 3))


def format_json(sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """`{"sensor":"temp1","value":21.53,"unit":"C","ts":1764170000.123}\\n`, unit omitted if None.

    A NaN value is written as the bare token `NaN`, as many devices (and Python) do.
    """
    unit_part = f',"unit":"{unit}"' if unit is not None else ""
    return (
        f'{{"sensor":"{sensor}","value":{_number(value, "NaN")}{unit_part},"ts":{_ts(ts)}}}\n'
    ).encode()


def format_csv(sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """`temp1,21.53,C,1764170000.123\\n` (sensor,value,unit,ts); an empty unit if None."""
    return f"{sensor},{_number(value, 'nan')},{unit or ''},{_ts(ts)}\n".encode()


def format_kv(sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """`sensor=temp1 value=21.53 unit=C ts=1764170000.123\\n`, unit omitted if None."""
    unit_part = f" unit={unit}" if unit is not None else ""
    return f"sensor={sensor} value={_number(value, 'nan')}{unit_part} ts={_ts(ts)}\n".encode()


_FORMATTERS = {"json": format_json, "csv": format_csv, "kv": format_kv}


def format_line(fmt: LineFormat, sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """One reading as a line in `fmt`."""
    formatter = _FORMATTERS.get(fmt)
    if formatter is None:
        raise ValueError(f"unknown line format {fmt!r}; use one of {', '.join(LINE_FORMATS)}")
    return formatter(sensor, value, unit, ts)


# --------------------------------------------------------------------------- line faults


@dataclass(frozen=True, slots=True)
class LineFault:
    """Which lines a fault hits: every `every`-th line (1-based), and/or each line with
    `probability` (seeded: the same lines every run)."""

    every: int | None = None
    probability: float = 0.0

    def __post_init__(self) -> None:
        if self.every is not None and self.every < 1:
            raise ValueError("every must be >= 1")
        if not 0 <= self.probability <= 1:
            raise ValueError("probability must be in [0, 1]")

    @property
    def active(self) -> bool:
        return self.every is not None or self.probability > 0


@dataclass(frozen=True, slots=True)
class LineFaults:
    """The line faults of a run. Garbage and invalid UTF-8 fail decoding, `oversize` lines are
    `oversize_length` bytes (a valid reading padded with spaces, refused only for its length),
    and `nan` lines carry NaN as their value."""

    garble: LineFault = LineFault()
    invalid_utf8: LineFault = LineFault()
    oversize: LineFault = LineFault()
    nan: LineFault = LineFault()
    oversize_length: int = OVERSIZE_LENGTH

    def __post_init__(self) -> None:
        if self.oversize_length < 2:
            raise ValueError("oversize length must be >= 2 bytes")

    def plan(self) -> list[tuple[FaultKind, LineFault]]:
        return [(k, getattr(self, k)) for k in FAULT_KINDS if getattr(self, k).active]


# --------------------------------------------------------------------------- device clock


@dataclass(frozen=True, slots=True)
class ClockStep:
    """At signal time `at` the device's clock jumps by `by` seconds (an NTP sync, a reset)."""

    at: float
    by: float


@dataclass(frozen=True, slots=True)
class DeviceClock:
    """The time a device stamps on its readings: the true time, off by `offset` seconds,
    running `drift_ppm` parts per million fast (negative: slow), plus every clock step so far."""

    offset: float = 0.0
    drift_ppm: float = 0.0
    steps: tuple[ClockStep, ...] = ()

    def error(self, t: float) -> float:
        """How far the device clock is from the true time at signal time t."""
        err = self.offset + self.drift_ppm * 1e-6 * t
        for step in self.steps:
            if t >= step.at:
                err += step.by
        return err

    @property
    def exact(self) -> bool:
        return not (self.offset or self.drift_ppm or self.steps)


# --------------------------------------------------------------------------- lines


@dataclass(frozen=True, slots=True)
class Line:
    """One line a simulated device sends: the reading it stands for and the bytes on the wire.

    `index` is 0-based; `fault` is None or a `FaultKind`. For a garbled line `value` is None
    (nothing readable was sent); `ts` is the device time stamped on it.
    """

    index: int
    sensor: str
    value: float | None
    unit: str | None
    ts: float
    fault: FaultKind | None
    data: bytes


@dataclass(slots=True)
class _Cache:
    stream: SensorStream
    start: int = 0
    values: list[float | None] = field(default_factory=list)


class LineGenerator:
    """The lines of a device that samples `models` round-robin at `rate` readings per second.

    Line `i` (0-based) is a reading of `models[i % len(models)]` at signal time `i / rate`;
    `line(i, ts)` is None when that sensor dropped out. Line faults count lines 1-based: with
    `garble_every=N` lines N, 2N, ... are `GARBAGE_LINE`; with `nan_every=M` lines M, 2M, ...
    carry NaN (the first of garble, invalid_utf8, oversize, nan wins when several hit). Lines
    are best asked for in order: an earlier index recomputes the sensor from the start.
    """

    def __init__(
        self,
        models: Sequence[SensorModel],
        *,
        fmt: LineFormat = "json",
        rate: float = 10.0,
        seed: int = 0,
        garble_every: int | None = None,
        nan_every: int | None = None,
        faults: LineFaults | None = None,
    ) -> None:
        if not models:
            raise ValueError("at least one sensor model is needed")
        if len({m.name for m in models}) != len(models):
            raise ValueError("sensor names must be unique")
        if fmt not in LINE_FORMATS:
            raise ValueError(f"unknown line format {fmt!r}; use one of {', '.join(LINE_FORMATS)}")
        if not rate > 0 or math.isinf(rate):
            raise ValueError("rate must be > 0")
        faults = faults or LineFaults()
        if garble_every is not None:
            faults = _replace(faults, garble=LineFault(every=garble_every))
        if nan_every is not None:
            faults = _replace(faults, nan=LineFault(every=nan_every))
        self.models = list(models)
        self.fmt: LineFormat = fmt
        self.rate = rate
        self.seed = seed
        self.faults = faults
        self._plan = [
            (kind, f, _mix64((seed & _MASK64) ^ zlib.crc32(kind.encode())))
            for kind, f in faults.plan()
        ]
        n = len(self.models)
        self._caches = [
            _Cache(SensorStream(m, seed, dt=n / rate, t0=j / rate))
            for j, m in enumerate(self.models)
        ]
        self._templates = [_template(fmt, m) for m in self.models]

    @property
    def garble_every(self) -> int | None:
        return self.faults.garble.every

    @property
    def nan_every(self) -> int | None:
        return self.faults.nan.every

    def signal_time(self, index: int) -> float:
        """The signal time of line `index`."""
        return index / self.rate

    def index_at(self, t: float) -> int:
        """The first line whose signal time is >= t."""
        i = max(0, math.ceil(t * self.rate - 1e-9))
        while i > 0 and self.signal_time(i - 1) >= t:
            i -= 1
        while self.signal_time(i) < t:
            i += 1
        return i

    def value(self, index: int) -> float | None:
        """The value line `index` reports (None: a dropout), before any line fault."""
        n = len(self.models)
        cache = self._caches[index % n]
        k = index // n
        if k < cache.start:
            cache.stream.reset()
            cache.start, cache.values = 0, []
        while k >= cache.start + len(cache.values):
            cache.start += len(cache.values)
            skip = k - cache.start
            size = _BLOCK if skip < _BLOCK else skip + 1
            cache.values = cache.stream.next(size)
        return cache.values[k - cache.start]

    def fault(self, index: int) -> FaultKind | None:
        """The line fault that hits line `index`, if any."""
        number = index + 1
        for kind, f, key in self._plan:
            if f.every is not None and number % f.every == 0:
                return kind
            if f.probability and _uniform(key, index) < f.probability:
                return kind
        return None

    def line(self, index: int, ts: float) -> Line | None:
        """Line `index`, stamped with device time `ts` (epoch seconds); None for a dropout."""
        value = self.value(index)
        if value is None:
            return None
        m = self.models[index % len(self.models)]
        fault = self.fault(index) if self._plan else None
        if fault is None:
            return Line(index, m.name, value, m.unit, ts, None, self._format(index, value, ts))
        if fault == "garble":
            return Line(index, m.name, None, m.unit, ts, fault, GARBAGE_LINE)
        if fault == "nan":
            return Line(
                index, m.name, math.nan, m.unit, ts, fault, self._format(index, math.nan, ts)
            )
        data = self._format(index, value, ts)
        if fault == "invalid_utf8":
            data = data[:2] + INVALID_UTF8 + data[2:]
        else:  # oversize: spaces before the newline keep it a valid reading in every format
            data = data[:-1] + b" " * max(0, self.faults.oversize_length - len(data)) + b"\n"
        return Line(index, m.name, value, m.unit, ts, fault, data)

    def _format(self, index: int, value: float, ts: float) -> bytes:
        head, mid, tail, nan = self._templates[index % len(self.models)]
        number = nan if math.isnan(value) else repr(value)
        return f"{head}{number}{mid}{round(ts, 3)!r}{tail}".encode()


def _template(fmt: LineFormat, m: SensorModel) -> tuple[str, str, str, str]:
    """(head, mid, tail, nan): a line is head + value + mid + ts + tail, as `format_line`."""
    if fmt == "json":
        unit = f',"unit":"{m.unit}"' if m.unit is not None else ""
        return f'{{"sensor":"{m.name}","value":', f'{unit},"ts":', "}\n", "NaN"
    if fmt == "csv":
        return f"{m.name},", f",{m.unit or ''},", "\n", "nan"
    unit = f" unit={m.unit}" if m.unit is not None else ""
    return f"sensor={m.name} value=", f"{unit} ts=", "\n", "nan"


def _replace(faults: LineFaults, **changes: LineFault) -> LineFaults:
    values = {k: getattr(faults, k) for k in (*FAULT_KINDS, "oversize_length")}
    values.update(changes)
    return LineFaults(**values)


# --------------------------------------------------------------------------- ready-made sensors


def _peak(phase: float, period: float) -> float:
    """The `peak` of a `Diurnal` equal to `sin(2 pi t / period + phase)`."""
    return ((0.25 - phase / (2 * math.pi)) % 1.0) * period


@dataclass(frozen=True, slots=True)
class _Template:
    unit: str | None
    base: float
    amplitude: float
    period: float
    noise: float
    decimals: int = 2
    # A trapezoid excursion: (every, first start, height, duration); None for none.
    excursion: tuple[float, float, float, float] | None = None


_TEMPLATES: dict[str, _Template] = {
    # 21 +- 1.5 C, and every 60 s (first at 20 s) 12 s at up to +15 C: the demo's alert.
    "temp": _Template("C", 21.0, 1.5, 300.0, 0.05, 2, (60.0, 20.0, 15.0, 12.0)),
    "hum": _Template("%", 45.0, 5.0, 600.0, 0.3, 1, (90.0, 45.0, 30.0, 15.0)),
    "press": _Template("hPa", 1013.25, 2.0, 900.0, 0.1),
}
_GENERIC = _Template(None, 10.0, 1.0, 120.0, 0.1)


def model_for_name(name: str, position: int = 0) -> SensorModel:
    """A model for a sensor called `name`, from its prefix (`temp`, `hum`, `press`) if any.

    `position` staggers phases and excursions (7 s apart) so that sensors do not spike together.
    """
    t = next((t for p, t in _TEMPLATES.items() if name.startswith(p)), _GENERIC)
    excursions: tuple[Excursion, ...] = ()
    if t.excursion is not None:
        every, start, height, duration = t.excursion
        ramp = duration / 4  # up over the first quarter, full height over the middle half
        excursions = (
            Excursion(
                at=start + 7.0 * position,
                rise=ramp,
                hold=duration - 2 * ramp,
                fall=ramp,
                by=height,
                every=every,
            ),
        )
    return SensorModel(
        name=name,
        unit=t.unit,
        base=t.base,
        decimals=t.decimals,
        noise=t.noise,
        diurnal=Diurnal(t.amplitude, t.period, _peak(position * 0.7, t.period)),
        excursions=excursions,
    )


def default_models(n: int) -> list[SensorModel]:
    """`n` sensors: temp1, hum1, press1, temp2, hum2, press2, ..."""
    if n < 1:
        raise ValueError("at least one sensor is needed")
    kinds = list(_TEMPLATES)
    names = [f"{kinds[i % len(kinds)]}{i // len(kinds) + 1}" for i in range(n)]
    return [model_for_name(name, i) for i, name in enumerate(names)]


def parse_sensors(spec: str) -> list[SensorModel]:
    """Models from a CLI spec: a count (`3`) or comma-separated names (`temp1,hum1,door`)."""
    spec = spec.strip()
    if spec.isdigit():
        return default_models(int(spec))
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if not names:
        raise ValueError("give a number of sensors or a comma-separated list of names")
    if len(set(names)) != len(names):
        raise ValueError("sensor names must be unique")
    return [model_for_name(name, i) for i, name in enumerate(names)]


# --------------------------------------------------------------------------- rates and windows

_RATE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(?:/\s*(ms|s|sec|m|min|h))?\s*$")
_PER = {"ms": 1e-3, "s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


def parse_rate(value: str | float) -> float:
    """Readings per second from `20000`, `10/s`, `1/min`, `30/h` (a bare number is per second)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        rate = float(value)
    else:
        m = _RATE.match(str(value).lower())
        if m is None:
            raise ValueError(f"{value!r} is not a rate; write it as 20000, 10/s, 1/min or 30/h")
        rate = float(m.group(1)) / _PER[m.group(2) or "s"]
    if not rate > 0 or math.isinf(rate):
        raise ValueError("a rate must be > 0")
    return rate


@dataclass(frozen=True, slots=True)
class Recurring:
    """A stretch of signal time [at, at + duration), repeated every `every` s if set."""

    at: float
    duration: float
    every: float | None = None

    def __post_init__(self) -> None:
        if self.at < 0 or self.duration < 0:
            raise ValueError("at and duration must be >= 0")
        if self.every is not None and self.every <= self.duration:
            raise ValueError("every must be longer than duration")

    def window(self, t: float) -> tuple[float, float] | None:
        """The occurrence that contains t, if any."""
        if t < self.at:
            return None
        start = self.at
        if self.every is not None:
            start += math.floor((t - self.at) / self.every) * self.every
        return (start, start + self.duration) if t < start + self.duration else None

    def next_start(self, t: float) -> float | None:
        """The first start >= t, if any."""
        if t <= self.at:
            return self.at
        if self.every is None:
            return None
        return self.at + math.ceil((t - self.at) / self.every) * self.every
