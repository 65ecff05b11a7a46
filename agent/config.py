"""The agent's YAML configuration: models, loading, and errors people can act on.

`load_config(path)` returns a validated `AgentConfig` or raises `ConfigError` carrying every
problem at once, each as `FILE:LINE:COL: path.to.field: message`. Positions come from PyYAML's
node marks (`yaml.compose`), so an error points at the line a person has to edit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import AfterValidator, Field, field_validator, model_validator

from agent.units import ByteSize, Duration, StrictModel
from agent.yamlconfig import (
    ConfigError as ConfigError,  # re-exported: callers catch the agent config's error here
)
from agent.yamlconfig import ConfigIssue, Positions, parse_yaml, read_yaml_text

# --------------------------------------------------------------------------- models


def _http_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError("url must start with http:// or https://")
    return url


#: A URL that must be http:// or https:// (kept as text: the HTTP clients take it as written).
HttpUrl = Annotated[str, AfterValidator(_http_url)]


class AgentSection(StrictModel):
    """Who this agent is and where it keeps its state."""

    name: str = "edge-agent"
    data_dir: Path = Path("/var/lib/edge-agent")
    shutdown_timeout: Duration = 10.0
    status_interval: Duration = 2.0
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # A wall clock that jumps by more than this against the monotonic clock (no RTC on a Pi,
    # NTP sync after boot) is recorded as a `clock_step` event.
    clock_step: Duration = Field(default=2.0, gt=0)
    # After such a step, events received before it in this run and not yet sent upstream are
    # sent re-dated onto the new clock (the log keeps them as received; see agent/clock.py).
    correct_times: bool = True


class LogConfig(StrictModel):
    """The SQLite event log: durability, group commit and bounds."""

    synchronous: Literal["full", "normal"] = "full"
    commit_interval: Duration = 0.1
    max_batch: int = Field(default=10_000, ge=1)
    queue_size: int = Field(default=50_000, ge=1)
    quota: ByteSize = 512 * 1024**2
    max_age: Duration = 30 * 86400.0
    retention_interval: Duration = 30.0
    # At open: `quick` (PRAGMA quick_check), `full` (integrity_check, slower) or `off`. A log
    # that fails it is moved aside with a timestamp and a fresh one is started.
    integrity_check: Literal["quick", "full", "off"] = "quick"


class HealthConfig(StrictModel):
    """The local health and metrics endpoint, and when the agent calls itself unhealthy.

    `/healthz` answers 503 with the reasons while any of these holds; the systemd watchdog
    is withheld only for `stall_after` (a part with work to do that does nothing).
    """

    listen: str | None = None
    input_down_after: Duration = 60.0
    upstream_failing_after: Duration = 900.0
    stall_after: Duration = Field(default=60.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _host_port(cls, listen: str | None) -> str | None:
        if listen is None:
            return None
        host, _, port = listen.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError("listen must be HOST:PORT, such as 127.0.0.1:9108")
        return listen

    @property
    def address(self) -> tuple[str, int] | None:
        """`listen` as (host, port); an IPv6 host may be written in brackets."""
        if self.listen is None:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


class FieldMapping(StrictModel):
    """Which field of a line holds each part of a reading (see `LineFormatConfig`).

    A field is a JSON key (or a dotted path into nested objects, `data.temp`), a `key=value`
    key, a CSV column name (from `csv_columns` or the header line) or a regex group name.
    `time` lists candidates: the first one the line has is the device time.
    """

    sensor: str = "sensor"
    value: str = "value"
    unit: str | None = "unit"
    time: list[str] = ["ts", "time"]

    @field_validator("time", mode="before")
    @classmethod
    def _time_as_list(cls, value: Any) -> Any:
        if value is None:
            return []
        return [value] if isinstance(value, str) else value


class LineFormatConfig(StrictModel):
    """How a line (or a message payload) becomes readings: the decoder settings of an input.

    `format`: `json` (an object per line, or a list of them), `csv` (columns from `csv_columns`
    or from a header line, `csv_header`), `kv` (`key=value` or `key:value` pairs apart by
    spaces, commas or semicolons) or `regex` (named groups, searched in the line).
    A long line (the default, except for kv) carries one reading per object, record or match,
    its parts in the fields `mapping` names (or the fixed `sensor` name); a wide line (`wide`,
    the default for kv) carries one reading per field that is not the time, the unit or in
    `ignore`, named by its key, column or group. Checked when loaded by building the decoder
    (`drivers.decoders.decoder_for`), so a config that loads always decodes.
    """

    format: Literal["json", "csv", "kv", "regex"] = "json"
    mapping: FieldMapping = FieldMapping()
    sensor: str | None = None
    wide: bool | None = None
    ignore: list[str] = []
    csv_columns: list[str] = ["sensor", "value", "unit", "time"]
    csv_header: bool = False
    regex: str | None = None

    @property
    def is_wide(self) -> bool:
        """Whether lines carry one reading per field (`wide`, by default only for kv)."""
        return self.format == "kv" if self.wide is None else self.wide

    @field_validator("regex")
    @classmethod
    def _regex_compiles(cls, regex: str | None) -> str | None:
        if regex is not None:
            try:
                re.compile(regex)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return regex

    @model_validator(mode="after")
    def _decodable(self) -> LineFormatConfig:
        from drivers.decoders import decoder_for  # drivers import this module

        decoder_for(self)  # raises ValueError, with a message in config terms
        return self


class SerialInputConfig(LineFormatConfig):
    """A sensor on a serial port: lines cut at `terminator`, decoded as `format` says."""

    type: Literal["serial"]
    name: str
    port: str
    baudrate: int = Field(default=115200, gt=0)
    bytesize: Literal[5, 6, 7, 8] = 8
    parity: Literal["none", "even", "odd", "mark", "space"] = "none"
    stopbits: float = 1
    flow_control: Literal["none", "rtscts", "xonxoff"] = "none"
    idle_timeout: Duration = 0.0
    # While lines keep coming, at most one batch (one commit) per this long; a sensor sending
    # less often is never delayed (see drivers/serial.py for the cost of shorter).
    batch_interval: Duration = 0.2
    max_line: ByteSize = Field(default=1024, ge=16, le=1024**2)
    terminator: str = "\n"
    reconnect_initial: Duration = 0.5
    reconnect_max: Duration = 30.0
    sensor_prefix: str = ""

    @field_validator("stopbits")
    @classmethod
    def _stopbits_known(cls, stopbits: float) -> float:
        if stopbits not in (1, 1.5, 2):
            raise ValueError("stopbits must be 1, 1.5 or 2")
        return stopbits

    @field_validator("terminator")
    @classmethod
    def _terminator_not_empty(cls, terminator: str) -> str:
        if not terminator:
            raise ValueError("terminator cannot be empty")
        return terminator


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


class MqttInputConfig(LineFormatConfig):
    """Readings from an MQTT broker, acknowledged only after they are committed to the log.

    A payload is decoded as a serial line is (`LineFormatConfig`: `format`, `mapping`,
    `sensor`, `wide`, ...); a csv, kv or regex payload may hold several lines, each decoded on
    its own. Two more: `format: number` (the payload is a bare value, its sensor named by the
    topic) and `json_query` (a dotted path, `data.readings` or `items.0`, to the object or list
    holding the readings). A long reading whose line has no sensor field takes the sensor
    `topic_template` names: a JSON object (or a bare number) without `mapping.sensor`, a kv or
    regex line without it, CSV columns without it. Not with `csv_header`, whose header names
    the sensor column as on a serial port.
    """

    type: Literal["mqtt"]
    name: str
    url: str = "mqtt://127.0.0.1:1883"
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    topics: list[str] = ["sensors/#"]
    topic_template: str = "sensors/{sensor}"
    # Wider than a serial line's formats: `number` has no line to decode.
    format: Literal["json", "number", "csv", "kv", "regex"] = "json"  # type: ignore[assignment]
    json_query: str = ""
    qos: Literal[0, 1] = 1
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: Duration = 30.0
    connect_timeout: Duration = 10.0
    session_expiry: Duration = 7 * 86400.0
    # The window of messages the broker delivers before their PUBACK (MQTT 5: our Receive
    # Maximum; MQTT 3.1.1: the broker's own setting, mosquitto's `max_inflight_messages`, which
    # should match it). A message holds its slot until its group commit, so one reading per
    # message cannot pass max_inflight / commit_interval: 4096 / 100 ms = 40,960/s (the former
    # 1000 capped it at 10,000/s). Memory: the input stops reading its socket while this many
    # messages, or drivers.mqtt.INBOX_BYTES (8 MiB) of payloads, wait to be decoded (a broker
    # may send past its window: mosquitto 2.0.11 does once PUBACKs flow), and the log's
    # `queue_size` bounds the decoded rest. Far below the 65,535 packet ids, which wrap.
    max_inflight: int = Field(default=4096, ge=1, le=65535)
    max_payload: ByteSize = 65536
    reconnect_initial: Duration = 0.5
    reconnect_max: Duration = 30.0

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as a number and `protocol: 3.1.1` as text.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> MqttInputConfig:
        if not re.match(r"^mqtts?://[^/:]+", self.url):
            raise ValueError("url must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
        tls_options = [f for f in ("ca_file", "cert_file", "key_file") if getattr(self, f)]
        if tls_options and not self.url.startswith("mqtts://"):
            raise ValueError(f"{tls_options[0]} is a TLS option: the url must start with mqtts://")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        names = re.findall(r"\{([a-zA-Z_][a-zA-Z0-9_]*)\}", self.topic_template)
        if len(set(names)) != len(names):
            raise ValueError("topic_template names a {field} twice")
        if self.format == "number" and "sensor" not in names:
            raise ValueError(
                "format number takes the sensor from the topic: topic_template needs {sensor}"
            )
        if not self.topics:
            raise ValueError("topics cannot be empty")
        if not 1 <= self.keepalive <= 65535:
            raise ValueError("keepalive must be between 1s and 65535s (MQTT sends whole seconds)")
        if self.session_expiry > 0xFFFFFFFF:
            raise ValueError("session_expiry cannot exceed 4294967295s (136 years)")
        return self

    @property
    def topic_names_sensor(self) -> bool:
        """Whether `topic_template` names the sensor (`{sensor}`)."""
        return re.search(r"\{sensor\}", self.topic_template) is not None

    @property
    def takes_topic_sensor(self) -> bool:
        """Whether a long reading without a sensor field takes the topic's (see the class)."""
        return (
            self.format != "number"
            and self.topic_names_sensor
            and self.sensor is None
            and not self.is_wide
            and not self.csv_header
        )

    @model_validator(mode="after")
    def _decodable(self) -> MqttInputConfig:  # replaces LineFormatConfig's, which knows no number
        from drivers.decoders import decoder_for  # drivers import this module

        if self.format == "number":
            line_options = set(LineFormatConfig.model_fields) - {"format"}
            options = sorted(self.model_fields_set & line_options)
            if options:
                raise ValueError(f"{options[0]} is for line formats, not format: number")
            return self
        if self.json_query and self.format != "json":
            raise ValueError(f"json_query is for format: json, not {self.format}")
        if self.takes_topic_sensor:
            # Lines without the sensor field are decoded as if the topic's were a fixed sensor.
            decoder_for(self.model_copy(update={"sensor": "topic"}))
        else:
            decoder_for(self)  # raises ValueError, with a message in config terms
        return self


InputConfig = Annotated[
    Union[SerialInputConfig, SimulatedInputConfig, MqttInputConfig],  # noqa: UP007
    Field(discriminator="type"),
]


#: Window functions by name; `p<q>` (p95, p99.9, ...) is any percentile, `median` is p50.
WINDOW_FUNCTIONS: tuple[str, ...] = ("mean", "min", "max", "sum", "count", "std", "median")
WINDOW_FUNCTIONS += ("first", "last", "rate", "ewma")
_PERCENTILE = re.compile(r"^p([0-9]{1,3}(?:\.[0-9]+)?)$")


def percentile_of(function: str) -> float | None:
    """The percentile a function name asks for (`p95` -> 95.0, `median` -> 50.0), else None."""
    if function == "median":
        return 50.0
    m = _PERCENTILE.match(function)
    return float(m.group(1)) if m else None


def _check_function(function: str) -> str:
    q = percentile_of(function)
    if function in WINDOW_FUNCTIONS or (q is not None and 0.0 <= q <= 100.0):
        return function
    raise ValueError(
        f"unknown window function {function!r}; use {', '.join(WINDOW_FUNCTIONS)} or a "
        "percentile p0..p100 such as p95 or p99.9"
    )


class WindowConfig(StrictModel):
    """A window over readings, appended to the `aggregates` stream when it closes.

    Tumbling (`step` unset: one window after the other) or hopping (a window of `size` starting
    every `step`), per sensor or over a group of sensors, on processing time (the monotonic
    clock: a wall-clock step neither splits nor merges a window) or on event time (the device's
    time) with an allowed lateness.
    """

    name: str
    sensors: str | list[str] = "*"  # names or globs
    group: str | None = None  # one series over every matching sensor, named this
    size: Duration = 60.0
    step: Duration | None = None  # hopping windows; unset: tumbling (step = size)
    function: str | None = None  # one function (kept from the first version) ...
    functions: list[str] | None = None  # ... or several; the first is the aggregate's `value`
    time: Literal["processing", "event"] = "processing"
    lateness: Duration = 0.0  # event time: how far behind the newest reading one may arrive
    align: bool = False  # processing time: boundaries on the wall clock ("every 5m on the 5")
    offset: Duration = 0.0  # shifts the boundaries (align or event time): 5m windows at :01, :06
    fill: float | Literal["previous"] | None = None  # what an empty window emits (default: none)
    ewma_alpha: float = Field(default=0.3, gt=0.0, le=1.0)  # weight of each new reading
    max_samples: int = Field(default=100_000, ge=16)  # kept per window for median/percentiles

    @field_validator("size")
    @classmethod
    def _size_positive(cls, size: float) -> float:
        if size <= 0:
            raise ValueError("size must be longer than 0s")
        return size

    @field_validator("function")
    @classmethod
    def _one_function(cls, function: str | None) -> str | None:
        return None if function is None else _check_function(function)

    @field_validator("functions")
    @classmethod
    def _functions(cls, functions: list[str] | None) -> list[str] | None:
        if functions is None:
            return None
        if not functions:
            raise ValueError("functions cannot be empty")
        if len(set(functions)) != len(functions):
            raise ValueError("a function appears twice")
        return [_check_function(f) for f in functions]

    @model_validator(mode="after")
    def _window_shape(self) -> WindowConfig:
        if self.function is not None and self.functions is not None:
            raise ValueError("give either function or functions, not both")
        if self.step is not None:
            if self.step <= 0 or self.step > self.size:
                raise ValueError("step must be longer than 0s and at most size")
            n = round(self.size / self.step)
            if abs(n * self.step - self.size) > 1e-9 * self.size:
                raise ValueError(
                    f"size ({self.size:g}s) must be a whole number of steps ({self.step:g}s)"
                )
        if self.lateness and self.time != "event":
            raise ValueError("lateness applies to event-time windows (time: event)")
        if self.align and self.time != "processing":
            raise ValueError("align applies to processing-time windows; event time is aligned")
        return self

    @property
    def all_functions(self) -> tuple[str, ...]:
        """The functions computed, in order; the first one is each aggregate's `value`."""
        if self.functions is not None:
            return tuple(self.functions)
        return (self.function or "mean",)

    @property
    def hop(self) -> float:
        """The time between the starts of two windows (the size for tumbling windows)."""
        return self.size if self.step is None else self.step


_BAND = tuple[float, float]


class RuleConfig(StrictModel):
    """A condition on each reading or on a window's output that raises and clears alerts.

    Exactly one condition: `above`, `below`, `outside`, `inside` (on the value, or on its rate
    of change per second with `of: rate`) or `stale` (no reading for that long). Hysteresis
    (`clear_below`, `clear_above` or `hysteresis`), `deadband`, `for`, `samples` and `cooldown`
    shape when an alert is raised and cleared.
    """

    name: str
    window: str | None = None  # a window's output; unset: every reading
    function: str | None = None  # which of the window's functions (default: its first)
    sensors: str | list[str] = "*"
    of: Literal["value", "rate"] = "value"
    above: float | None = None
    below: float | None = None
    outside: _BAND | None = None
    inside: _BAND | None = None
    stale: Duration | None = None
    clear_below: float | None = None
    clear_above: float | None = None
    hysteresis: float = Field(default=0.0, ge=0.0)
    deadband: float = Field(default=0.0, ge=0.0)
    for_: Duration = Field(default=0.0, alias="for")
    samples: int = Field(default=1, ge=1)
    cooldown: Duration = 0.0
    severity: Literal["info", "warning", "critical"] = "warning"

    @model_validator(mode="after")
    def _condition(self) -> RuleConfig:
        given = [
            k
            for k in ("above", "below", "outside", "inside", "stale")
            if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "a rule needs exactly one condition: above, below, outside, inside or stale"
                + (f" (got {', '.join(given)})" if given else "")
            )
        if self.clear_below is not None:
            if self.above is None:
                raise ValueError("clear_below goes with above")
            if self.clear_below > self.above:
                raise ValueError(
                    "clear_below must not be above 'above' (hysteresis runs downwards)"
                )
        if self.clear_above is not None:
            if self.below is None:
                raise ValueError("clear_above goes with below")
            if self.clear_above < self.below:
                raise ValueError("clear_above must not be below 'below' (hysteresis runs upwards)")
        if self.hysteresis and (self.clear_below is not None or self.clear_above is not None):
            raise ValueError("give either hysteresis or clear_below/clear_above, not both")
        for band in (self.outside, self.inside):
            if band is not None and band[0] > band[1]:
                raise ValueError("a band is [low, high] with low <= high")
        if self.outside is not None and 2 * self.hysteresis > self.outside[1] - self.outside[0]:
            raise ValueError("hysteresis is wider than half the band: the alert could not clear")
        if self.stale is not None:
            if self.stale <= 0:
                raise ValueError("stale must be longer than 0s")
            extras = [
                k
                for k, v in (
                    ("window", self.window),
                    ("function", self.function),
                    ("of", self.of != "value" or None),
                    ("for", self.for_ or None),
                    ("samples", self.samples != 1 or None),
                    ("deadband", self.deadband or None),
                    ("hysteresis", self.hysteresis or None),
                )
                if v is not None
            ]
            if extras:
                raise ValueError(f"a stale rule watches readings arriving; drop {extras[0]}")
        if self.function is not None and self.window is None:
            raise ValueError("function picks one of a window's functions: set window too")
        return self


class ActionBaseConfig(StrictModel):
    """What every action has: which alerts it takes, and how it retries a failure."""

    name: str
    timeout: Duration = 10.0
    rules: list[str] = ["*"]
    severities: list[Literal["info", "warning", "critical"]] = ["info", "warning", "critical"]
    kinds: list[Literal["raised", "cleared"]] = ["raised", "cleared"]
    max_attempts: int = Field(default=10, ge=0)
    backoff_initial: Duration = 0.5
    backoff_max: Duration = 60.0


class MqttActionConfig(ActionBaseConfig):
    """Publish each alert to a local MQTT broker (QoS 1; done once the broker's PUBACK came)."""

    type: Literal["mqtt"]
    url: str = "mqtt://127.0.0.1:1883"
    topic: str  # may use {rule}, {sensor}, {severity}, {kind}, {alert_id}
    payload_raised: str | None = None  # default: the alert as JSON; may use the same fields
    payload_cleared: str | None = None
    retain: bool = False
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    keepalive: Duration = 30.0

    @field_validator("url")
    @classmethod
    def _mqtt_url(cls, url: str) -> str:
        if not url.startswith(("mqtt://", "mqtts://")):
            raise ValueError("url must start with mqtt:// or mqtts://")
        return url


class WebhookActionConfig(ActionBaseConfig):
    """POST each alert as JSON to a local HTTP endpoint; done on a 2xx answer."""

    type: Literal["webhook"]
    url: HttpUrl
    headers: dict[str, str] = {}


class CommandActionConfig(ActionBaseConfig):
    """Run a program for each alert (argv, no shell); done when it exits 0 within `timeout`."""

    type: Literal["command"]
    argv: list[str] = Field(min_length=1)  # may use {rule}, {sensor}, {severity}, {kind}, ...
    env: dict[str, str] = {}


ActionConfig = Annotated[
    Union[MqttActionConfig, WebhookActionConfig, CommandActionConfig],  # noqa: UP007
    Field(discriminator="type"),
]


class ProcessingConfig(StrictModel):
    """On-device processing: windows over readings, rules over readings and windows, and
    local actions on the alerts."""

    windows: list[WindowConfig] = []
    rules: list[RuleConfig] = []
    actions: list[ActionConfig] = []
    checkpoint_interval: Duration = 1.0  # commit the processor's state at least this often


_StreamName = Literal["readings", "aggregates", "alerts", "agent", "deadletter"]
_Severity = Literal["info", "warning", "critical"]
_UPSTREAM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_TOPIC_FIELD = re.compile(r"\{([^{}]*)\}")


class UpstreamBaseConfig(StrictModel):
    """What every upstream has: which events it takes, and how it batches and retries.

    Routing: `streams` (sent as lanes, alerts first), `sensors` (globs over sensor names; an
    event without a sensor, such as a gap, always passes) and `severities` (alerts only). An
    event an upstream does not take still moves that upstream's cursor: it is handled.
    """

    name: str
    streams: list[_StreamName] = ["alerts", "agent", "aggregates", "readings", "deadletter"]
    sensors: str | list[str] = "*"
    severities: list[_Severity] = ["info", "warning", "critical"]
    batch_size: int = Field(default=500, ge=1, le=100_000)
    max_bytes: ByteSize = Field(default=1024**2, ge=1024)
    # Nagle-like: the longest a part-full batch waits behind messages in flight (an idle
    # upstream sends at once; see agent/upstream.py).
    linger: Duration = 0.2
    timeout: Duration = 10.0
    backoff_initial: Duration = 0.5
    backoff_max: Duration = 60.0

    @field_validator("name")
    @classmethod
    def _name_is_a_file_name(cls, name: str) -> str:
        # The name is part of the consumer's cursor and of the replay request file.
        if not _UPSTREAM_NAME.match(name):
            raise ValueError("name may use letters, digits, '_', '.' and '-' (not first)")
        return name

    @field_validator("streams", "severities")
    @classmethod
    def _some_without_repeats(cls, values: list[str]) -> list[str]:
        if not values:
            raise ValueError("cannot be empty (leave it out for all)")
        if len(set(values)) != len(values):
            raise ValueError("a value appears twice")
        return values

    @field_validator("sensors")
    @classmethod
    def _some_sensors(cls, sensors: str | list[str]) -> str | list[str]:
        if not sensors or (isinstance(sensors, list) and not all(sensors)):
            raise ValueError('cannot be empty (leave it out, or write "*", for all sensors)')
        return sensors

    @field_validator("timeout")
    @classmethod
    def _timeout_positive(cls, timeout: float) -> float:
        if timeout <= 0:
            raise ValueError("timeout must be longer than 0s")
        return timeout

    @property
    def sensor_globs(self) -> tuple[str, ...]:
        """`sensors` as a tuple of globs."""
        return (self.sensors,) if isinstance(self.sensors, str) else tuple(self.sensors)


class HttpUpstreamConfig(UpstreamBaseConfig):
    """A cloud ingestion endpoint that takes JSON batches over HTTP(S).

    2xx acknowledges a batch; 5xx and the `retry_status` codes are retried (honouring
    `Retry-After`); any other 4xx puts the batch in `deadletter` and moves on (400, 413 and 422
    are first bisected, so one poisoned event does not take its whole batch with it).
    """

    type: Literal["http"]
    url: HttpUrl
    # Longer than MQTT's: a request costs both ends far more than a message on an open
    # connection (a steady 1,000 readings/s went from ~5 to ~2 requests a second: 0.25 % of a
    # core less on this machine, and fewer billed requests at the cloud); alerts never wait.
    linger: Duration = 1.0
    token: str | None = None
    headers: dict[str, str] = {}
    gzip: bool = True
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    retry_status: list[int] = [401, 403, 408, 429]
    # Requests in flight at once, each on a connection of its own. One at a time caps a link
    # at batch_size per round trip (500 readings per 300 ms of cellular RTT: 1,700/s); a few
    # overlap the agent's encoding with the endpoint's work. A trickle keeps to one.
    max_inflight: int = Field(default=4, ge=1, le=64)

    @field_validator("headers")
    @classmethod
    def _sendable(cls, headers: dict[str, str]) -> dict[str, str]:
        token = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
        for name, value in headers.items():
            if not token.match(name):
                raise ValueError(f"{name!r} is not a header name (letters, digits, -)")
            if any((ord(ch) < 32 and ch != "\t") or ord(ch) == 127 for ch in value):
                raise ValueError(f"the value of header {name} holds control characters")
            # The agent frames each request itself: these would contradict or break it.
            if name.lower() in ("content-length", "transfer-encoding", "host", "expect"):
                raise ValueError(f"header {name} is set by the agent, not by configuration")
        return headers

    @field_validator("retry_status")
    @classmethod
    def _client_errors(cls, codes: list[int]) -> list[int]:
        wrong = [c for c in codes if not 400 <= c <= 499]
        if wrong:
            raise ValueError(f"{wrong[0]} is not a 4xx status (5xx are always retried)")
        return codes

    @model_validator(mode="after")
    def _consistent(self) -> HttpUpstreamConfig:
        tls = [f for f in ("ca_file", "cert_file", "key_file") if getattr(self, f)]
        if tls and not self.url.startswith("https://"):
            raise ValueError(f"{tls[0]} is a TLS option: the url must start with https://")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        if self.token and any(h.lower() == "authorization" for h in self.headers):
            raise ValueError("give either token or an Authorization header, not both")
        return self


#: The fields each MQTT payload format may use in its topic template.
MQTT_TOPIC_FIELDS: dict[str, tuple[str, ...]] = {
    "batch": ("agent", "log_id", "stream"),
    "event": ("agent", "log_id", "stream", "kind", "sensor", "device", "key"),
    "thingsboard": ("agent",),
}
MQTT_DEFAULT_TOPICS: dict[str, str] = {
    "batch": "edge/{agent}/{stream}",
    "event": "edge/{agent}/{stream}/{sensor}",
    "thingsboard": "v1/gateway/telemetry",
}


class MqttUpstreamConfig(UpstreamBaseConfig):
    """An MQTT broker or IoT platform taking the events at QoS 1; a cursor moves on PUBACK.

    `format`: `batch` (one message per batch, the HTTP body), `event` (one message per event,
    its wire object) or `thingsboard` (ThingsBoard's gateway telemetry). At most
    `max_inflight` messages are unacknowledged at once, counted from the oldest one.
    """

    type: Literal["mqtt"]
    url: str
    protocol: Literal["3.1.1", "5"] = "3.1.1"
    format: Literal["batch", "event", "thingsboard"] = "batch"
    topic: str | None = None
    client_id: str | None = None
    username: str | None = None
    password: str | None = None
    token: str | None = None
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    alpn: list[str] = []
    keepalive: Duration = 30.0
    connect_timeout: Duration = 10.0
    max_inflight: int = Field(default=100, ge=1, le=65535)

    @field_validator("protocol", mode="before")
    @classmethod
    def _protocol_as_text(cls, value: Any) -> Any:
        # YAML reads `protocol: 5` as a number and `protocol: 3.1.1` as text.
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @model_validator(mode="after")
    def _consistent(self) -> MqttUpstreamConfig:
        if not re.match(r"^mqtts?://[^/:]+(:[0-9]+)?/?$", self.url):
            raise ValueError("url must be mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (TLS)")
        tls = [f for f in ("ca_file", "cert_file", "key_file", "alpn") if getattr(self, f)]
        if tls and not self.url.startswith("mqtts://"):
            raise ValueError(f"{tls[0]} is a TLS option: the url must start with mqtts://")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("key_file needs cert_file (the client certificate it belongs to)")
        if self.token is not None and (self.username is not None or self.password is not None):
            raise ValueError("token is sent as the username: give token or username/password")
        if self.password is not None and self.username is None:
            raise ValueError("password needs username")
        if not 1 <= self.keepalive <= 65535:
            raise ValueError("keepalive must be between 1s and 65535s (MQTT sends whole seconds)")
        allowed = MQTT_TOPIC_FIELDS[self.format]
        for name in _TOPIC_FIELD.findall(self.topic_template):
            if name not in allowed:
                raise ValueError(
                    f"topic: format {self.format} has no {{{name}}} "
                    f"(it has {', '.join('{' + a + '}' for a in allowed)})"
                )
        if not self.topic_template or any(c in self.topic_template for c in "+#\0"):
            raise ValueError("topic must be a topic name, without wildcards")
        return self

    @property
    def topic_template(self) -> str:
        """The topic template, the format's default when `topic` is not given."""
        return self.topic if self.topic is not None else MQTT_DEFAULT_TOPICS[self.format]

    def effective_client_id(self, agent_name: str) -> str:
        """The client id used: `client_id`, or `<agent name>-<upstream name>`."""
        return self.client_id or f"{agent_name}-{self.name}"


UpstreamConfig = Annotated[
    Union[HttpUpstreamConfig, MqttUpstreamConfig],  # noqa: UP007
    Field(discriminator="type"),
]


class AgentConfig(StrictModel):
    """The whole configuration file."""

    agent: AgentSection = AgentSection()
    log: LogConfig = LogConfig()
    inputs: list[InputConfig] = []
    processing: ProcessingConfig = ProcessingConfig()
    upstreams: list[UpstreamConfig] = []
    health: HealthConfig = HealthConfig()

    @property
    def log_path(self) -> Path:
        """Where the event log lives: `<data_dir>/events.db`."""
        return self.agent.data_dir / "events.db"


def _cross_checks(cfg: AgentConfig, pos: Positions) -> list[ConfigIssue]:
    issues = []
    for section, items in (("inputs", cfg.inputs), ("upstreams", cfg.upstreams)):
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                issues.append(pos.issue((section, i, "name"), f"duplicate name {item.name!r}"))
            seen.add(item.name)
    issues.extend(_processing_checks(cfg.processing, pos))
    issues.extend(_upstream_checks(cfg, pos))
    return issues


def _upstream_checks(cfg: AgentConfig, pos: Positions) -> list[ConfigIssue]:
    """MQTT client ids must differ: a broker disconnects a client when another one connects
    with the same id, and two such clients would take turns forever."""
    issues = []
    taken: dict[str, str] = {}
    for item in cfg.inputs:
        client_id = getattr(item, "client_id", None)
        if isinstance(client_id, str):
            taken[client_id] = f"input {item.name!r}"
    for i, up in enumerate(cfg.upstreams):
        if not isinstance(up, MqttUpstreamConfig):
            continue
        client_id = up.effective_client_id(cfg.agent.name)
        if client_id in taken:
            issues.append(
                pos.issue(
                    ("upstreams", i, "client_id" if up.client_id else "name"),
                    f"client id {client_id!r} is also used by {taken[client_id]} (hint: set "
                    "client_id; a broker drops a client when another connects with its id)",
                )
            )
        taken[client_id] = f"upstream {up.name!r}"
    return issues


def _processing_checks(cfg: ProcessingConfig, pos: Positions) -> list[ConfigIssue]:
    issues = []
    for section, names in (
        ("windows", [w.name for w in cfg.windows]),
        ("rules", [r.name for r in cfg.rules]),
        ("actions", [a.name for a in cfg.actions]),
    ):
        for i, name in enumerate(names):
            if name in names[:i]:
                issues.append(
                    pos.issue(("processing", section, i, "name"), f"duplicate name {name!r}")
                )
    windows: dict[str, WindowConfig] = {}
    for w in cfg.windows:
        windows.setdefault(w.name, w)
    for i, rule in enumerate(cfg.rules):
        if rule.window is None:
            continue
        window = windows.get(rule.window)
        if window is None:
            hint = f"known windows: {', '.join(sorted(windows)) or 'none'}"
            issues.append(
                pos.issue(
                    ("processing", "rules", i, "window"),
                    f"no window named {rule.window!r} ({hint})",
                )
            )
        elif rule.function is not None and rule.function not in window.all_functions:
            issues.append(
                pos.issue(
                    ("processing", "rules", i, "function"),
                    f"window {rule.window!r} does not compute {rule.function!r} "
                    f"(it computes {', '.join(window.all_functions)})",
                )
            )
    return issues


def parse_config(text: str, file: str = "<config>") -> AgentConfig:
    """Validate config text; raise ConfigError with every problem found."""
    shape = "the file must be a mapping of sections (agent, inputs, ...)"
    return parse_yaml(text, file, AgentConfig, _cross_checks, shape=shape)


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate a config file; relative `data_dir`s resolve against the working dir."""
    return parse_config(read_yaml_text(path), str(path))
