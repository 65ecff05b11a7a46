"""On-device processing: tumbling windows over readings and threshold rules over windows.

Everything here is pure and synchronous: a function of (state, batch of events) with no I/O,
so it is testable without a broker or a disk, and its state is a small JSON-able dict that the
processor commits together with its cursor.

Windows run on the monotonic clock (invariant 6): a wall-clock step at NTP sync neither splits
nor merges a window. A reading's window is `floor(mono / size)`.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from agent.config import ProcessingConfig, RuleConfig, WindowConfig
from agent.events import Event, NewEvent


@dataclass(slots=True)
class _Open:
    """The open window of one sensor."""

    index: int
    total: float
    count: int
    first_time: float
    last_time: float
    unit: str | None


@dataclass(slots=True)
class WindowStats:
    """What a window saw but could not use."""

    late: int = 0


class TumblingMean:
    """A tumbling mean per sensor over monotonic time.

    `feed` folds a batch of readings in and returns aggregates of the windows it closed;
    `tick` closes windows whose end has passed, so a window closes on time even when no more
    readings arrive.
    """

    def __init__(self, cfg: WindowConfig) -> None:
        self.cfg = cfg
        self.size = cfg.size
        self.open: dict[str, _Open] = {}
        self.stats = WindowStats()
        self._matches: dict[str, bool] = {}

    def matches(self, sensor: str) -> bool:
        """Whether this window covers `sensor` (glob), cached per name."""
        hit = self._matches.get(sensor)
        if hit is None:
            hit = self._matches[sensor] = fnmatch.fnmatchcase(sensor, self.cfg.sensors)
        return hit

    def feed(self, readings: Sequence[Event]) -> list[NewEvent]:
        """Fold readings (log order) in; return aggregates of every window that closed."""
        mine = [
            r
            for r in readings
            if r.sensor is not None and r.value is not None and self.matches(r.sensor)
        ]
        if not mine:
            return []
        names = sorted({r.sensor for r in mine if r.sensor is not None})
        code_of = {name: i for i, name in enumerate(names)}
        codes = np.fromiter(
            (code_of[r.sensor] for r in mine if r.sensor is not None), np.int64, len(mine)
        )
        values = np.fromiter((r.value for r in mine if r.value is not None), np.float64, len(mine))
        monos = np.fromiter((r.mono for r in mine), np.float64, len(mine))
        windows = np.floor(monos / self.size).astype(np.int64)
        # Sort by (sensor, window) keeping log order inside a group, then reduce each run.
        order = np.lexsort((windows, codes))
        codes_s, windows_s = codes[order], windows[order]
        starts = np.flatnonzero(
            np.concatenate(
                ([True], (codes_s[1:] != codes_s[:-1]) | (windows_s[1:] != windows_s[:-1]))
            )
        )
        sums = np.add.reduceat(values[order], starts)
        counts = np.diff(np.append(starts, len(order)))
        out: list[NewEvent] = []
        for g, start in enumerate(starts):
            first = mine[int(order[start])]
            last = mine[int(order[start + counts[g] - 1])]
            sensor = names[int(codes_s[start])]
            out.extend(
                self._merge(
                    sensor, int(windows_s[start]), float(sums[g]), int(counts[g]), first, last
                )
            )
        return out

    def _merge(
        self, sensor: str, index: int, total: float, count: int, first: Event, last: Event
    ) -> list[NewEvent]:
        current = self.open.get(sensor)
        closed: list[NewEvent] = []
        if current is not None:
            if index == current.index:
                current.total += total
                current.count += count
                current.last_time = last.time
                return closed
            # A window far in the past means the monotonic clock restarted (a reboot):
            # close what is open and start afresh rather than calling everything late.
            if current.index - index <= 2 and index < current.index:
                self.stats.late += count
                return closed
            closed.append(self._emit(sensor, current))
        self.open[sensor] = _Open(index, total, count, first.time, last.time, last.unit)
        return closed

    def tick(self, now_mono: float, grace: float = 0.0) -> list[NewEvent]:
        """Close every window whose end (plus `grace`) has passed at monotonic time `now_mono`."""
        done = [s for s, w in self.open.items() if (w.index + 1) * self.size + grace <= now_mono]
        return [self._emit(s, self.open.pop(s)) for s in done]

    def _emit(self, sensor: str, w: _Open) -> NewEvent:
        end_mono = (w.index + 1) * self.size
        return NewEvent(
            kind="aggregate",
            time=w.last_time,
            recv_time=w.last_time,
            mono=end_mono,
            sensor=sensor,
            value=w.total / w.count,
            unit=w.unit,
            data={
                "window": self.cfg.name,
                "function": "mean",
                "size": self.size,
                "count": w.count,
                "first_time": w.first_time,
                "last_time": w.last_time,
            },
        )

    def snapshot(self) -> dict[str, Any]:
        """State as plain data, committed with the processor's cursor."""
        return {
            s: [w.index, w.total, w.count, w.first_time, w.last_time, w.unit]
            for s, w in self.open.items()
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load state from `snapshot`."""
        self.open = {
            s: _Open(int(v[0]), float(v[1]), int(v[2]), float(v[3]), float(v[4]), v[5])
            for s, v in state.items()
        }


@dataclass(slots=True)
class _Raised:
    alert_id: str
    value: float


@dataclass(slots=True)
class ThresholdRule:
    """Raise an alert when a window's value goes above `above`; clear it below `clear_below`.

    An alert is a pair of events sharing an alert id: `alert.raised`, then `alert.cleared`.
    While raised it is not raised again.
    """

    cfg: RuleConfig
    raised: dict[str, _Raised] = field(default_factory=dict)
    counter: int = 0

    def feed(self, aggregates: Sequence[NewEvent]) -> list[NewEvent]:
        """Alerts raised or cleared by these aggregates, in order."""
        clear_below = self.cfg.above if self.cfg.clear_below is None else self.cfg.clear_below
        out: list[NewEvent] = []
        for agg in aggregates:
            data = agg.data or {}
            if data.get("window") != self.cfg.window or agg.sensor is None or agg.value is None:
                continue
            if not fnmatch.fnmatchcase(agg.sensor, self.cfg.sensors):
                continue
            active = self.raised.get(agg.sensor)
            if active is None and agg.value > self.cfg.above:
                self.counter += 1
                alert_id = f"{self.cfg.name}:{agg.sensor}:{self.counter}"
                self.raised[agg.sensor] = _Raised(alert_id, agg.value)
                out.append(self._alert("alert.raised", alert_id, agg))
            elif active is not None and agg.value < clear_below:
                del self.raised[agg.sensor]
                out.append(self._alert("alert.cleared", active.alert_id, agg))
        return out

    def _alert(self, kind: str, alert_id: str, agg: NewEvent) -> NewEvent:
        return NewEvent(
            kind=kind,
            time=agg.time,
            recv_time=agg.recv_time,
            mono=agg.mono,
            sensor=agg.sensor,
            value=agg.value,
            unit=agg.unit,
            data={
                "alert_id": alert_id,
                "rule": self.cfg.name,
                "severity": self.cfg.severity,
                "above": self.cfg.above,
                "clear_below": self.cfg.clear_below,
                "window": agg.data,
            },
        )

    def snapshot(self) -> dict[str, Any]:
        """State as plain data."""
        return {
            "counter": self.counter,
            "raised": {s: [r.alert_id, r.value] for s, r in self.raised.items()},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load state from `snapshot`."""
        self.counter = int(state.get("counter", 0))
        self.raised = {
            s: _Raised(str(v[0]), float(v[1])) for s, v in state.get("raised", {}).items()
        }


class Pipeline:
    """Every configured window and rule, fed together: readings in, aggregates and alerts out."""

    def __init__(self, cfg: ProcessingConfig) -> None:
        self.windows = [TumblingMean(w) for w in cfg.windows]
        self.rules = [ThresholdRule(r) for r in cfg.rules]

    def feed(self, readings: Sequence[Event]) -> tuple[list[NewEvent], list[NewEvent]]:
        """Aggregates and alerts caused by a batch of readings."""
        aggregates = [a for w in self.windows for a in w.feed(readings)]
        return aggregates, self._rules(aggregates)

    def tick(self, now_mono: float, grace: float) -> tuple[list[NewEvent], list[NewEvent]]:
        """Aggregates and alerts of windows whose time is up."""
        aggregates = [a for w in self.windows for a in w.tick(now_mono, grace)]
        return aggregates, self._rules(aggregates)

    def _rules(self, aggregates: list[NewEvent]) -> list[NewEvent]:
        if not aggregates:
            return []
        return [alert for rule in self.rules for alert in rule.feed(aggregates)]

    @property
    def late(self) -> int:
        """Readings that arrived for windows already closed."""
        return sum(w.stats.late for w in self.windows)

    def snapshot(self) -> dict[str, Any]:
        """The whole processing state, keyed by window and rule name."""
        return {
            "windows": {w.cfg.name: w.snapshot() for w in self.windows},
            "rules": {r.cfg.name: r.snapshot() for r in self.rules},
        }

    def restore(self, state: dict[str, Any]) -> None:
        """Load what `snapshot` returned; windows and rules no longer configured are ignored."""
        for w in self.windows:
            w.restore(state.get("windows", {}).get(w.cfg.name, {}))
        for r in self.rules:
            r.restore(state.get("rules", {}).get(r.cfg.name, {}))
