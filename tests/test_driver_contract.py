"""One contract, every driver: open, read, bad input, the source going away, close while
blocked, close twice.

Each implementation is built by `build_driver` from its config, on real parts (a pty pair
stands in for the serial device, a mosquitto of the test's own is the MQTT broker), and set up
so that after what `produce` made it send it has nothing more to say for a long while: the
serial device and the broker stay silent, the simulator ticks every 100 s.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest

from agent.config import MqttInputConfig, SerialInputConfig, SimulatedInputConfig
from agent.events import Reading, Rejected
from drivers import Driver, build_driver
from drivers.base import Batch, DriverError
from drivers.mqtt import MqttDriver
from drivers.serial import SerialDriver
from drivers.simulated import SimulatedDriver
from tests.conftest import Broker
from tests.test_driver_mqtt import publish
from tests.test_driver_serial import PtyDevice

TIMEOUT = 5.0


@dataclass
class Harness:
    driver: Driver
    produce: Callable[[], None]  # make the source send at least one item (one bad if it can)
    bad_input: bool = True  # `produce` sends a good item and a bad one
    vanish: Callable[[], None] | None = None  # the source goes away (unplugged, broker down)


def _serial(request: pytest.FixtureRequest) -> Iterator[Harness]:
    device = PtyDevice()
    cfg = SerialInputConfig(type="serial", name="contract", port=device.path)
    driver = build_driver(cfg)
    assert isinstance(driver, SerialDriver)
    try:
        yield Harness(
            driver,
            lambda: device.write(b'{"sensor": "t", "value": 1}\nbad\n'),
            vanish=device.unplug,
        )
    finally:
        device.close()


def _simulated(request: pytest.FixtureRequest) -> Iterator[Harness]:
    cfg = SimulatedInputConfig.model_validate(
        {"type": "simulated", "name": "contract", "rate": 0.01, "sensors": [{"name": "t"}]}
    )
    driver = build_driver(cfg)
    assert isinstance(driver, SimulatedDriver)
    yield Harness(driver, lambda: None, bad_input=False)


def _mqtt(request: pytest.FixtureRequest) -> Iterator[Harness]:
    broker: Broker = request.getfixturevalue("make_broker")()
    cfg = MqttInputConfig.model_validate(
        {"type": "mqtt", "name": "contract", "url": broker.url, "topics": ["c/#"],
         "topic_template": "c/{sensor}"}
    )  # fmt: skip
    driver = build_driver(cfg)
    assert isinstance(driver, MqttDriver)
    yield Harness(
        driver,
        lambda: publish(broker, [("c/t", b'{"value": 1}'), ("c/t", b"{bad")]),
        vanish=broker.stop,
    )


@pytest.fixture(params=[_serial, _simulated, _mqtt], ids=["serial", "simulated", "mqtt"])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    make: Callable[[pytest.FixtureRequest], Iterator[Harness]] = request.param
    for h in make(request):
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


async def test_bad_input_is_rejected_not_raised(harness: Harness) -> None:
    if not harness.bad_input:
        pytest.skip("this source sends no bad input")
    driver = harness.driver
    await driver.open()
    harness.produce()
    items: list[Reading | Rejected] = []
    while len(items) < 2:
        items.extend((await asyncio.wait_for(next_batch(driver), TIMEOUT)).items)
    assert [type(i) for i in items] == [Reading, Rejected]
    rejected = items[1]
    assert isinstance(rejected, Rejected) and rejected.reason and rejected.raw
    await driver.close()


async def test_source_going_away_is_a_driver_error(harness: Harness) -> None:
    if harness.vanish is None:
        pytest.skip("this source cannot go away")
    driver = harness.driver
    await driver.open()
    waiting = asyncio.ensure_future(next_batch(driver))
    await asyncio.sleep(0)  # let it block
    harness.vanish()
    with pytest.raises(DriverError):
        await asyncio.wait_for(waiting, TIMEOUT)
    await driver.close()
    await driver.close()


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
