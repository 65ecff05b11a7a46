"""An in-process simulated input: a sine plus gaussian noise per sensor, for demos and benchmarks.

Reading `i` of the run belongs to sensor `i % n` at tick `i // n`; its value is
`base + amplitude * sin(2 pi t / period) + noise * N(0, 1)` with signal time `t = tick / rate`
(`t = tick` seconds when `rate <= 0`), and the normal draws come, in reading order, from one
numpy Generator seeded with `seed`. So a seeded run yields the same values whatever its timing
and however its batches are cut.
"""

from __future__ import annotations

import asyncio
import math
import time
from types import TracebackType
from typing import Self

import numpy as np

from agent.config import SimulatedInputConfig
from agent.events import Reading, Rejected
from drivers.base import Batch


class SimulatedDriver:
    """Readings from simulated sensors, at `rate` readings/s per sensor in real time.

    Each batch carries the readings due now, at most `batch_max` of them, in tick order and
    within a tick in sensor order. When `rate <= 0` readings come as fast as the consumer takes
    them (the benchmark's fire hose), `batch_max` at a time. Iteration ends after `count`
    readings when it is set (or at once when there are no sensors), or at `close`, which may be
    called while iteration waits for the next tick, and more than once. Iteration is never
    called concurrently with itself. A slow consumer is never outrun: readings that fell due
    while it was busy come in the next batches, `batch_max` at a time.
    """

    def __init__(self, cfg: SimulatedInputConfig) -> None:
        self.name = cfg.name
        self.cfg = cfg
        sensors = cfg.sensors
        self._sensors = [(s.name, s.unit) for s in sensors]
        self._base = np.array([s.base for s in sensors], dtype=np.float64)
        self._amplitude = np.array([s.amplitude for s in sensors], dtype=np.float64)
        self._omega = np.array(
            [2 * math.pi / s.period if s.period > 0 else 0.0 for s in sensors], dtype=np.float64
        )
        self._noise = np.array([s.noise for s in sensors], dtype=np.float64)
        self._rng = np.random.default_rng(cfg.seed)
        self._limit = math.inf if cfg.count is None else cfg.count
        self._emitted = 0
        self._start: float | None = None
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None

    async def open(self) -> None:
        """Start the clock: the first tick is due at once."""
        self._start = time.monotonic()
        self._closed = False

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        if self._start is None:
            raise RuntimeError(f"simulated input {self.name!r} is not open")
        n, rate, batch_max = len(self._sensors), self.cfg.rate, self.cfg.batch_max
        while True:
            if self._closed or n == 0 or self._emitted >= self._limit:
                raise StopAsyncIteration
            first = self._emitted
            if rate <= 0:
                # Let other tasks run between batches even when the consumer never waits.
                await asyncio.sleep(0)
                if self._closed:
                    raise StopAsyncIteration
                due: float = first + batch_max
            else:
                ticks_due = math.floor((time.monotonic() - self._start) * rate) + 1
                due = ticks_due * n
            end = int(min(due, first + batch_max, self._limit))
            if end > first:
                return self._batch(first, end)
            await self._sleep(self._start + (first // n) / rate - time.monotonic())

    def _batch(self, first: int, end: int) -> Batch:
        n, rate = len(self._sensors), self.cfg.rate
        index = np.arange(first, end)
        sensor = index % n
        t = (index // n) / (rate if rate > 0 else 1.0)
        values = (
            self._base[sensor]
            + self._amplitude[sensor] * np.sin(self._omega[sensor] * t)
            + self._noise[sensor] * self._rng.standard_normal(end - first)
        )
        self._emitted = end
        now, mono, source, sensors = time.time(), time.monotonic(), self.name, self._sensors
        items: list[Reading | Rejected] = [
            Reading(sensors[s][0], v, sensors[s][1], now, now, mono, source)
            for s, v in zip(sensor.tolist(), values.tolist(), strict=True)
        ]
        return Batch(items)

    async def _sleep(self, delay: float) -> None:
        """Wait `delay` seconds, or until `close`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(max(0.0, delay), _wake, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            self._waiter = None

    async def close(self) -> None:
        """End iteration; safe while iteration waits, and twice."""
        self._closed = True
        if self._waiter is not None:
            _wake(self._waiter)

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
