"""Simulator profiles: a YAML file of sensors, faults, pacing and output (config/simulator.yaml).

`load_profile(path)` returns a validated `Profile` or raises `agent.config.ConfigError` with
every problem at once, each as `FILE:LINE:COL: path.to.field: message`, the same machinery
and messages as the agent's own config. The models here are only the file's shape; `build_*`
turn them into the runtime objects of `simulator.signals`.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BeforeValidator, Field, ValidationError, field_validator, model_validator

from agent.units import ByteSize, Duration, StrictModel, parse_duration
from agent.yamlconfig import ConfigIssue, Positions, parse_yaml, read_yaml_text
from simulator.signals import (
    ClockStep,
    DeviceClock,
    Diurnal,
    Dropouts,
    Excursion,
    LineFault,
    LineFaults,
    Recurring,
    SensorModel,
    Spikes,
    Steps,
    Stuck,
    Walk,
    check_name,
    default_models,
    parse_rate,
)


def _signed_duration(value: Any) -> float:
    """A duration that may be negative: `-90s`, `+1h`, `-0.5`."""
    if isinstance(value, str):
        text = value.strip()
        if text[:1] in "+-":
            seconds = parse_duration(text[1:])
            return -seconds if text[0] == "-" else seconds
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return parse_duration(value)


def _epoch(value: Any) -> Any:
    """Epoch seconds from a number or an ISO-8601 text (naive is UTC)."""
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.strip())
        except ValueError:
            raise ValueError(f"{value!r} is not epoch seconds or an ISO-8601 time") from None
        return (parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)).timestamp()
    return value


SignedDuration = Annotated[float, BeforeValidator(_signed_duration)]
Rate = Annotated[float, BeforeValidator(parse_rate)]
Epoch = Annotated[float, BeforeValidator(_epoch)]


# --------------------------------------------------------------------------- sensors


class DiurnalConfig(StrictModel):
    """A sine around `base`: its amplitude, its period, and when in the period it peaks."""

    amplitude: float
    period: Duration = 86400.0
    peak: Duration = 0.0


class WalkConfig(StrictModel):
    """A random walk: `sigma` per square-root second; `revert` per second pulls it back."""

    sigma: float = Field(ge=0)
    revert: float = Field(default=0.0, ge=0)


class StepsConfig(StrictModel):
    """Step changes at random moments, on average one `every`, each of N(0, size)."""

    every: Duration = Field(gt=0)
    size: float


class SpikesConfig(StrictModel):
    """Single-reading spikes of +-height, on average one `every`."""

    every: Duration = Field(gt=0)
    height: float


class StuckConfig(StrictModel):
    """The value freezes for `duration`, on average once `every`."""

    every: Duration = Field(gt=0)
    duration: Duration = Field(gt=0)


class DropoutsConfig(StrictModel):
    """Readings never sent: each with `probability`, and/or silences of `duration`."""

    probability: float = Field(default=0.0, ge=0, lt=1)
    every: Duration | None = Field(default=None, gt=0)
    duration: Duration = 0.0

    @model_validator(mode="after")
    def _complete(self) -> DropoutsConfig:
        if self.every is not None and self.duration <= 0:
            raise ValueError("dropouts with `every` need a `duration` longer than 0s")
        return self


class ExcursionConfig(StrictModel):
    """A scripted excursion: at `at`, over `rise`, to the level `to` (or by `by`), `hold`,
    back over `fall` (default: `rise`); again every `every` if set."""

    at: Duration
    rise: Duration
    hold: Duration = 0.0
    fall: Duration | None = None
    to: float | None = None
    by: float | None = None
    every: Duration | None = None

    def build(self) -> Excursion:
        return Excursion(
            at=self.at,
            rise=self.rise,
            hold=self.hold,
            fall=self.rise if self.fall is None else self.fall,
            to=self.to,
            by=self.by,
            every=self.every,
        )

    @model_validator(mode="after")
    def _valid(self) -> ExcursionConfig:
        self.build()
        return self


class SensorConfig(StrictModel):
    """One simulated sensor: a base value and the ingredients of its signal."""

    name: str
    unit: str | None = None
    base: float = 20.0
    decimals: int = Field(default=2, ge=0, le=12)
    noise: float = Field(default=0.0, ge=0)
    drift: float = 0.0
    diurnal: DiurnalConfig | None = None
    walk: WalkConfig | None = None
    steps: StepsConfig | None = None
    spikes: SpikesConfig | None = None
    stuck: StuckConfig | None = None
    dropouts: DropoutsConfig | None = None
    excursions: list[ExcursionConfig] = []

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        check_name(name)
        return name

    def build(self) -> SensorModel:
        d, w, s = self.diurnal, self.walk, self.steps
        sp, st, do = self.spikes, self.stuck, self.dropouts
        return SensorModel(
            name=self.name,
            unit=self.unit,
            base=self.base,
            decimals=self.decimals,
            noise=self.noise,
            drift=self.drift,
            diurnal=Diurnal(d.amplitude, d.period, d.peak) if d else None,
            walk=Walk(w.sigma, w.revert) if w else None,
            steps=Steps(s.every, s.size) if s else None,
            spikes=Spikes(sp.every, sp.height) if sp else None,
            stuck=Stuck(st.every, st.duration) if st else None,
            dropouts=Dropouts(do.probability, do.every, do.duration) if do else None,
            excursions=tuple(e.build() for e in self.excursions),
        )

    @model_validator(mode="after")
    def _valid(self) -> SensorConfig:
        self.build()
        return self


# --------------------------------------------------------------------------- faults


class LineFaultConfig(StrictModel):
    """Which lines a fault hits: every Nth line (1-based), and/or each with a probability."""

    every: int | None = Field(default=None, ge=1)
    probability: float = Field(default=0.0, ge=0, le=1)


class OversizeConfig(LineFaultConfig):
    """Over-long lines: a valid reading padded with spaces to `length` bytes."""

    length: ByteSize = Field(default=4096, ge=2)


class WindowConfig(StrictModel):
    """A stretch of the run: from `at`, for `duration`, again every `every` if set."""

    at: Duration
    duration: Duration
    every: Duration | None = None

    def build(self) -> Recurring:
        return Recurring(self.at, self.duration, self.every)

    @model_validator(mode="after")
    def _valid(self) -> WindowConfig:
        self.build()
        return self


class SkewConfig(StrictModel):
    """The device clock is off by `offset` and runs `drift_ppm` fast (negative: slow)."""

    offset: SignedDuration = 0.0
    drift_ppm: float = 0.0


class ClockStepConfig(StrictModel):
    """At `at` the device clock jumps by `by` (negative: backwards)."""

    at: Duration
    by: SignedDuration


class FaultsConfig(StrictModel):
    """Faults on demand (see config/simulator.yaml)."""

    garble: LineFaultConfig | None = None
    invalid_utf8: LineFaultConfig | None = None
    oversize: OversizeConfig | None = None
    nan: LineFaultConfig | None = None
    outage: list[WindowConfig] = []
    burst: list[WindowConfig] = []
    skew: SkewConfig | None = None
    clock_step: list[ClockStepConfig] = []


LIST_FAULTS = ("outage", "burst", "clock_step")
FAULT_NAMES = tuple(FaultsConfig.model_fields)


# --------------------------------------------------------------------------- outputs


class SerialOutputConfig(StrictModel):
    """A virtual serial port (a pty); its path is printed as `PORT /dev/pts/N`."""

    type: Literal["serial"]
    link: Path | None = None
    drain_timeout: Duration = 5.0
    outage_drain: Duration = 0.5
    wait_open: bool = False


class MqttOutputConfig(StrictModel):
    """Publish each reading to an MQTT broker."""

    type: Literal["mqtt"]
    url: str = "mqtt://127.0.0.1:1883"
    topic: str = "sensors/{sensor}"
    device: str = "sim"
    payload: Literal["line", "number"] = "line"
    qos: Literal[0, 1, 2] = 1
    retain: bool = False
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    keepalive: Duration = 30.0
    max_pending: int = Field(default=10_000, ge=1)

    @model_validator(mode="after")
    def _valid(self) -> MqttOutputConfig:
        from simulator.outputs import check_mqtt

        check_mqtt(self.url, self.topic, self.payload)
        return self


class StdoutOutputConfig(StrictModel):
    """Lines on standard output (messages go to stderr)."""

    type: Literal["stdout"]


OutputConfig = Annotated[
    Union[SerialOutputConfig, MqttOutputConfig, StdoutOutputConfig],  # noqa: UP007
    Field(discriminator="type"),
]


# --------------------------------------------------------------------------- the profile


class Profile(StrictModel):
    """A whole simulator profile."""

    seed: int = 0
    rate: Rate = 10.0
    realtime: bool = True
    count: int | None = Field(default=None, ge=0)
    duration: Duration | None = None
    start_time: Epoch | None = None
    format: Literal["json", "csv", "kv"] = "json"
    sensors: list[SensorConfig] = []
    faults: FaultsConfig = FaultsConfig()
    output: OutputConfig = SerialOutputConfig(type="serial")
    record: Path | None = None

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        if self.count is not None and self.duration is not None:
            raise ValueError("give count or duration, not both")
        return self


# --------------------------------------------------------------------------- runtime objects


@dataclass(frozen=True, slots=True)
class Timeline:
    """The timed faults of a run, in signal time."""

    outages: tuple[Recurring, ...] = ()
    bursts: tuple[Recurring, ...] = ()


def build_models(profile: Profile) -> list[SensorModel]:
    """The sensors of a profile; with none listed, three ready-made ones (temp1, hum1, press1)."""
    return [s.build() for s in profile.sensors] if profile.sensors else default_models(3)


def build_line_faults(faults: FaultsConfig) -> LineFaults:
    """The line faults of a profile."""

    def one(cfg: LineFaultConfig | None) -> LineFault:
        return LineFault() if cfg is None else LineFault(cfg.every, cfg.probability)

    return LineFaults(
        garble=one(faults.garble),
        invalid_utf8=one(faults.invalid_utf8),
        oversize=one(faults.oversize),
        nan=one(faults.nan),
        oversize_length=faults.oversize.length if faults.oversize else 4096,
    )


def build_clock(faults: FaultsConfig) -> DeviceClock:
    """The device clock of a profile: skew and clock steps."""
    skew = faults.skew
    return DeviceClock(
        offset=skew.offset if skew else 0.0,
        drift_ppm=skew.drift_ppm if skew else 0.0,
        steps=tuple(ClockStep(s.at, s.by) for s in sorted(faults.clock_step, key=lambda s: s.at)),
    )


def build_timeline(faults: FaultsConfig) -> Timeline:
    """The outages and bursts of a profile."""
    return Timeline(
        outages=tuple(w.build() for w in faults.outage),
        bursts=tuple(w.build() for w in faults.burst),
    )


# --------------------------------------------------------------------------- loading


def _cross_checks(profile: Profile, pos: Positions) -> list[ConfigIssue]:
    issues = []
    seen: set[str] = set()
    for i, sensor in enumerate(profile.sensors):
        if sensor.name in seen:
            issues.append(pos.issue(("sensors", i, "name"), f"duplicate sensor {sensor.name!r}"))
        seen.add(sensor.name)
    return issues


def parse_profile(text: str, file: str = "<profile>") -> Profile:
    """Validate profile text; raise ConfigError with every problem found."""
    shape = "the file must be a mapping (seed, rate, sensors, ...)"
    return parse_yaml(text, file, Profile, _cross_checks, shape=shape)


def load_profile(path: str | Path) -> Profile:
    """Read and validate a profile file."""
    return parse_profile(read_yaml_text(path), str(path))


# --------------------------------------------------------------------------- --fault options


def parse_fault_option(spec: str) -> tuple[str, dict[str, Any]]:
    """`KIND[:key=value,...]` (the keys of the profile's `faults.KIND`) as (kind, settings).

    `garble:every=50`, `outage:at=10s,duration=3s`, `clock_step:at=20s,by=-1h`,
    `skew:offset=90s`. Values read as YAML scalars (numbers stay numbers).
    """
    kind, _, rest = spec.strip().partition(":")
    kind = kind.strip().replace("-", "_")
    if kind not in FAULT_NAMES:
        close = difflib.get_close_matches(kind, FAULT_NAMES, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"use one of {', '.join(FAULT_NAMES)}"
        raise ValueError(f"unknown fault {kind!r} ({hint})")
    settings: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = part.partition("=")
        if not eq or not key.strip():
            raise ValueError(f"{spec!r}: write settings as key=value, e.g. {kind}:every=100")
        settings[key.strip()] = yaml.safe_load(value.strip()) if value.strip() else None
    return kind, settings


def with_faults(profile: Profile, specs: list[str]) -> Profile:
    """The profile with `--fault` options added (list faults appended, others replaced)."""
    if not specs:
        return profile
    faults = {k: v for k, v in profile.faults.model_dump().items() if v not in (None, [])}
    for spec in specs:
        kind, settings = parse_fault_option(spec)
        if kind in LIST_FAULTS:
            faults.setdefault(kind, []).append(settings)
        else:
            faults[kind] = settings
    try:
        merged = FaultsConfig.model_validate(faults)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            problems.append(f"{where}: {str(err['msg']).removeprefix('Value error, ')}")
        raise ValueError("; ".join(problems)) from None
    return profile.model_copy(update={"faults": merged})
