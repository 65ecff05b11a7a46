"""The simulated driver: seeded determinism, `count`, real-time pacing, the fast mode."""

from __future__ import annotations

import asyncio
import itertools
import math
from typing import Any

import pytest

from agent.config import SimulatedInputConfig
from agent.events import Reading
from drivers.simulated import SimulatedDriver

TIMEOUT = 5.0


def sim_config(**overrides: Any) -> SimulatedInputConfig:
    data: dict[str, Any] = {
        "type": "simulated",
        "name": "sim",
        "rate": 0,
        "sensors": [
            {"name": "temp", "unit": "C", "base": 20, "amplitude": 5, "period": 10},
            {"name": "hum", "unit": "%", "base": 50, "amplitude": 10, "period": 7, "noise": 1},
            {"name": "flat", "amplitude": 0, "noise": 0},
        ],
        "seed": 42,
        "count": 10_000,
    }
    data.update(overrides)
    return SimulatedInputConfig.model_validate(data)


async def run(cfg: SimulatedInputConfig) -> tuple[list[Reading], list[int]]:
    """Every reading of a run that ends by itself, and the size of each batch."""
    readings: list[Reading] = []
    sizes: list[int] = []

    async def collect() -> None:
        async with SimulatedDriver(cfg) as driver:
            async for batch in driver:
                sizes.append(len(batch.items))
                for item in batch.items:
                    assert isinstance(item, Reading)
                    readings.append(item)

    await asyncio.wait_for(collect(), TIMEOUT)
    return readings, sizes


async def test_same_seed_same_values_whatever_the_batching() -> None:
    a, _ = await run(sim_config(batch_max=1000))
    b, sizes = await run(sim_config(batch_max=77))
    assert max(sizes) == 77
    assert [(r.sensor, r.value, r.unit) for r in a] == [(r.sensor, r.value, r.unit) for r in b]
    c, _ = await run(sim_config(seed=43))
    assert [r.value for r in a] != [r.value for r in c]


async def test_readings_follow_the_signal_model() -> None:
    readings, _ = await run(sim_config(count=3000))
    assert [r.sensor for r in readings[:6]] == ["temp", "hum", "flat"] * 2
    assert [r.unit for r in readings[:3]] == ["C", "%", None]
    assert all(r.source == "sim" and r.time == r.recv_time for r in readings)
    by_sensor: dict[str, list[float]] = {}
    for r in readings:
        by_sensor.setdefault(r.sensor, []).append(r.value)
    assert by_sensor["flat"] == [20.0] * 1000
    # Tick k is at t = k seconds in fast mode: temp is 20 + 5 sin(2 pi k / 10) + noise(0.1).
    for k, value in enumerate(by_sensor["temp"][:50]):
        assert abs(value - (20 + 5 * math.sin(2 * math.pi * k / 10))) < 1.0
    assert min(by_sensor["temp"]) > 14.4 and max(by_sensor["temp"]) < 25.6
    hum = by_sensor["hum"]
    assert 49 < sum(hum) / len(hum) < 51


@pytest.mark.parametrize(
    ("count", "batch_max"), [(0, 10), (1, 10), (10, 10), (1001, 100), (100_000, 1000)]
)
async def test_count_is_honoured(count: int, batch_max: int) -> None:
    readings, sizes = await run(sim_config(count=count, batch_max=batch_max))
    assert len(readings) == count
    assert all(0 < size <= batch_max for size in sizes)


async def test_fast_mode_without_count_runs_until_closed() -> None:
    driver = SimulatedDriver(sim_config(count=None))
    await driver.open()
    total = 0
    async for batch in driver:
        total += len(batch.items)
        if total >= 200_000:
            await driver.close()
    assert total == 200_000


async def test_real_time_pacing() -> None:
    """200 readings/s per sensor: the first tick comes at once, the others as they fall due."""
    cfg = sim_config(rate=200, count=60)
    loop = asyncio.get_running_loop()
    started = loop.time()
    readings, sizes = await run(cfg)
    elapsed = loop.time() - started
    assert len(readings) == 60
    assert len(sizes) > 1 and all(size % 3 == 0 for size in sizes)  # whole ticks, paced
    # 20 ticks at 5 ms apart: the last falls due 95 ms after the first.
    assert elapsed >= 0.09
    assert all(b.mono >= a.mono for a, b in itertools.pairwise(readings))


async def test_no_sensors_ends_at_once() -> None:
    readings, _ = await run(sim_config(sensors=[], count=None))
    assert readings == []
