"""One contract, every driver: open, read, close; close while blocked; close twice.

Each implementation is built by `build_driver` from its config, on real parts (a pty pair
stands in for the serial device), and set up so that after its first batch it has nothing more
to say for a long while: the serial device stays silent, the simulator ticks every 100 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest

from agent.config import SerialInputConfig, SimulatedInputConfig
from agent.events import Reading, Rejected
from drivers import Driver, build_driver
from drivers.base import Batch
from drivers.serial import SerialDriver
from drivers.simulated import SimulatedDriver
from tests.test_driver_serial import PtyDevice

TIMEOUT = 5.0


@dataclass
class Harness:
    driver: Driver
    produce: Callable[[], None]  # make the source send at least one item


def _serial() -> Iterator[Harness]:
    device = PtyDevice()
    cfg = SerialInputConfig(type="serial", name="contract", port=device.path)
    driver = build_driver(cfg)
    assert isinstance(driver, SerialDriver)
    try:
        yield Harness(driver, lambda: device.write(b'{"sensor": "t", "value": 1}\nbad\n'))
    finally:
        device.close()


def _simulated() -> Iterator[Harness]:
    cfg = SimulatedInputConfig.model_validate(
        {"type": "simulated", "name": "contract", "rate": 0.01, "sensors": [{"name": "t"}]}
    )
    driver = build_driver(cfg)
    assert isinstance(driver, SimulatedDriver)
    yield Harness(driver, lambda: None)


@pytest.fixture(params=[_serial, _simulated], ids=["serial", "simulated"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    make: Callable[[], Iterator[Harness]] = request.param
    for h in make():
        yield h
        await h.driver.close()


async def next_batch(driver: Driver) -> Batch:
    return await anext(aiter(driver))


async def test_is_a_driver(harness: Harness) -> None:
    assert isinstance(harness.driver, Driver)
    assert harness.driver.name == "contract"


async def test_open_read_close(harness: Harness) -> None:
    driver = harness.driver
    await driver.open()
    harness.produce()
    batch = await asyncio.wait_for(next_batch(driver), TIMEOUT)
    assert batch.items
    for item in batch.items:
        assert isinstance(item, Reading | Rejected)
        assert item.source == "contract"
    await driver.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(next_batch(driver), TIMEOUT)


async def test_close_while_blocked_ends_iteration(harness: Harness) -> None:
    driver = harness.driver
    await driver.open()
    harness.produce()
    received: list[Batch] = []

    async def consume() -> None:
        async for batch in driver:
            received.append(batch)

    task = asyncio.create_task(consume())
    deadline = asyncio.get_running_loop().time() + TIMEOUT
    while not received:  # the first batch, then the driver waits for more
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.001)
    assert not task.done()
    await driver.close()
    await asyncio.wait_for(task, 1.0)  # ends by itself, promptly, without an error


async def test_close_twice(harness: Harness) -> None:
    driver = harness.driver
    await driver.open()
    await driver.close()
    await driver.close()


async def test_close_before_open(harness: Harness) -> None:
    await harness.driver.close()
