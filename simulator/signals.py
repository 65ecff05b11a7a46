"""Seeded sensor signal models and the line formats a simulated device sends.

Everything here is pure and deterministic: a `Signal` is a function of (model, seed, t), and a
`LineGenerator` is a function of (models, seed, line index, device time), so the same seed
gives the same readings on every run and in every process.

A signal is `base + amplitude * sin(2*pi*t/period + phase) + noise + excursion(t)`. The
excursion is a trapezoid of height `excursion_height` lasting `excursion_duration` seconds,
repeated every `excursion_every` seconds from `excursion_start`: it ramps up over the first
quarter, holds its full height over the middle half and ramps down over the last quarter, so a
demo crosses an alert threshold on purpose and stays above it long enough to be seen.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

LineFormat = Literal["json", "csv"]
LINE_FORMATS: tuple[LineFormat, ...] = ("json", "csv")

#: What a `garble` fault sends instead of a reading: no decoder can make a reading of it.
GARBAGE_LINE = b"#$%^&*\n"

_MASK64 = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class SensorModel:
    """How one simulated sensor behaves. Times are in seconds of signal time."""

    name: str
    unit: str | None = None
    base: float = 20.0
    amplitude: float = 0.0
    period: float = 60.0
    phase: float = 0.0  # radians
    noise: float = 0.0  # sigma of the Gaussian noise
    excursion_every: float | None = None  # None: no excursions
    excursion_start: float = 0.0  # signal time of the first excursion
    excursion_height: float = 0.0
    excursion_duration: float = 0.0
    decimals: int = 2  # what the device rounds to on the wire

    def __post_init__(self) -> None:
        if not self.name or any(c in self.name for c in ',\n"'):
            raise ValueError(f'sensor name {self.name!r} must be non-empty, without , " or newline')
        if self.period <= 0:
            raise ValueError("period must be > 0")
        if self.noise < 0:
            raise ValueError("noise must be >= 0")
        if self.excursion_every is not None:
            if self.excursion_every <= 0:
                raise ValueError("excursion_every must be > 0")
            if not 0 < self.excursion_duration <= self.excursion_every:
                raise ValueError("excursion_duration must be > 0 and <= excursion_every")

    def excursion_window(self, k: int) -> tuple[float, float]:
        """The k-th excursion's [start, end) in signal time (k >= 0)."""
        if self.excursion_every is None:
            raise ValueError(f"sensor {self.name} has no excursions")
        start = self.excursion_start + k * self.excursion_every
        return start, start + self.excursion_duration


def _mix64(x: int) -> int:
    """splitmix64's finalizer: a fast, well-spread 64-bit hash."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Signal:
    """The deterministic value of one sensor at any signal time, for a given seed.

    Noise is a hash of (seed, sensor name, t in microseconds), not a stateful random stream,
    so `value_at` can be called for any t in any order and always gives the same answer.
    """

    __slots__ = ("_key", "model", "seed")

    def __init__(self, model: SensorModel, seed: int = 0) -> None:
        self.model = model
        self.seed = seed
        self._key = _mix64((seed & _MASK64) ^ _mix64(zlib.crc32(model.name.encode())))

    def excursion_at(self, t: float) -> float:
        """The excursion's contribution at t: 0 outside its windows, up to excursion_height."""
        m = self.model
        if m.excursion_every is None or t < m.excursion_start:
            return 0.0
        into = (t - m.excursion_start) % m.excursion_every
        if into >= m.excursion_duration:
            return 0.0
        ramp = m.excursion_duration / 4
        if into < ramp:
            return m.excursion_height * into / ramp
        if into > m.excursion_duration - ramp:
            return m.excursion_height * (m.excursion_duration - into) / ramp
        return m.excursion_height

    def noise_at(self, t: float) -> float:
        """Gaussian noise (sigma = model.noise) at t, by Box-Muller over two hashed uniforms."""
        if self.model.noise == 0:
            return 0.0
        h1 = _mix64(self._key ^ (round(t * 1e6) & _MASK64))
        h2 = _mix64(h1)
        u1 = ((h1 >> 11) + 1) * 2.0**-53  # (0, 1]: log never sees 0
        u2 = (h2 >> 11) * 2.0**-53
        return self.model.noise * math.sqrt(-2.0 * math.log(u1)) * math.cos(2 * math.pi * u2)

    def value_at(self, t: float) -> float:
        """The sensor's value at signal time t (seconds), before rounding."""
        m = self.model
        wave = m.amplitude * math.sin(2 * math.pi * t / m.period + m.phase) if m.amplitude else 0.0
        return m.base + wave + self.noise_at(t) + self.excursion_at(t)

    def values(self, times: Sequence[float]) -> list[float]:
        """`value_at` for each of `times`."""
        return [self.value_at(t) for t in times]


# --- line formats: these match the agent's decoders byte for byte ---------------------------


def format_json(sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """`{"sensor":"temp1","value":21.53,"unit":"C","ts":1764170000.123}\\n`, unit omitted if None.

    A NaN value is written as the bare token `NaN`, as many devices (and Python) do.
    """
    obj: dict[str, object] = {"sensor": sensor, "value": value}
    if unit is not None:
        obj["unit"] = unit
    obj["ts"] = round(ts, 3)
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


def format_csv(sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """`temp1,21.53,C,1764170000.123\\n` (sensor,value,unit,ts); an empty unit if None."""
    number = "nan" if math.isnan(value) else repr(value)
    return f"{sensor},{number},{unit or ''},{round(ts, 3)!r}\n".encode()


def format_line(fmt: LineFormat, sensor: str, value: float, unit: str | None, ts: float) -> bytes:
    """One reading as a line in `fmt`."""
    if fmt == "json":
        return format_json(sensor, value, unit, ts)
    if fmt == "csv":
        return format_csv(sensor, value, unit, ts)
    raise ValueError(f"unknown line format {fmt!r}; use one of {', '.join(LINE_FORMATS)}")


@dataclass(frozen=True, slots=True)
class Line:
    """One line a simulated device sends: the reading it stands for and the bytes on the wire.

    `index` is 0-based; `fault` is None, `"garble"` or `"nan"`. For a garbled line `value` is
    None (nothing readable was sent).
    """

    index: int
    sensor: str
    value: float | None
    unit: str | None
    ts: float
    fault: Literal["garble", "nan"] | None
    data: bytes


class LineGenerator:
    """The lines of a device that samples `models` round-robin at `rate` readings per second.

    Line `i` (0-based) is a reading of `models[i % len(models)]` at signal time `i / rate`.
    Faults count lines 1-based: with `garble_every=N` lines N, 2N, ... are `GARBAGE_LINE`;
    with `nan_every=M` lines M, 2M, ... carry NaN as their value (garble wins when both hit).
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
    ) -> None:
        if not models:
            raise ValueError("at least one sensor model is needed")
        if len({m.name for m in models}) != len(models):
            raise ValueError("sensor names must be unique")
        if fmt not in LINE_FORMATS:
            raise ValueError(f"unknown line format {fmt!r}; use one of {', '.join(LINE_FORMATS)}")
        if rate <= 0:
            raise ValueError("rate must be > 0")
        for name, every in (("garble_every", garble_every), ("nan_every", nan_every)):
            if every is not None and every < 1:
                raise ValueError(f"{name} must be >= 1")
        self.signals = [Signal(m, seed) for m in models]
        self.fmt: LineFormat = fmt
        self.rate = rate
        self.seed = seed
        self.garble_every = garble_every
        self.nan_every = nan_every

    def signal_time(self, index: int) -> float:
        """The signal time of line `index`."""
        return index / self.rate

    def line(self, index: int, ts: float) -> Line:
        """Line `index`, stamped with device time `ts` (epoch seconds)."""
        signal = self.signals[index % len(self.signals)]
        m = signal.model
        number = index + 1
        if self.garble_every and number % self.garble_every == 0:
            return Line(index, m.name, None, m.unit, ts, "garble", GARBAGE_LINE)
        if self.nan_every and number % self.nan_every == 0:
            value = math.nan
            fault: Literal["nan"] | None = "nan"
        else:
            value = round(signal.value_at(self.signal_time(index)), m.decimals)
            fault = None
        data = format_line(self.fmt, m.name, value, m.unit, ts)
        return Line(index, m.name, value, m.unit, ts, fault, data)


# --- ready-made sensors ---------------------------------------------------------------------

_TEMPLATES: dict[str, SensorModel] = {
    "temp": SensorModel(
        name="temp",
        unit="C",
        base=21.0,
        amplitude=1.5,
        period=300.0,
        noise=0.05,
        excursion_every=60.0,
        excursion_start=20.0,
        excursion_height=15.0,
        excursion_duration=12.0,
        decimals=2,
    ),
    "hum": SensorModel(
        name="hum",
        unit="%",
        base=45.0,
        amplitude=5.0,
        period=600.0,
        noise=0.3,
        excursion_every=90.0,
        excursion_start=45.0,
        excursion_height=30.0,
        excursion_duration=15.0,
        decimals=1,
    ),
    "press": SensorModel(
        name="press", unit="hPa", base=1013.25, amplitude=2.0, period=900.0, noise=0.1
    ),
}
_GENERIC = SensorModel(name="value", unit=None, base=10.0, amplitude=1.0, period=120.0, noise=0.1)


def model_for_name(name: str, position: int = 0) -> SensorModel:
    """A model for a sensor called `name`, from its prefix (`temp`, `hum`, `press`) if any.

    `position` staggers excursions (7 s apart) so that several sensors do not spike together.
    """
    template = next((t for p, t in _TEMPLATES.items() if name.startswith(p)), _GENERIC)
    return SensorModel(
        name=name,
        unit=template.unit,
        base=template.base,
        amplitude=template.amplitude,
        period=template.period,
        phase=position * 0.7,
        noise=template.noise,
        excursion_every=template.excursion_every,
        excursion_start=template.excursion_start + 7.0 * position,
        excursion_height=template.excursion_height,
        excursion_duration=template.excursion_duration,
        decimals=template.decimals,
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
