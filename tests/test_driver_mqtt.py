"""The MQTT input against a real mosquitto: decoding, and acknowledgement only after commit."""

from __future__ import annotations

import asyncio
import itertools

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import MqttInputConfig
from agent.events import Reading, Rejected
from drivers.base import Batch, DriverError
from drivers.mqtt import MqttDriver, topic_pattern
from tests.conftest import Broker, free_port

_ids = itertools.count()


def publish(broker: Broker, messages: list[tuple[str, bytes]], qos: int = 1) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{next(_ids)}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=qos) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)
    client.loop_stop()
    client.disconnect()


def config(broker: Broker, **kw: object) -> MqttInputConfig:
    base: dict[str, object] = {
        "type": "mqtt",
        "name": "m",
        "url": broker.url,
        "client_id": f"agent-{next(_ids)}",
        "topics": ["t/#"],
        "topic_template": "t/{device}/{sensor}",
    }
    base.update(kw)
    return MqttInputConfig.model_validate(base)


async def collect(driver: MqttDriver, n: int, ack: bool = True) -> list[Reading | Rejected]:
    items: list[Reading | Rejected] = []
    async with asyncio.timeout(10):
        async for batch in driver:
            items.extend(batch.items)
            if ack and batch.ack:
                batch.ack()
            if len(items) >= n:
                break
    return items


def test_topic_template() -> None:
    m = topic_pattern("sensors/{device}/{sensor}").match("sensors/pi1/temp")
    assert m is not None and m.groupdict() == {"device": "pi1", "sensor": "temp"}
    assert topic_pattern("sensors/{sensor}").match("sensors/a/b") is None


async def test_decodes_json_numbers_and_bad_payloads(broker: Broker) -> None:
    driver = MqttDriver(config(broker, format="json"))
    await driver.open()
    try:
        publish(broker, [
            ("t/pi/temp", b'{"value": 21.5, "unit": "C"}'),
            ("t/pi/x", b'{"sensor": "hum", "value": 40}'),
            ("t/pi/temp", b"{not json"),
            ("t/pi/temp", b'{"value": NaN}'),
        ])  # fmt: skip
        items = await collect(driver, 4)
    finally:
        await driver.close()
    readings = [i for i in items if isinstance(i, Reading)]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [(r.sensor, r.value, r.unit) for r in readings] == [
        ("pi.temp", 21.5, "C"),
        ("hum", 40.0, None),
    ]
    assert sorted(r.reason for r in rejected) == ["invalid_json", "nan"]
    assert all(r.source == "m" for r in items)


async def test_bare_number_payloads_take_the_sensor_from_the_topic(broker: Broker) -> None:
    driver = MqttDriver(
        config(broker, format="number", topic_template="t/{sensor}", topics=["t/+"])
    )
    await driver.open()
    try:
        publish(broker, [("t/temp", b"21.25"), ("t/temp", b"warm")])
        items = await collect(driver, 2)
    finally:
        await driver.close()
    assert isinstance(items[0], Reading) and (items[0].sensor, items[0].value) == ("temp", 21.25)
    assert isinstance(items[1], Rejected) and items[1].reason == "not_a_number"


async def test_unacknowledged_messages_are_redelivered(broker: Broker) -> None:
    """Write-ahead at the source: a message is PUBACKed only by Batch.ack (after the commit)."""
    cfg = config(broker)
    driver = MqttDriver(cfg)
    await driver.open()  # creates the persistent session and its subscription
    publish(broker, [(f"t/pi/s{i}", b'{"value": %d}' % i) for i in range(5)])
    first = await collect(driver, 5, ack=False)
    assert len(first) == 5
    await driver.close()  # "crash" before the commit: nothing was acknowledged
    again = MqttDriver(cfg)
    await again.open()
    try:
        redelivered = await collect(again, 5, ack=True)
    finally:
        await again.close()
    assert sorted(r.value for r in redelivered if isinstance(r, Reading)) == [0, 1, 2, 3, 4]
    # Acknowledged now: a third session gets nothing more.
    third = MqttDriver(cfg)
    await third.open()
    try:
        publish(broker, [("t/pi/end", b'{"value": 99}')])
        rest = await collect(third, 1)
    finally:
        await third.close()
    assert [r.value for r in rest if isinstance(r, Reading)] == [99.0]


async def test_close_while_waiting_and_twice(broker: Broker) -> None:
    driver = MqttDriver(config(broker))
    await driver.open()
    it = aiter(driver)
    waiting = asyncio.ensure_future(anext(it))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    await driver.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(waiting, 5)
    await driver.close()


async def test_unreachable_broker_is_a_driver_error() -> None:
    cfg = MqttInputConfig(type="mqtt", name="m", url=f"mqtt://127.0.0.1:{free_port()}")
    with pytest.raises(DriverError, match="cannot connect"):
        await MqttDriver(cfg).open()


async def test_ack_is_a_callback_not_a_side_effect_of_reading(broker: Broker) -> None:
    driver = MqttDriver(config(broker))
    await driver.open()
    try:
        publish(broker, [("t/pi/a", b'{"value": 1}')])
        batch: Batch = await asyncio.wait_for(anext(aiter(driver)), 10)
        assert batch.ack is not None
    finally:
        await driver.close()
