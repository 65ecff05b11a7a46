"""The agent's YAML configuration: models, loading, and errors people can act on.

`load_config(path)` returns a validated `AgentConfig` or raises `ConfigError` carrying every
problem at once, each as `FILE:LINE:COL: path.to.field: message`. Positions come from PyYAML's
node marks (`yaml.compose`), so an error points at the line a person has to edit.
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from agent.units import ByteSize, Duration, StrictModel

# --------------------------------------------------------------------------- models


class AgentSection(StrictModel):
    """Who this agent is and where it keeps its state."""

    name: str = "edge-agent"
    data_dir: Path = Path("/var/lib/edge-agent")
    shutdown_timeout: Duration = 10.0
    status_interval: Duration = 2.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"


class LogConfig(StrictModel):
    """The SQLite event log: durability, group commit and bounds."""

    synchronous: Literal["full", "normal"] = "full"
    commit_interval: Duration = 0.1
    max_batch: int = Field(default=10_000, ge=1)
    queue_size: int = Field(default=50_000, ge=1)
    quota: ByteSize = 512 * 1024**2
    max_age: Duration = 30 * 86400.0
    retention_interval: Duration = 30.0


class SerialInputConfig(StrictModel):
    """A sensor on a serial port, one reading (or a JSON list of them) per line."""

    type: Literal["serial"]
    name: str
    port: str
    baudrate: int = Field(default=115200, gt=0)
    format: Literal["json", "csv"] = "json"
    csv_columns: list[str] = ["sensor", "value", "unit", "time"]
    max_line: ByteSize = Field(default=1024, ge=16, le=1024**2)
    terminator: str = "\n"
    reconnect_initial: Duration = 0.5
    reconnect_max: Duration = 30.0
    sensor_prefix: str = ""

    @model_validator(mode="after")
    def _columns_known(self) -> SerialInputConfig:
        allowed = {"sensor", "value", "unit", "time", "-"}
        unknown = [c for c in self.csv_columns if c not in allowed]
        if unknown:
            raise ValueError(f"csv_columns: unknown column {unknown[0]!r}; use {sorted(allowed)}")
        named = [c for c in self.csv_columns if c != "-"]
        if len(set(named)) != len(named):
            raise ValueError("csv_columns: a column name appears twice")
        if "sensor" not in self.csv_columns or "value" not in self.csv_columns:
            raise ValueError("csv_columns must name a 'sensor' and a 'value' column")
        if not self.terminator:
            raise ValueError("terminator cannot be empty")
        return self


class SimSensorConfig(StrictModel):
    """One simulated sensor: a sine around `base` plus gaussian noise."""

    name: str
    unit: str | None = None
    base: float = 20.0
    amplitude: float = 5.0
    period: Duration = 60.0
    noise: float = 0.1


class SimulatedInputConfig(StrictModel):
    """An in-process simulated input (demos, benchmarks); rate <= 0 means as fast as possible."""

    type: Literal["simulated"]
    name: str
    rate: float = 1.0
    sensors: list[SimSensorConfig]
    seed: int | None = None
    count: int | None = None
    batch_max: int = Field(default=1000, ge=1)


class MqttInputConfig(StrictModel):
    """Readings from an MQTT broker, acknowledged only after they are committed to the log."""

    type: Literal["mqtt"]
    name: str
    url: str = "mqtt://127.0.0.1:1883"
    topics: list[str] = ["sensors/#"]
    topic_template: str = "sensors/{sensor}"
    format: Literal["json", "number", "csv"] = "json"
    qos: Literal[0, 1] = 1
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: Duration = 30.0
    max_payload: ByteSize = 65536
    reconnect_initial: Duration = 0.5
    reconnect_max: Duration = 30.0


InputConfig = Annotated[
    Union[SerialInputConfig, SimulatedInputConfig, MqttInputConfig],  # noqa: UP007
    Field(discriminator="type"),
]


class WindowConfig(StrictModel):
    """A tumbling window per sensor, on monotonic time, appended to the `aggregates` stream."""

    name: str
    sensors: str = "*"
    size: Duration = 60.0
    function: Literal["mean"] = "mean"

    @field_validator("size")
    @classmethod
    def _size_positive(cls, size: float) -> float:
        if size <= 0:
            raise ValueError("size must be longer than 0s")
        return size


class RuleConfig(StrictModel):
    """A threshold with hysteresis on a window's output: raise above `above`, clear below."""

    name: str
    window: str
    sensors: str = "*"
    above: float
    clear_below: float | None = None
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _hysteresis(self) -> RuleConfig:
        if self.clear_below is not None and self.clear_below > self.above:
            raise ValueError("clear_below must not be above 'above' (hysteresis runs downwards)")
        return self


class ProcessingConfig(StrictModel):
    """On-device processing: windows over readings and rules over windows."""

    windows: list[WindowConfig] = []
    rules: list[RuleConfig] = []


class HttpUpstreamConfig(StrictModel):
    """A cloud ingestion endpoint that takes JSON batches over HTTP(S)."""

    type: Literal["http"]
    name: str
    url: str
    token: str | None = None
    streams: list[Literal["readings", "aggregates", "alerts", "agent", "deadletter"]] = [
        "alerts",
        "agent",
        "aggregates",
        "readings",
        "deadletter",
    ]
    batch_size: int = Field(default=500, ge=1, le=100_000)
    linger: Duration = 0.2
    timeout: Duration = 10.0
    gzip: bool = True
    ca_file: Path | None = None
    backoff_initial: Duration = 0.5
    backoff_max: Duration = 60.0

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("url must start with http:// or https://")
        return url


UpstreamConfig = Annotated[Union[HttpUpstreamConfig], Field(discriminator="type")]  # noqa: UP007


class AgentConfig(StrictModel):
    """The whole configuration file."""

    agent: AgentSection = AgentSection()
    log: LogConfig = LogConfig()
    inputs: list[InputConfig] = []
    processing: ProcessingConfig = ProcessingConfig()
    upstreams: list[UpstreamConfig] = []

    @property
    def log_path(self) -> Path:
        """Where the event log lives: `<data_dir>/events.db`."""
        return self.agent.data_dir / "events.db"


# --------------------------------------------------------------------------- loading


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    """One problem in a config file, with the position a person has to look at."""

    file: str
    line: int
    column: int
    path: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}: " if self.path else ""
        return f"{self.file}:{self.line}:{self.column}: {where}{self.message}"


class ConfigError(Exception):
    """The config file cannot be used; `issues` lists every problem found."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
Loc = tuple[str | int, ...]


class _Positions:
    """YAML marks of every value and key, by path in the document."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.values: dict[Loc, tuple[int, int]] = {}
        self.keys: dict[Loc, tuple[int, int]] = {}

    def issue(self, loc: Loc, message: str, *, key: bool = False) -> ConfigIssue:
        table = self.keys if key else self.values
        probe = loc
        while probe not in table and probe:
            probe = probe[:-1]
        line, col = table.get(probe, self.values.get((), (0, 0)))
        return ConfigIssue(self.file, line + 1, col + 1, _dotted(loc), message)


def _dotted(loc: Loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _build(node: Node, loc: Loc, pos: _Positions, issues: list[ConfigIssue]) -> Any:
    """Plain Python data from a composed YAML node, recording marks and substituting ${ENV}."""
    pos.values[loc] = (node.start_mark.line, node.start_mark.column)
    if isinstance(node, MappingNode):
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value)
            if key in out:
                mark = key_node.start_mark
                issues.append(
                    ConfigIssue(
                        pos.file,
                        mark.line + 1,
                        mark.column + 1,
                        _dotted((*loc, key)),
                        f"duplicate key {key!r}",
                    )
                )
            pos.keys[(*loc, key)] = (key_node.start_mark.line, key_node.start_mark.column)
            out[key] = _build(value_node, (*loc, key), pos, issues)
        return out
    if isinstance(node, SequenceNode):
        return [_build(item, (*loc, i), pos, issues) for i, item in enumerate(node.value)]
    assert isinstance(node, ScalarNode)
    try:
        value = SafeConstructor().construct_object(node)
    except ConstructorError as exc:
        issues.append(pos.issue(loc, f"cannot read this value: {exc.problem}"))
        return None
    if isinstance(value, str) and "${" in value:
        value = _substitute(value, loc, pos, issues)
    return value


def _substitute(text: str, loc: Loc, pos: _Positions, issues: list[ConfigIssue]) -> str:
    def one(m: re.Match[str]) -> str:
        name, default = m.group(1), m.group(2)
        found = os.environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        issues.append(
            pos.issue(
                loc,
                f"environment variable {name} is not set "
                f"(hint: export {name}=..., or write ${{{name}:-default}})",
            )
        )
        return ""

    return _ENV.sub(one, text)


def _model_at(model: Any, loc: Loc, data: Any) -> Any:
    """The pydantic model class that describes the mapping at `loc`, for 'did you mean' hints."""
    current: Any = model
    for part in loc:
        data = _step(data, part)
        if isinstance(part, str):
            fields = getattr(current, "model_fields", None)
            if fields is None or part not in fields:
                return None
            current = _strip(fields[part].annotation)
        elif get_origin(current) is list:
            current = _strip(get_args(current)[0])
        else:
            return None
        if get_origin(current) is Union and isinstance(data, dict):
            # A discriminated union: the member is the one whose `type` the data names.
            members = [m for m in get_args(current) if _tag_of(m) == data.get("type")]
            current = members[0] if members else None
    return current


def _strip(annotation: Any) -> Any:
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    return annotation


def _tags(union: Any) -> tuple[str, ...]:
    return tuple(str(_tag_of(m)) for m in get_args(_strip(union)))


def _tag_of(model: Any) -> Any:
    field = getattr(model, "model_fields", {}).get("type")
    return get_args(field.annotation)[0] if field is not None else None


_TAGS = {"inputs": _tags(InputConfig), "upstreams": _tags(UpstreamConfig)}


def _step(data: Any, part: str | int) -> Any:
    if isinstance(data, dict) and isinstance(part, str):
        return data.get(part)
    if isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
        return data[part]
    return None


def _strip_union_tags(loc: Loc, data: Any) -> Loc:
    """Drop the discriminator values pydantic puts in a union member's error location."""
    out: list[str | int] = []
    current = data
    for part in loc:
        if (
            isinstance(current, dict)
            and isinstance(part, str)
            and part not in current
            and current.get("type") == part
        ):
            continue
        out.append(part)
        current = _step(current, part)
    return tuple(out)


def _from_validation(exc: ValidationError, data: Any, pos: _Positions) -> list[ConfigIssue]:
    issues = []
    for err in exc.errors():
        loc = _strip_union_tags(tuple(err["loc"]), data)
        kind = err["type"]
        msg = str(err["msg"]).removeprefix("Value error, ")
        if kind == "extra_forbidden":
            model = _model_at(AgentConfig, loc[:-1], data)
            known = list(getattr(model, "model_fields", {}))
            close = difflib.get_close_matches(str(loc[-1]), known, n=1)
            hint = f"did you mean {close[0]!r}?" if close else f"known keys: {', '.join(known)}"
            issues.append(pos.issue(loc, f"unknown key ({hint})", key=True))
        elif kind == "missing":
            issues.append(pos.issue(loc, "required field is missing"))
        elif kind == "union_tag_invalid":
            issues.append(pos.issue((*loc, "type"), msg))
        elif kind == "union_tag_not_found":
            tags = ", ".join(_TAGS.get(str(loc[0]), ())) if loc else ""
            issues.append(pos.issue(loc, f"needs a 'type' key, one of: {tags}"))
        else:
            issues.append(pos.issue(loc, msg))
    return issues


def _cross_checks(cfg: AgentConfig, pos: _Positions) -> list[ConfigIssue]:
    issues = []
    for section, items in (("inputs", cfg.inputs), ("upstreams", cfg.upstreams)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                issues.append(pos.issue((section, i, "name"), f"duplicate name {item.name!r}"))
            seen.add(item.name)
    windows = {w.name for w in cfg.processing.windows}
    for i, rule in enumerate(cfg.processing.rules):
        if rule.window not in windows:
            hint = f"known windows: {', '.join(sorted(windows)) or 'none'}"
            issues.append(
                pos.issue(
                    ("processing", "rules", i, "window"),
                    f"no window named {rule.window!r} ({hint})",
                )
            )
    return issues


def parse_config(text: str, file: str = "<config>") -> AgentConfig:
    """Validate config text; raise ConfigError with every problem found."""
    pos = _Positions(file)
    issues: list[ConfigIssue] = []
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line, col = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = f"not valid YAML: {exc.problem}"
        raise ConfigError([ConfigIssue(file, line, col, "", problem)]) from exc
    data = {} if root is None else _build(root, (), pos, issues)
    if not isinstance(data, dict):
        raise ConfigError(
            [pos.issue((), "the file must be a mapping of sections (agent, inputs, ...)")]
        )
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        issues.extend(_from_validation(exc, data, pos))
        raise ConfigError(sorted(issues, key=lambda i: (i.line, i.column))) from None
    issues.extend(_cross_checks(cfg, pos))
    if issues:
        raise ConfigError(sorted(issues, key=lambda i: (i.line, i.column)))
    return cfg


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a config file; relative `data_dir`s resolve against the working dir."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigIssue(str(p), 0, 0, "", f"cannot read: {exc.strerror}")]) from None
    except UnicodeDecodeError:
        raise ConfigError([ConfigIssue(str(p), 0, 0, "", "not UTF-8 text")]) from None
    return parse_config(text, str(p))
