"""The MQTT input against real mosquittos: decoding, acknowledgement only after the commit,
persistent sessions (MQTT 3.1.1 and 5), brokers that stop or hang, TLS, and credentials.

Certificates are made by the test (trustme, in conftest's `tls_broker`); a hung broker is a
SIGSTOPped one: its connections stay open and nothing answers."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
import re
import socket
import time
from base64 import b64encode
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from agent.config import MqttInputConfig
from agent.events import Reading, Rejected
from drivers import mqtt as mqtt_driver
from drivers.base import Batch, DriverError
from drivers.mqtt import MqttDriver, topic_pattern
from tests.conftest import Broker, TlsBroker, eventually, free_port

_ids = itertools.count()


def publish(
    broker: Broker, messages: list[tuple[str, bytes]], qos: int = 1, retain: bool = False
) -> None:
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{next(_ids)}")
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    infos = [client.publish(topic, payload, qos=qos, retain=retain) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(10)
    client.disconnect()  # wakes the network thread at once, which loop_stop then joins
    client.loop_stop()


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


async def received(
    broker: Broker, cfg: MqttInputConfig, n: int, messages: list[tuple[str, bytes]]
) -> list[Reading | Rejected]:
    """What a driver of `cfg`, subscribed first, gives for `messages`: `n` items, acknowledged."""
    driver = MqttDriver(cfg)
    await driver.open()
    try:
        publish(broker, messages)
        return await collect(driver, n)
    finally:
        await driver.close()


def test_config_reads_protocol_and_rejects_what_cannot_work() -> None:
    from agent.config import ConfigError, parse_config

    def one(line: str) -> MqttInputConfig:
        cfg = parse_config(f"inputs:\n  - {{type: mqtt, name: m, {line}}}\n")
        assert isinstance(cfg.inputs[0], MqttInputConfig)
        return cfg.inputs[0]

    assert one("protocol: 5").protocol == "5"
    assert one("protocol: 3.1.1").protocol == "3.1.1"
    # The topic names the sensor, so lines need not (and the decoder check knows it).
    assert one("format: regex, regex: '(?P<value>[0-9]+)'").format == "regex"
    assert one("format: csv, csv_columns: [value, unit]").format == "csv"
    for line, message in [
        ("protocol: 4", "protocol"),
        ("url: 'http://x'", "url must be mqtt://"),
        ("ca_file: /ca.pem", "ca_file is a TLS option"),
        ("url: 'mqtts://h', key_file: /k.pem", "key_file needs cert_file"),
        ("format: number, topic_template: 'a/{device}'", "topic_template needs {sensor}"),
        ("topic_template: 'a/{x}/{x}'", "names a {field} twice"),
        ("keepalive: 500ms", "keepalive must be between 1s"),
        ("topics: []", "topics cannot be empty"),
        ("format: number, mapping: {value: v}", "mapping is for line formats, not format: number"),
        ("format: kv, json_query: data", "json_query is for format: json, not kv"),
        ("json_sensor_key: id", "json_sensor_key"),  # gone: mapping.sensor
        ("format: regex, regex: '(?P<value>[0-9]+)', topic_template: 'a/{x}'", "no 'sensor'"),
        ("format: csv, csv_columns: [value, unit], topic_template: 'a/{x}'", "no 'sensor'"),
    ]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            one(line)


def test_topic_template() -> None:
    m = topic_pattern("sensors/{device}/{sensor}").match("sensors/pi1/temp")
    assert m is not None and m.groupdict() == {"device": "pi1", "sensor": "temp"}
    assert topic_pattern("sensors/{sensor}").match("sensors/a/b") is None


async def test_decodes_json_numbers_and_bad_payloads(broker: Broker) -> None:
    items = await received(broker, config(broker, format="json"), 4, [
        ("t/pi/temp", b'{"value": 21.5, "unit": "C"}'),
        ("t/pi/x", b'{"sensor": "hum", "value": 40}'),
        ("t/pi/temp", b"{not json"),
        ("t/pi/temp", b'{"value": NaN}'),
    ])  # fmt: skip
    readings = [i for i in items if isinstance(i, Reading)]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [(r.sensor, r.value, r.unit) for r in readings] == [
        ("pi.temp", 21.5, "C"),
        ("hum", 40.0, None),
    ]
    assert sorted(r.reason for r in rejected) == ["invalid_json", "nan"]
    assert all(r.source == "m" for r in items)


async def test_bare_number_payloads_take_the_sensor_from_the_topic(broker: Broker) -> None:
    items = await received(
        broker,
        config(broker, format="number", topic_template="t/{sensor}", topics=["t/+"]),
        2,
        [("t/temp", b"21.25"), ("t/temp", b"warm")],
    )
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
    assert again.counters["redelivered"] == 5, "DUP flags counted"
    # Acknowledged now: a third session gets nothing more.
    rest = await received(broker, cfg, 1, [("t/pi/end", b'{"value": 99}')])
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


# --------------------------------------------------------------------------- payloads


async def test_json_mapping_with_a_query_dotted_paths_and_arrays(broker: Broker) -> None:
    mapping = {"sensor": "id", "value": "m.v", "unit": "u", "time": "at"}
    cfg = config(broker, json_query="data.readings", mapping=mapping)
    items = await received(broker, cfg, 5, [
        ("t/pi/x", b'{"data": {"readings": [{"id": "a", "m": {"v": 1.5}, "u": "C", "at": 1764170000},'
                   b' {"m": {"v": 2}}]}}'),
        ("t/pi/y", b'{"data": {"readings": {"m": {"v": 3}}}}'),
        ("t/pi/z", b'{"data": {}}'),
        ("t/pi/z", b'{"data": {"readings": [{"m": {"v": 4}}, {"m": {}}]}}'),
    ])  # fmt: skip
    readings = [(r.sensor, r.value, r.unit, r.time) for r in items if isinstance(r, Reading)]
    assert readings[0] == ("a", 1.5, "C", 1764170000.0)
    assert [r[:3] for r in readings[1:]] == [("pi.x", 2.0, None), ("pi.y", 3.0, None)]
    rejected = [(r.reason, r.detail) for r in items if isinstance(r, Rejected)]
    # A list is all or nothing, like a serial line: one bad item rejects the whole payload.
    assert rejected == [
        ("missing_field", "no 'data.readings'"),
        ("missing_field", "item 1: no 'm.v'"),
    ]


async def test_json_dotted_sensor_path_falls_back_to_the_topic(broker: Broker) -> None:
    mapping = {"sensor": "meta.id", "time": "meta.at"}
    items = await received(broker, config(broker, json_query="items.0", mapping=mapping), 4, [
        ("t/pi/x", b'{"items": [{"meta": {"id": "a", "at": "2025-11-26T12:00:00Z"}, "value": 1}]}'),
        ("t/pi/y", b'{"items": [{"meta": {"at": 1764170000}, "value": 2}, {"value": 9}]}'),
        ("t/pi/z", b'{"items": [5]}'),
        ("t/pi/n", b'{"items": [{"meta": {"id": null}, "value": 3}]}'),
    ])  # fmt: skip
    readings = [(r.sensor, r.value, r.time) for r in items if isinstance(r, Reading)]
    assert readings[:2] == [("a", 1.0, 1764158400.0), ("pi.y", 2.0, 1764170000.0)]
    assert readings[2][:2] == ("pi.z", 5.0)  # a bare number: all but the value from the topic
    # A null sensor is a field the reading has, and a bad one: not replaced by the topic's.
    assert [r.reason for r in items if isinstance(r, Rejected)] == ["bad_sensor"]


async def test_json_arrays_and_bare_numbers_take_names_from_the_topic(broker: Broker) -> None:
    items = await received(broker, config(broker), 4, [
        ("t/pi/temp", b"21.5"),
        ("t/pi/hum", b'[{"value": 40, "ts": "2025-11-26T12:00:00Z"}, {"sensor": "dew", "value": 9}]'),
        ("t/pi/temp", b"true"),
    ])  # fmt: skip
    assert [(r.sensor, r.value) for r in items if isinstance(r, Reading)] == [
        ("pi.temp", 21.5),
        ("pi.hum", 40.0),
        ("dew", 9.0),
    ]
    assert [r.reason for r in items if isinstance(r, Rejected)] == ["not_an_object"]


async def test_csv_payloads_of_several_lines(broker: Broker) -> None:
    items = await received(
        broker,
        config(broker, format="csv"),
        3,
        [("t/x", b"a,1.5,C,\nb,2,,1764170000\n"), ("t/x", b"c,3,,\nd,x,,\n")],
    )
    assert [(r.sensor, r.value) for r in items if isinstance(r, Reading)] == [
        ("a", 1.5),
        ("b", 2.0),
    ]
    bad = [r for r in items if isinstance(r, Rejected)]
    assert [(r.reason, r.detail.split(":")[0]) for r in bad] == [("not_a_number", "line 2")]


async def test_csv_columns_without_a_sensor_take_the_topics(broker: Broker) -> None:
    items = await received(
        broker,
        config(broker, format="csv", csv_columns=["value", "unit"]),
        3,
        [("t/pi/temp", b"21.5,C\n22,C"), ("t/nope", b"1,C")],
    )
    assert [(r.sensor, r.value) for r in items if isinstance(r, Reading)] == [
        ("pi.temp", 21.5),
        ("pi.temp", 22.0),
    ]
    assert [r.reason for r in items if isinstance(r, Rejected)] == ["bad_topic"]


async def test_kv_payloads_long_and_wide(broker: Broker) -> None:
    long = config(broker, format="kv", wide=False, mapping={"time": "at"})
    items = await received(broker, long, 4, [
        ("t/pi/x", b"sensor=a value=1.5 unit=C\nvalue: 2, at: 1764170000\r\n"),
        ("t/pi/x", b"sensor=b value=3\nsensor=c"),
        ("t/pi/x", b"value=4 value=5"),
    ])  # fmt: skip
    readings = [(r.sensor, r.value, r.unit, r.time) for r in items if isinstance(r, Reading)]
    assert readings[0] == ("a", 1.5, "C", readings[0][3])
    assert readings[1] == ("pi.x", 2.0, None, 1764170000.0)
    rejected = [(r.reason, r.detail) for r in items if isinstance(r, Rejected)]
    assert rejected == [
        ("missing_field", "line 2: no 'value'"),  # its sensor is there: the topic's is not used
        ("bad_pair", "key 'value' appears twice"),
    ]
    items = await received(
        broker,
        config(broker, format="kv", ignore=["rssi"]),
        1,
        [("t/pi/x", b"t1=21.5,t2= ;rssi=-70 unit=C ts=1764170000")],
    )
    assert [(r.sensor, r.value, r.unit, r.time) for r in items] == [("t1", 21.5, "C", 1764170000.0)]


async def test_regex_payloads_with_an_optional_sensor_group(broker: Broker) -> None:
    pattern = r"^(?:(?P<sensor>[a-z]\w*) )?(?P<value>-?[0-9.]+) ?(?P<unit>[^\s0-9.]+)?$"
    items = await received(broker, config(broker, format="regex", regex=pattern), 5, [
        ("t/pi/x", b"a 21.5 C\n-3 %\n\n7"),
        ("t/pi/x", b"status ok"),
        ("t/nope", b"8"),
    ])  # fmt: skip
    assert [(r.sensor, r.value, r.unit) for r in items if isinstance(r, Reading)] == [
        ("a", 21.5, "C"),
        ("pi.x", -3.0, "%"),
        ("pi.x", 7.0, None),
    ]
    # Off the template, a line without the sensor field has no name to take.
    assert [(r.reason, r.detail) for r in items if isinstance(r, Rejected)] == [
        ("no_match", "the line does not match the regex: 'status ok'"),
        ("missing_field", "no 'sensor'"),
    ]


async def test_empty_payloads_are_acknowledged_and_hold_no_reading(broker: Broker) -> None:
    """An empty payload is how a retained value is deleted: not a reading, not bad input."""
    cfg = config(broker)
    items = await received(broker, cfg, 1, [("t/pi/a", b""), ("t/pi/a", b'{"value": 1}')])
    assert [(i.sensor, i.value) for i in items if isinstance(i, Reading)] == [("pi.a", 1.0)]
    rest = await received(broker, cfg, 1, [("t/pi/end", b'{"value": 2}')])
    assert [i.value for i in rest if isinstance(i, Reading)] == [2.0], "the empty one was acked"


# --------------------------------------------------------------------------- sessions


async def test_mqtt5_session_persists_and_unacknowledged_messages_come_back(
    broker: Broker,
) -> None:
    cfg = config(broker, protocol=5, session_expiry="1h")
    driver = MqttDriver(cfg)
    await driver.open()
    publish(broker, [(f"t/pi/s{i}", b'{"value": %d}' % i) for i in range(5)])
    assert len(await collect(driver, 5, ack=False)) == 5
    await driver.close()
    again = MqttDriver(cfg)
    await again.open()
    try:
        redelivered = await collect(again, 5)
        assert sorted(r.value for r in redelivered if isinstance(r, Reading)) == [0, 1, 2, 3, 4]
        assert again.counters["redelivered"] == 5
        assert again.counters["sessions_new"] == 0
        publish(broker, [("t/pi/end", b'{"value": 99}')])
        assert [r.value for r in await collect(again, 1) if isinstance(r, Reading)] == [99.0]
    finally:
        await again.close()


async def test_close_sends_the_acks_of_batches_whose_commit_is_in_flight(broker: Broker) -> None:
    """SIGTERM closes the inputs while the last batch is being committed: its PUBACKs still go."""
    cfg = config(broker)
    driver = MqttDriver(cfg)
    await driver.open()
    publish(broker, [("t/pi/a", b'{"value": 1}')])
    batch = await asyncio.wait_for(anext(aiter(driver)), 10)
    assert batch.ack is not None
    asyncio.get_running_loop().call_later(0.05, batch.ack)  # the commit lands during close
    await driver.close()
    again = MqttDriver(cfg)
    await again.open()
    try:
        publish(broker, [("t/pi/end", b'{"value": 2}')])
        rest = await collect(again, 1)
    finally:
        await again.close()
    assert [r.value for r in rest if isinstance(r, Reading)] == [2.0]
    assert again.counters["redelivered"] == 0


async def test_retained_values_are_not_logged_again_on_a_resumed_session(broker: Broker) -> None:
    cfg = config(broker, topics=["ret/#"], topic_template="ret/{sensor}", format="number")
    first = MqttDriver(cfg)
    await first.open()
    try:
        publish(broker, [("ret/level", b"7")], retain=True)
        live = await collect(first, 1)
    finally:
        await first.close()
    assert [(r.sensor, r.value) for r in live if isinstance(r, Reading)] == [("level", 7.0)]
    resumed = MqttDriver(cfg)
    await resumed.open()  # resubscribes; the broker sends the retained 7 again: skipped
    try:
        await eventually(lambda: resumed.counters["retained_skipped"] == 1, what="the skip")
        publish(broker, [("ret/level", b"8")])
        assert [r.value for r in await collect(resumed, 1) if isinstance(r, Reading)] == [8.0]
    finally:
        await resumed.close()
    fresh = MqttDriver(
        config(broker, topics=["ret/#"], topic_template="ret/{sensor}", format="number")
    )
    await fresh.open()  # a new session: the retained value is the current state, kept
    try:
        assert [r.value for r in await collect(fresh, 1) if isinstance(r, Reading)] == [7.0]
    finally:
        await fresh.close()
        publish(broker, [("ret/level", b"")], retain=True)


async def test_qos0_flood_pauses_reading_at_max_inflight(broker: Broker) -> None:
    """Bounded memory with no window from the broker: the driver stops reading, TCP holds."""
    driver = MqttDriver(config(broker, qos=0, max_inflight=10))
    await driver.open()
    try:
        publish(broker, [("t/pi/s", b'{"value": %d}' % i) for i in range(100)], qos=0)
        await eventually(lambda: len(driver._inbox) >= 10, what="the inbox to fill")
        first = await asyncio.wait_for(anext(aiter(driver)), 10)
        assert len(first.items) == 10 and first.ack is None
        rest = await collect(driver, 90)
    finally:
        await driver.close()
    values = [r.value for r in first.items + rest if isinstance(r, Reading)]
    assert values == [float(i) for i in range(100)]


async def test_large_messages_pause_reading_at_inbox_bytes(
    broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window counts messages; held bytes are bounded too (max_inflight large messages
    would be hundreds of MiB on a Pi), and nothing is lost while reading waits."""
    monkeypatch.setattr(mqtt_driver, "INBOX_BYTES", 64 * 1024)
    driver = MqttDriver(config(broker, qos=0, max_inflight=4096))
    await driver.open()
    pad = b" " * 16_000  # JSON allows blanks: a 16 KB message holding one reading
    try:
        publish(broker, [("t/pi/s", b'{"value": %d}' % i + pad) for i in range(40)], qos=0)
        await eventually(lambda: driver._paused, what="reading to pause")
        held = driver._inbox_bytes
        assert sum(len(m[1]) for m in driver._inbox) == held
        # Paused at the first message that reached the bound, not at max_inflight.
        assert 64 * 1024 <= held < 64 * 1024 + 17_000, held
        got = await collect(driver, 40)
    finally:
        await driver.close()
    assert [r.value for r in got if isinstance(r, Reading)] == [float(i) for i in range(40)]


# --------------------------------------------------------------------------- the read path


def publish_packet(topic: str, payload: bytes, mid: int, *, v5: bool, flags: int = 0) -> bytes:
    """A PUBLISH as a broker sends it (QoS 1 when `mid`, else 0; MQTT 5 with properties)."""
    body = len(topic).to_bytes(2, "big") + topic.encode()
    if mid:
        body += mid.to_bytes(2, "big")
    if v5:  # a payload format indicator and a user property, which the driver skips
        props = b"\x01\x01" + b"\x26" + b"\x00\x01k" + b"\x00\x02vv"
        body += bytes([len(props)]) + props
    body += payload
    size, length = len(body), bytearray()
    while True:
        size, digit = size >> 7, size & 0x7F
        length.append(digit | (0x80 if size else 0))
        if not size:
            break
    return bytes([0x30 | (0x02 if mid else 0) | flags]) + bytes(length) + body


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 1000, 1 << 20])
def test_publish_packets_are_taken_whole_however_the_bytes_arrive(
    protocol: str, chunk: int
) -> None:
    """The driver frames PUBLISH packets itself, and leaves paho every other packet, whole:
    a PINGRESP in between still reaches paho, whatever the bytes' grouping into reads."""
    v5 = protocol == "5"
    big = b"[" + b",".join(b'{"sensor":"s","value":%d}' % i for i in range(3000)) + b"]"
    stream = b"".join(
        [
            publish_packet("t/pi/a", b'{"value": 1}', 1, v5=v5),
            publish_packet("t/pi/b", b'{"value": 2}', 0, v5=v5),
            b"\xd0\x00",  # PINGRESP
            publish_packet("t/pi/c", big, 65535, v5=v5),  # over 16 KiB: a 3-byte length
            publish_packet("t/pi/a", b'{"value": 3}', 7, v5=v5, flags=0x08),  # DUP
            publish_packet("t/pi/a", b"", 8, v5=v5),
        ]
    )
    cfg = MqttInputConfig.model_validate(
        {"type": "mqtt", "name": "m", "protocol": protocol, "topic_template": "t/{device}/{sensor}"}
    )
    driver = MqttDriver(cfg)
    client = driver._new_client(tls=False)
    with socket.socket() as sock:
        wire = mqtt_driver._Wire(sock)
        client._sock = wire  # as `open` hands it over
        client._ping_t = 1.0  # a PINGREQ is out
        for i in range(0, len(stream), chunk):
            wire.buf += stream[i : i + chunk]
            assert driver._take(client, wire)
        assert not wire.buf
    assert client._ping_t == 0, "paho read the PINGRESP"
    assert [(t[0][0], t[0][1], t[2], t[3]) for t in driver._inbox] == [
        ("t/pi/a", "pi.a", 1, 1),
        ("t/pi/b", "pi.b", 0, 0),
        ("t/pi/c", "pi.c", 65535, 1),
        ("t/pi/a", "pi.a", 7, 1),
        ("t/pi/a", "pi.a", 8, 1),
    ]
    assert [t[1] for t in driver._inbox] == [
        b'{"value": 1}',
        b'{"value": 2}',
        big,
        b'{"value": 3}',
        b"",
    ]
    assert driver.counters["redelivered"] == 1


async def test_a_burst_of_messages_large_and_small_all_arrive_once(broker: Broker) -> None:
    """Many messages per socket read, and one larger than a read: each arrives once, in order,
    and their PUBACKs (a write per batch) leave nothing for the broker to send again."""
    cfg = config(broker, max_payload="1MiB")
    driver = MqttDriver(cfg)
    await driver.open()
    big = b"[" + b",".join(b'{"sensor":"big","value":%d}' % i for i in range(4000)) + b"]"
    assert len(big) > 100_000
    messages = [(f"t/pi/s{i % 7}", b'{"value": %d}' % i) for i in range(2000)]
    messages.insert(1000, ("t/pi/big", big))
    try:
        publish(broker, messages)
        items = await collect(driver, 2000 + 4000)
    finally:
        await driver.close()
    readings = [r for r in items if isinstance(r, Reading)]
    assert [r.value for r in readings if r.sensor != "big"] == [float(i) for i in range(2000)]
    assert [r.value for r in readings if r.sensor == "big"] == [float(i) for i in range(4000)]
    again = MqttDriver(cfg)
    await again.open()
    try:
        publish(broker, [("t/pi/end", b'{"value": -1}')])
        assert [r.value for r in await collect(again, 1) if isinstance(r, Reading)] == [-1.0]
    finally:
        await again.close()
    assert again.counters["redelivered"] == 0


async def test_mqtt5_messages_with_properties(broker: Broker) -> None:
    driver = MqttDriver(config(broker, protocol=5))
    await driver.open()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.connect("127.0.0.1", broker.port)
    client.loop_start()
    try:
        props = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]
        props.UserProperty = [("site", "north"), ("rack", "7")]
        props.ContentType = "application/json"
        infos = [
            client.publish(f"t/pi/s{i}", b'{"value": %d}' % i, qos=i % 2, properties=props)
            for i in range(20)
        ]
        for info in infos:
            info.wait_for_publish(10)
        items = await collect(driver, 20)
    finally:
        client.disconnect()
        client.loop_stop()
        await driver.close()
    assert [(r.sensor, r.value) for r in items if isinstance(r, Reading)] == [
        (f"pi.s{i}", float(i)) for i in range(20)
    ]


# --------------------------------------------------------------------------- failures


async def test_a_silent_broker_is_detected_by_keepalive(make_broker: Callable[..., Broker]) -> None:
    """SIGSTOP: TCP stays up, nothing answers; no PINGRESP within the keepalive ends it."""
    b = make_broker()
    driver = MqttDriver(config(b, keepalive="1s"))
    await driver.open()
    b.freeze()
    try:
        started = time.monotonic()
        with pytest.raises(DriverError, match="connection to the broker lost: Keep alive timeout"):
            await asyncio.wait_for(anext(aiter(driver)), 5)
        assert time.monotonic() - started < 4
    finally:
        b.thaw()
        await driver.close()
    await driver.open()  # the same driver reconnects once the broker answers again
    try:
        publish(b, [("t/pi/a", b'{"value": 1}')])
        assert len(await collect(driver, 1)) == 1
    finally:
        await driver.close()


async def test_a_frozen_broker_fails_open_within_connect_timeout(
    make_broker: Callable[..., Broker],
) -> None:
    b = make_broker()
    b.freeze()
    started = time.monotonic()
    with pytest.raises(DriverError, match="did not complete the MQTT handshake"):
        await MqttDriver(config(b, connect_timeout="500ms")).open()
    assert time.monotonic() - started < 3


async def test_broker_stop_is_a_driver_error(make_broker: Callable[..., Broker]) -> None:
    b = make_broker()
    driver = MqttDriver(config(b))
    await driver.open()
    b.stop()
    with pytest.raises(DriverError, match="connection to the broker lost"):
        await asyncio.wait_for(anext(aiter(driver)), 5)
    await driver.close()
    with pytest.raises(DriverError, match="connection refused"):
        await driver.open()


# --------------------------------------------------------------------------- TLS


def tls_config(tls: TlsBroker, **kw: object) -> MqttInputConfig:
    base: dict[str, object] = {
        "url": tls.url,
        "ca_file": str(tls.ca_file),
        "cert_file": str(tls.cert_file),
        "key_file": str(tls.key_file),
        "connect_timeout": "5s",
    }
    base.update(kw)
    return config(tls.plain, **{k: v for k, v in base.items() if v is not None})


async def test_tls_with_ca_and_client_certificate(tls_broker: TlsBroker) -> None:
    driver = MqttDriver(tls_config(tls_broker))
    await driver.open()
    try:
        publish(tls_broker.plain, [("t/pi/s", b'{"value": %d}' % i) for i in range(200)])
        items = await collect(driver, 200)
    finally:
        await driver.close()
    assert [r.value for r in items if isinstance(r, Reading)] == [float(i) for i in range(200)]


async def test_tls_wrong_ca_is_a_clear_driver_error(tls_broker: TlsBroker) -> None:
    driver = MqttDriver(tls_config(tls_broker, ca_file=str(tls_broker.other_ca_file)))
    with pytest.raises(DriverError, match=r"certificate not accepted.*is ca_file the CA"):
        await driver.open()


async def test_tls_without_client_certificate_is_refused(tls_broker: TlsBroker) -> None:
    driver = MqttDriver(tls_config(tls_broker, cert_file=None, key_file=None))
    with pytest.raises(DriverError, match="client certificate"):
        await driver.open()


async def test_tls_wrong_host_name_is_a_driver_error(tls_broker: TlsBroker) -> None:
    driver = MqttDriver(tls_config(tls_broker, url=tls_broker.wrong_name_url))
    with pytest.raises(DriverError, match="does not name the host"):
        await driver.open()


async def test_tls_unreadable_files_are_driver_errors(
    tls_broker: TlsBroker, tmp_path: Path
) -> None:
    with pytest.raises(DriverError, match=r"ca_file .*missing\.pem: No such file"):
        await MqttDriver(tls_config(tls_broker, ca_file=str(tmp_path / "missing.pem"))).open()
    (tmp_path / "junk.pem").write_text("not a certificate")
    with pytest.raises(DriverError, match=r"cert_file .*junk\.pem"):
        await MqttDriver(tls_config(tls_broker, cert_file=str(tmp_path / "junk.pem"))).open()


# --------------------------------------------------------------------------- credentials


async def test_username_and_password(make_broker: Callable[..., Broker], tmp_path: Path) -> None:
    salt = os.urandom(12)
    digest = hashlib.pbkdf2_hmac("sha512", b"s3cret", salt, 101)  # mosquitto_passwd's $7$
    passwords = tmp_path / "passwords"
    passwords.write_text(f"edge:$7$101${b64encode(salt).decode()}${b64encode(digest).decode()}\n")
    b = make_broker(extra=f"password_file {passwords}\n")
    for protocol in ("3.1.1", "5"):
        good = MqttDriver(config(b, username="edge", password="s3cret", protocol=protocol))
        await good.open()
        await good.close()
        wrong = config(b, username="edge", password="guess", protocol=protocol)
        with pytest.raises(DriverError, match="the broker refused the connection: Not authorized"):
            await MqttDriver(wrong).open()
