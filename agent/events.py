"""The event vocabulary shared by drivers, the log, processors and forwarders.

A driver produces `Reading`s (and `Rejected` bad input). A reading is itself an `Event` of the
`readings` stream, which the log gives its per-stream sequence number when it commits it; every
event has a stable identity `<log id>:<stream>:<seq>`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Stream(StrEnum):
    """The log's partitions. Consumers read one or more of them, each with its own cursor."""

    READINGS = "readings"
    AGGREGATES = "aggregates"
    ALERTS = "alerts"
    AGENT = "agent"
    DEADLETTER = "deadletter"


#: Forwarding priority: alerts first, then what the agent says about itself (gaps), then
#: aggregates, then the bulk of readings.
LANES: tuple[Stream, ...] = (
    Stream.ALERTS,
    Stream.AGENT,
    Stream.AGGREGATES,
    Stream.READINGS,
    Stream.DEADLETTER,
)


# Not frozen, like Reading below: one is built for every value a device sends.
@dataclass(slots=True)
class Sample:
    """What a decoder finds in one line or message: a value for a sensor, maybe a device time."""

    sensor: str
    value: float
    unit: str | None = None
    time: float | None = None  # device time, seconds since the epoch, when the device sends one


@dataclass(slots=True, frozen=True)
class Invalid:
    """A decoder's verdict on input it cannot use: a short kind and a human detail."""

    reason: str  # a stable kind, used as a counter label: "invalid_json", "nan", ...
    detail: str


@dataclass(slots=True, frozen=True)
class Rejected:
    """Bad input on its way to the `deadletter` stream: the raw bytes and why."""

    raw: bytes
    reason: str
    detail: str
    source: str
    recv_time: float
    mono: float


@dataclass(slots=True)
class Event:
    """A committed entry of the log, as consumers see it.

    `kind` names what it is within its stream: `reading`, `aggregate`, `alert.raised`,
    `alert.cleared`, `gap`, `deadletter`, `agent.started`, ...
    """

    stream: str
    seq: int
    kind: str
    time: float
    recv_time: float
    mono: float
    sensor: str | None = None
    value: float | None = None
    unit: str | None = None
    data: dict[str, Any] | None = None
    raw: bytes | None = None

    def event_id(self, log_id: str) -> str:
        """The stable identity sent upstream, so the receiver can drop duplicates."""
        return f"{log_id}:{self.stream}:{self.seq}"

    def with_times(self, time: float, recv_time: float) -> Event:
        """A plain `Event` with this one's fields but the times given: events handed out are
        shared, so they are never changed in place (a `Reading` gives its own times to get
        itself as a plain event)."""
        return Event(
            self.stream,
            self.seq,
            self.kind,
            time,
            recv_time,
            self.mono,
            self.sensor,
            self.value,
            self.unit,
            self.data,
            self.raw,
        )

    def to_wire(self, log_id: str) -> dict[str, Any]:
        """The JSON form sent upstream (see README, "Upstream wire format")."""
        out: dict[str, Any] = {
            "id": self.event_id(log_id),
            "stream": self.stream,
            "seq": self.seq,
            "kind": self.kind,
            "time": self.time,
            "recv_time": self.recv_time,
        }
        if self.sensor is not None:
            out["sensor"] = self.sensor
        if self.value is not None:
            out["value"] = self.value
        if self.unit is not None:
            out["unit"] = self.unit
        if self.data is not None:
            out["data"] = self.data
        if self.raw is not None:
            out["raw"] = self.raw.decode("utf-8", errors="backslashreplace")
        return out


class Reading(Event):
    """One sensor value as received: the event it becomes in the `readings` stream once
    committed, when the log gives it its `seq`.

    `time` is the device's time when it sent one, else the receive time; `recv_time` is the
    wall clock at receipt and `mono` the monotonic clock, which windows run on so that a
    wall-clock step (no RTC, NTP at boot) neither breaks windows nor reorders anything.
    `source` names the input it came from; it is not stored (a reading read back from disk
    has none: ""), and equality leaves it out. `value` and the times are floats, as SQLite
    gives them back.

    One object from the decoder to every consumer: building a second one, the committed
    `Event`, for each reading was a fifth of the event loop's time at 100,000 readings/s.
    What every reading has in common is on the class, not set per object.
    """

    __slots__ = ("source",)

    # Class attributes in front of Event's slots of the same names: constant for readings,
    # and read-only on them.
    stream = Stream.READINGS.value
    kind = "reading"
    data = None
    raw = None

    # Not a dataclass __init__: positional, and setting only what differs per reading.
    def __init__(
        self,
        sensor: str,
        value: float,
        unit: str | None,
        event_time: float,
        recv_time: float,
        mono: float,
        source: str,
        seq: int = 0,  # 0: not committed yet
    ) -> None:
        self.seq = seq
        self.time = event_time
        self.recv_time = recv_time
        self.mono = mono
        self.sensor = sensor
        self.value = value
        self.unit = unit
        self.source = source

    def __repr__(self) -> str:
        return (
            f"Reading(sensor={self.sensor!r}, value={self.value!r}, unit={self.unit!r},"
            f" time={self.time!r}, recv_time={self.recv_time!r}, mono={self.mono!r},"
            f" source={self.source!r}, seq={self.seq!r})"
        )

    def __eq__(self, other: object) -> bool:
        if type(other) is Reading:
            return self._key() == other._key()
        # As consumers see it: equal to the same event of any other kind.
        if not isinstance(other, Event):
            return NotImplemented
        return Event.__eq__(self.with_times(self.time, self.recv_time), other)

    def _key(self) -> tuple[Any, ...]:
        return (self.seq, self.time, self.recv_time, self.mono, self.sensor, self.value, self.unit)

    __hash__ = None  # type: ignore[assignment]


@dataclass(slots=True)
class NewEvent:
    """An event to append that is not a reading: aggregates, alerts, gaps, deadletter."""

    kind: str
    time: float
    recv_time: float
    mono: float
    sensor: str | None = None
    value: float | None = None
    unit: str | None = None
    data: dict[str, Any] | None = field(default=None)
    raw: bytes | None = None
