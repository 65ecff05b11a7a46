"""The wall clock against the monotonic clock: boot id and clock steps.

A Raspberry Pi has no real-time clock: it boots with the time of its last shutdown (fake-hwclock)
or 1970, and NTP steps the wall clock once the network is up. Every event keeps its monotonic
time next to its wall time; the offset between the two (wall - monotonic) is constant while
the clock runs freely and jumps when it is set. The agent watches that offset and records each
jump as a `clock_step` event, with the offsets before and after, so the receiver can re-date
what was received before the step (monotonic time + new offset) for the same boot id.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

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
