"""The MQTT input's fast path for JSON payloads gives exactly what the general path gives.

`MqttDriver._plain_readings` exists only to be cheaper: for any payload, topic and mapping, a
message's readings, or its rejection reason and detail, are those of the general path (the
driver with the fast path switched off), and with neither a json_query nor the topic's
sensor to fill in, those of the decoder on the raw payload, as the driver always did.
"""

from __future__ import annotations

import json
import math
from typing import Any, cast

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from agent.config import MqttInputConfig
from agent.events import Invalid, Reading, Rejected
from drivers.decoders import _KNOWN_NAMES, _KNOWN_UNITS, decoder_for
from drivers.mqtt import MqttDriver
from tests.test_decoders_fast import (
    exactly,
    mostly,
    names,
    nearly_always,
    numbers,
    odd_texts,
    raw_values,
    values,
)

RECV, MONO = 1764170000.5, 1234.5

#: Mapping variants: the plain ones the fast path takes, those it must leave alone, and odd
#: ones the config allows (a field mapped twice), where filling in the topic's name matters.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "renamed": {"mapping": {"sensor": "name", "value": "v", "unit": "u", "time": ["t", "ts"]}},
    "no-unit-one-time": {"mapping": {"unit": None, "time": "time"}},
    "no-time": {"mapping": {"time": None}},
    "no-topic-sensor": {"topic_template": "t/{device}/{kind}"},
    "query": {"json_query": "data"},
    "query-index": {"json_query": "data.0"},
    "small-payload": {"max_payload": 96},
    "dotted": {"mapping": {"sensor": "d.s", "value": "d.v", "time": "t.s"}},
    "fixed-sensor": {"sensor": "fixed"},
    "wide": {"wide": True, "ignore": ["x"]},
    "sensor-is-unit": {"mapping": {"unit": "sensor"}},
    "sensor-is-a-time": {"mapping": {"time": ["ts", "sensor"]}},
    "sensor-is-value": {"mapping": {"value": "sensor"}},
    "value-is-time": {"mapping": {"time": "value"}},
}

#: Topics that name a sensor through `t/{device}/{sensor}` (`pi.temp`, `pi.t`), and one that
#: does not match it.
TOPICS = ["t/pi/temp", "t/pi/t", "t/other"]

_KEYS = ["sensor", "value", "unit", "ts", "time", "name", "v", "u", "t", "d", "x", "data"]


def config(name: str) -> MqttInputConfig:
    base = {"type": "mqtt", "name": "m", "topics": ["t/#"], "topic_template": "t/{device}/{sensor}"}
    return MqttInputConfig.model_validate({**base, **CONFIGS[name]})


def drivers(cfg: MqttInputConfig) -> tuple[MqttDriver, MqttDriver]:
    """The input as it is, and the same with the fast path switched off (never opened: only
    decoding is used)."""
    general = MqttDriver(cfg)
    general._plain = None
    return MqttDriver(cfg), general


def decode(driver: MqttDriver, topic: str, raw: bytes) -> list[Any]:
    """What one message becomes: rejections as they are, readings `exactly`."""
    items: list[Reading | Rejected] = []
    driver._decode_message(items, (topic, driver._sensor_from_topic(topic)), raw, RECV, MONO)
    return [i if isinstance(i, Rejected) else exactly([i])[0] for i in items]


def by_decoder(cfg: MqttInputConfig, raw: bytes) -> list[Any]:
    """What the input made of a message with neither a query nor a topic's sensor to fill in,
    before the fast path: the decoder's samples of the raw payload, or its verdict."""
    found = decoder_for(cfg)(raw)
    if isinstance(found, Invalid):
        return [Rejected(raw, found.reason, found.detail, "m", RECV, MONO)]
    readings = [
        Reading(s.sensor, s.value, s.unit, RECV if s.time is None else s.time, RECV, MONO, "m")
        for s in found
    ]
    return exactly(readings)


# --------------------------------------------------------------------------- payloads


# Each field of a device's object: values the fast path takes, and odd ones, which it must
# leave to the general way (edges first, then anything).
_INVALID_NAMES = ["", " ", "\x00", "a\x1fb", "a\x85", "y" * 129, 5, 1.5, None, True, ["t"], {}]
_GOOD = {
    "sensor": st.sampled_from(["temp1", "t", "C", "pi.temp", "pi.t", "x" * 33]),
    "value": st.integers(-1000, 1000) | st.floats(-1e6, 1e6),
    "unit": st.sampled_from([None, "C", "%"]),
    "time": st.none() | st.floats(1.7e9, 1.8e9) | st.integers(1_700_000_000, 1_800_000_000),
}
_EDGES = {
    "sensor": _INVALID_NAMES,
    "value": [math.nan, math.inf, -math.inf, 2**53, 2**53 + 1, -(2**53) - 1, 10**400, -0.0,
              1e308, True, False, None, "", "21.5", "nan", "1e999", [1], {}],
    "unit": ["", "x" * 33, *_INVALID_NAMES, "🌡"],
    "time": [-1, -1.0, -1e-300, 0, 0.0, -0.0, 253402300799, 253402300799.0, 253402300799.5,
             253402300800, 1e300, 10**400, math.nan, math.inf, True, "", " 1764170000 ", "1e9",
             "2025-11-26T12:00:00Z", "2025-11-26T13:00:00+01:00", "99999-01-01", "x", [1]],
}  # fmt: skip
_ODD = {
    field: st.one_of(*[st.sampled_from(edges)] * 3, names | odd_texts | numbers)
    for field, edges in _EDGES.items()
}
# A field of one object in five is odd: a list of items is plain only if each one is.
_odd_field = st.sampled_from([None] * 16 + [*_GOOD, "extra"])


@st.composite
def _plain_objects(
    draw: st.DrawFn, cfg: MqttInputConfig, odd_field: st.SearchStrategy[str | None] = _odd_field
) -> dict[str, Any]:
    """What devices send: the fields `cfg` maps, with values the fast path takes but maybe
    one (`odd_field`), the sensor often left to the topic."""
    m = cfg.mapping
    odd = draw(odd_field)

    def field(name: str) -> Any:
        return draw(_ODD[name] if odd == name else _GOOD[name])

    obj: dict[str, Any] = {}
    if odd == "sensor" or draw(st.booleans()):
        obj[m.sensor] = field("sensor")
    if odd == "value" or draw(nearly_always):
        obj[m.value] = field("value")
    if odd == "unit" or draw(mostly):
        obj[m.unit or "unit"] = field("unit")
    keys = draw(st.lists(st.sampled_from([*m.time, "ts"]), unique=True, max_size=2))
    if odd == "time" and not keys:
        keys = [m.time[0] if m.time else "ts"]
    for key in keys:
        obj[key] = field("time")
    if odd == "extra":  # a field again, or another one
        obj[draw(st.sampled_from(_KEYS))] = draw(values)
    return obj


@st.composite
def _items(draw: st.DrawFn, cfg: MqttInputConfig) -> Any:
    """An item of a document: mostly a device's object, else a bare number, or any value."""
    # Hypothesis favours the ends of a range of choices, so the rarest is in the middle.
    kind = draw(st.sampled_from(["object"] * 6 + ["any"] + ["object"] * 6 + ["number"]))
    if kind == "object":
        return draw(_plain_objects(cfg))
    if kind == "number":
        return draw(_GOOD["value"] | _ODD["value"])
    return draw(st.sampled_from([True, False, None, "21.5", [], [1.5], {}]) | values)


@st.composite
def payloads(draw: st.DrawFn, cfg: MqttInputConfig) -> bytes:
    """A message's payload: an object or a list of items (under the query's path, mostly),
    maybe with raw JSON text `json.dumps` does not write, maybe broken, or any bytes."""
    kind = draw(st.sampled_from(["list"] * 4 + ["item"] * 3 + ["raw", "bytes", "blank"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    if kind == "blank":
        return draw(st.sampled_from([b"", b" ", b"\r\n", b"\t"]))
    if kind == "raw":
        text = draw(raw_values)
    else:
        doc = draw(st.lists(_items(cfg), max_size=6)) if kind == "list" else draw(_items(cfg))
        if cfg.json_query and draw(mostly):
            doc = {"data": [doc] if cfg.json_query == "data.0" else doc}
        text = json.dumps(doc, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))
        # Numbers as devices write them and json.dumps does not.
        if not draw(mostly):  # (or breaks it, when the digit was in a number already)
            old, new = draw(st.sampled_from(_RAW_NUMBERS))
            text = text.replace(old, new, 1)
    raw = text.encode()
    broken = draw(st.sampled_from([None] * 8 + ["utf8", "cut"]))
    if broken == "utf8":
        at = draw(st.integers(0, len(raw)))
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    elif broken == "cut":
        raw = raw[draw(st.integers(0, len(raw))) :]
    return raw


_RAW_NUMBERS = [("0", "-0"), ("1", "1E2"), ("2", "2.50"), ("5", "5e-3"), (".5", ".5e400")]


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", CONFIGS)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_message_is_exactly_what_the_general_path_makes_of_it(
    name: str, data: st.DataObject
) -> None:
    cfg = config(name)
    raw = data.draw(payloads(cfg), label="payload")
    topic = data.draw(st.sampled_from(TOPICS), label="topic")
    fast, general = drivers(cfg)
    # Names not seen before take the general path, which learns them; seen, the fast one.
    before = decode(fast, topic, raw)
    expected = decode(general, topic, raw)
    after = decode(fast, topic, raw)
    assert before == expected
    assert after == expected
    takes_topic = cfg.takes_topic_sensor and fast._sensor_from_topic(topic) is not None
    if not cfg.json_query and not takes_topic and len(raw) <= cfg.max_payload:
        assert expected == by_decoder(cfg, raw)
    event("readings" if expected and isinstance(expected[0], tuple) else "rejected or none")


@pytest.mark.parametrize(
    "name", ["default", "renamed", "no-unit-one-time", "query", "value-is-time"]
)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_one_odd_field_among_plain_objects_gets_the_general_paths_verdict(
    name: str, data: st.DataObject
) -> None:
    """The fast path's own risk: taking a value the general way checks. Plain objects around
    one with a single odd field, which the fast path must leave to the general way."""
    cfg = config(name)
    plain = _plain_objects(cfg, st.none())
    odd = _plain_objects(cfg, st.sampled_from([*_GOOD]))
    first, odd_one, last = data.draw(
        st.tuples(st.lists(plain, max_size=3), odd, st.lists(plain, max_size=3)), label="objects"
    )
    doc: Any = [*first, odd_one, *last]
    if not first and not last and data.draw(st.booleans(), label="alone"):
        doc = odd_one  # an object, not a list of one
    raw = json.dumps({"data": doc} if cfg.json_query else doc).encode()
    topic = data.draw(st.sampled_from(TOPICS), label="topic")
    fast, general = drivers(cfg)
    expected = decode(general, topic, raw)  # learns the names
    assert decode(fast, topic, raw) == expected


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_batch_of_messages_is_exactly_the_general_paths(data: st.DataObject) -> None:
    """Messages one after another, some good, some not: readings and rejections in order."""
    cfg = config(data.draw(st.sampled_from(["default", "renamed", "query"]), label="config"))
    messages = data.draw(
        st.lists(st.tuples(st.sampled_from(TOPICS), payloads(cfg)), max_size=6), label="messages"
    )
    fast, general = drivers(cfg)
    for _ in range(2):  # the second time, every name is known
        got = [item for topic, raw in messages for item in decode(fast, topic, raw)]
        assert got == [item for topic, raw in messages for item in decode(general, topic, raw)]


@pytest.mark.parametrize(
    "name", ["default", "renamed", "no-unit-one-time", "no-time", "value-is-time"]
)
@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_a_list_decoded_at_once_is_what_each_object_gives(name: str, data: st.DataObject) -> None:
    """`PlainMapping.readings` (column by column) gives exactly the readings of
    `PlainMapping.reading` on each object, or None when one of them is not plain; and it
    answers for every list of plain objects but where it says it will not (a later time key,
    numbers whose sum overflows)."""
    cfg = config(name)
    plain = MqttDriver(cfg)._plain
    assert plain is not None
    maybe_odd = data.draw(st.booleans(), label="an odd field in some")
    objects = _plain_objects(cfg) if maybe_odd else _plain_objects(cfg, st.none())
    objs = data.draw(st.lists(objects, min_size=1, max_size=8), label="objects")
    sensor = data.draw(st.none() | st.sampled_from(["temp1", "pi.t"]), label="sensor")
    _KNOWN_NAMES.update(["temp1", "t", "C", "pi.temp", "pi.t", "x" * 33])
    _KNOWN_UNITS.update(["C", "%"])
    one_by_one = [plain.reading(o, RECV, MONO, "m", "p.", sensor) for o in objs]
    at_once = plain.readings(objs, RECV, MONO, "m", "p.", sensor)
    if at_once is not None:
        assert None not in one_by_one
        assert exactly(at_once) == exactly(cast(list[Reading], one_by_one))
    elif None not in one_by_one:
        later_time = len(plain.time) > 1 and any(plain.time[0] not in o for o in objs)
        overflow = not math.isfinite(sum(cast(Reading, r).value for r in one_by_one))
        assert later_time or overflow, "plain objects, yet not taken at once"
    event("at once" if at_once is not None else "one by one")


@pytest.mark.parametrize(
    ("field", "edge"),
    [("value", v) for v in _EDGES["value"]] + [("time", t) for t in _EDGES["time"]],
)
def test_an_edge_among_plain_objects_is_decided_as_one_by_one(field: str, edge: Any) -> None:
    """Each edge value or time beside plain objects: taken at once only as each object alone
    would take it (the column checks: integer range, finiteness, time range, types)."""
    plain = MqttDriver(config("default"))._plain
    assert plain is not None
    _KNOWN_NAMES.add("temp1")
    objs = [
        {"sensor": "temp1", "value": 1.5, "ts": 1.75e9},
        {
            "sensor": "temp1",
            "value": 2,
            "ts": 1_750_000_000,
            "value" if field == "value" else "ts": edge,
        },
        {"sensor": "temp1", "value": -3.25, "ts": 1.76e9},
    ]
    one_by_one = [plain.reading(o, RECV, MONO, "m") for o in objs]
    at_once = plain.readings(objs, RECV, MONO, "m")
    if None in one_by_one:
        assert at_once is None
    else:
        assert at_once is not None
        assert exactly(at_once) == exactly(cast(list[Reading], one_by_one))


# --------------------------------------------------------------------------- examples


def _hundred(sensor: str = '"sensor":"tput100",') -> bytes:
    items = (f'{{{sensor}"value":{v},"ts":1764203000.123}}' for v in range(100))
    return f"[{','.join(items)}]".encode()


@pytest.mark.parametrize(
    ("name", "topic", "raw"),
    [
        ("default", "e2e/in/readings", _hundred()),  # bench/e2e.py's message
        ("default", "t/pi/temp", _hundred(sensor="")),  # every reading named by the topic
        ("default", "t/pi/temp", b'[21.5, {"value": 7, "unit": "C"}, -3]'),
        ("default", "t/pi/temp", b"21.5"),
        ("renamed", "t/other", b'{"name": "temp1", "v": 1.5, "u": "C", "t": 1764170000}'),
        ("query", "t/pi/temp", b'{"data": [{"value": 1}, {"sensor": "temp1", "value": 2}]}'),
        ("no-time", "t/pi/temp", b'{"value": 1, "ts": "ignored"}'),
    ],
)
def test_plain_messages_take_the_fast_path(name: str, topic: str, raw: bytes) -> None:
    cfg = config(name)
    fast, general = drivers(cfg)
    expected = decode(general, topic, raw)  # learns the names
    assert expected and all(isinstance(i, tuple) for i in expected)
    doc = json.loads(raw)
    doc = doc["data"] if cfg.json_query else doc
    sensor = fast._sensor_from_topic(topic) if cfg.takes_topic_sensor else None
    assert fast._plain_readings(doc, sensor, RECV, MONO) is not None
    assert decode(fast, topic, raw) == expected


def test_the_benchmarks_message_becomes_its_hundred_readings() -> None:
    fast, _ = drivers(config("default"))
    decode(fast, "e2e/in/readings", _hundred())
    items: list[Reading | Rejected] = []
    fast._decode_message(items, ("e2e/in/readings", None), _hundred(), RECV, MONO)
    assert items == [
        Reading("tput100", float(v), None, 1764203000.123, RECV, MONO, "m") for v in range(100)
    ]
    assert all(type(i.value) is float for i in items if isinstance(i, Reading))


@pytest.mark.parametrize(
    ("raw", "reason", "detail"),
    [
        (b'[{"value": 1}, {"value": NaN}]', "nan", "item 1: value is not finite: nan"),
        (b'[{"value": 1}, {"value": true}]', "not_a_number", "item 1: value is not a number: True"),
        (b'[{"value": 1, "unit": "' + b"x" * 33 + b'"}]', "bad_unit", None),
        (b'[{"value": 1, "ts": -1}]', "bad_time", "item 0: time outside 1970..9999: -1"),
        (b'[{"value": 1}, [2]]', "not_an_object", "item 1: expected an object, got list"),
        (b'[{"value": 1}, true]', "not_an_object", "item 1: expected an object, got bool"),
        (b'{"sensor": null, "value": 1}', "bad_sensor", "sensor is not a string: None"),
        (b'[{"value": 1}, {"unit": "C"}]', "missing_field", "item 1: no 'value'"),
        (b"\xff", "invalid_utf8", None),
        (b"[1, ", "invalid_json", None),
    ],
)
def test_a_bad_message_is_rejected_whole_with_the_general_paths_detail(
    raw: bytes, reason: str, detail: str | None
) -> None:
    fast, _ = drivers(config("default"))
    decode(fast, "t/pi/temp", b'[{"value": 1, "unit": "C"}]')  # the names are known
    found = decode(fast, "t/pi/temp", raw)
    assert len(found) == 1 and isinstance(found[0], Rejected)
    assert found[0].reason == reason and found[0].raw == raw
    if detail is not None:
        assert found[0].detail == detail


def test_a_sensor_mapped_as_the_unit_too_takes_the_topics_name_as_unit() -> None:
    """The general way writes the topic's name into the object, where the unit is read."""
    fast, _ = drivers(config("sensor-is-unit"))
    for _ in range(2):
        assert decode(fast, "t/pi/t", b'{"value": 1.5}') == exactly(
            [Reading("pi.t", 1.5, "pi.t", RECV, RECV, MONO, "m")]
        )
