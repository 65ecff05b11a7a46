"""The wall clock against the monotonic clock: boot id and clock steps.

A Raspberry Pi has no real-time clock: it boots with the time of its last shutdown (fake-hwclock)
or 1970, and NTP steps the wall clock once the network is up. Every event keeps its monotonic
time next to its wall time; the offset between the two (wall - monotonic) is constant while
the clock runs freely and jumps when it is set. The agent watches that offset and records each
jump as a `clock_step` event, with the offsets before and after, so the receiver can re-date
what was received before the step (monotonic time + new offset) for the same boot id.

With `agent.correct_times` the agent does that itself for what it has not sent yet: the log is
append-only and keeps the times as received, and forwarders re-date events as they read them
(`corrected`, through the `CORRECTIONS` registry the runtime fills). An event is re-dated when
it was received in this run of the agent (so in this boot: monotonic times compare) before the
step, on the clock from before it: its own offset (recv_time - mono) is the old one.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from agent.events import Event

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")


def boot_id() -> str | None:
    """This boot's id: monotonic times compare only within one boot."""
    try:
        return BOOT_ID.read_text().strip() or None
    except OSError:
        return None


def offset_now() -> float:
    """Wall time minus monotonic time, now."""
    return time.time() - time.monotonic()


@dataclass(slots=True, frozen=True)
class ClockStep:
    """The wall clock moved by `step` seconds against the monotonic clock."""

    old_offset: float
    new_offset: float
    mono: float

    @property
    def step(self) -> float:
        """Seconds the wall clock jumped (positive: forwards)."""
        return self.new_offset - self.old_offset

    def data(self) -> dict[str, float]:
        """The `clock_step` event's data."""
        return {
            "old_offset": self.old_offset,
            "new_offset": self.new_offset,
            "step": self.step,
            "mono": self.mono,
        }


@dataclass(slots=True)
class ClockWatch:
    """Notices steps of the wall clock; `observe` is pure, so tests give it the clocks.

    Slow NTP slewing moves the offset by at most 0.5 ms/s and never adds up to a step within
    one observation; the offset is re-based after each observation so slewing never does.
    """

    threshold: float = 2.0
    offset: float = field(default_factory=offset_now)
    steps: int = 0
    last_step: ClockStep | None = None

    def observe(self, wall: float, mono: float) -> ClockStep | None:
        """Compare the clocks now; a ClockStep when the wall clock jumped since last time."""
        offset = wall - mono
        old, self.offset = self.offset, offset
        if abs(offset - old) <= self.threshold:
            return None
        self.steps += 1
        self.last_step = ClockStep(old, offset, mono)
        return self.last_step

    def check(self) -> ClockStep | None:
        """`observe` with the clocks of this moment."""
        return self.observe(time.time(), time.monotonic())

    def snapshot(self) -> dict[str, object]:
        """What `status` shows about the clock."""
        last = self.last_step
        return {
            "offset": self.offset,
            "steps": self.steps,
            "last_step": None if last is None else last.data(),
            "synchronized": ntp_synchronized(),
        }


#: systemd-timesyncd (Raspberry Pi OS's NTP client) creates this once it synchronised the clock.
TIMESYNC_MARK = Path("/run/systemd/timesync/synchronized")


def ntp_synchronized() -> bool | None:
    """Whether systemd-timesyncd synchronised the clock since boot; None when it is not the
    NTP client here (chrony, ntpd) and so cannot say."""
    if TIMESYNC_MARK.exists():
        return True
    return False if TIMESYNC_MARK.parent.is_dir() else None


def corrected(
    event: Event,
    steps: Sequence[ClockStep],
    first_seq: Mapping[str, int],
    tolerance: float = 2.0,
) -> Event:
    """`event` re-dated onto the clock as it is after `steps` (oldest first), or `event` itself.

    Only events of this run count: `first_seq` is, per stream, the first seq committed by this
    process, whose monotonic clock the steps' `mono` belong to (an older event may come from
    another boot, where monotonic times mean nothing here). For each step the event precedes
    (`mono` before the step's) and whose old offset its own `recv_time - mono` matches within
    `tolerance`, `recv_time` moves to `mono + new offset`: a reading taken between the step and
    the moment the watch noticed it already carries the new offset and is left alone. `time`
    moves by the same amount when it is nearer the agent's old clock than the new one (the
    receive time, a window's end); a device's own timestamp is nearer the new clock and stays.
    Never mutates `event`: the log's events are as received.
    """
    start = first_seq.get(event.stream)
    if start is None or event.seq < start:
        return event
    offset = event.recv_time - event.mono
    shift = 0.0
    for step in steps:
        if event.mono < step.mono and abs(offset + shift - step.old_offset) <= tolerance:
            shift += step.new_offset - (offset + shift)
    if shift == 0.0:
        return event
    recv = event.recv_time + shift
    when = event.time
    if abs(when - event.recv_time) < abs(when - recv):
        when += shift
    return event.with_times(when, recv)


@dataclass(slots=True)
class Corrections:
    """The clock steps of this run, for forwarders to re-date what they read (`apply`).

    The runtime calls `start` once the log is open and before any input runs, and `add` for each
    step the clock watch records; forwarders call `apply` on every event they send. All on the
    event loop's thread: never called concurrently.
    """

    enabled: bool = False
    tolerance: float = 2.0
    first_seq: dict[str, int] = field(default_factory=dict)
    steps: list[ClockStep] = field(default_factory=list)

    def start(self, next_seq: Mapping[str, int], enabled: bool, tolerance: float) -> None:
        """A new run: `next_seq` is, per stream, the seq its next committed event will get."""
        self.enabled, self.tolerance = enabled, tolerance
        self.first_seq = dict(next_seq)
        self.steps = []

    def add(self, step: ClockStep) -> None:
        """A step the watch just recorded."""
        self.steps.append(step)

    @property
    def active(self) -> bool:
        """Whether any event may need re-dating (else forwarders skip `apply` altogether)."""
        return self.enabled and bool(self.steps)

    def apply(self, event: Event) -> Event:
        """`event` as it should be sent: re-dated if `enabled` and a step of this run applies."""
        if not self.active:
            return event
        return corrected(event, self.steps, self.first_seq, self.tolerance)


#: The one registry of this process, filled by the runtime (agent/runtime.py, agent/health.py).
CORRECTIONS = Corrections()
