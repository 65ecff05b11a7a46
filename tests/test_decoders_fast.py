"""The serial input's fast path for JSON lines gives exactly what the general path gives.

`LineDecoder.reading` (and the framer's whole-chunk split) exist only to be cheaper: for any
line and any mapping, the readings, or the rejection reason and detail, are those of
`decoder(line)` turned into readings as the serial driver always did.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.config import SerialInputConfig
from agent.events import Invalid, Reading, Rejected, Sample
from drivers.decoders import LineDecoder, decoder_for
from drivers.serial import SerialDriver

RECV, MONO = 1764170000.5, 1234.5

#: Mapping variants, from the plain case the fast path takes to those it must leave alone.
CONFIGS: dict[str, dict[str, Any]] = {
    "default": {},
    "prefixed": {"sensor_prefix": "lab/"},
    "renamed": {
        "mapping": {"sensor": "name", "value": "v", "unit": "u", "time": ["t", "ts"]},
        "sensor_prefix": "b.",
    },
    "no-unit-one-time": {"mapping": {"unit": None, "time": "time"}},
    "no-time": {"mapping": {"time": None}},
    "dotted": {"mapping": {"sensor": "d.s", "value": "d.v", "time": "t.s"}},
    "fixed-sensor": {"sensor": "fixed"},
    "wide": {"wide": True, "ignore": ["x"]},
}

_KEYS = ["sensor", "value", "unit", "ts", "time", "name", "v", "u", "t", "d", "x", "sensor "]


def config(name: str) -> SerialInputConfig:
    return SerialInputConfig.model_validate(
        {"type": "serial", "name": "dev1", "port": "/dev/null", **CONFIGS[name]}
    )


def general(
    decode: LineDecoder, line: bytes, prefix: str, recv: float = RECV, mono: float = MONO
) -> list[Reading] | Invalid:
    """What the serial driver made of a line before the fast path: `decode(line)`, its
    samples turned into readings."""
    found = decode(line)
    return found if isinstance(found, Invalid) else as_readings(found, prefix, recv, mono)


def fast(decode: LineDecoder, line: bytes, prefix: str) -> list[Reading] | Invalid:
    found = decode.reading(line, RECV, MONO, "dev1", prefix)
    if isinstance(found, Reading):
        return [found]
    return found if isinstance(found, Invalid) else as_readings(found, prefix, RECV, MONO)


def as_readings(samples: list[Sample], prefix: str, recv: float, mono: float) -> list[Reading]:
    """Samples as the serial driver hands them on: the event time is the receive time when
    the device sent none."""
    out = []
    for s in samples:
        event_time = recv if s.time is None else s.time
        out.append(Reading(prefix + s.sensor, s.value, s.unit, event_time, recv, mono, "dev1"))
    return out


def exactly(found: list[Reading] | Invalid) -> Any:
    """`found` with floats by type and repr: -0.0 is not 0.0 here, nor is 1 1.0."""
    if isinstance(found, Invalid):
        return found
    return [
        (r.sensor, _float(r.value), r.unit, _float(r.time), r.recv_time, r.mono, r.source)
        for r in found
    ]


def _float(x: float) -> tuple[type, str]:
    return type(x), repr(x)


# --------------------------------------------------------------------------- lines

names = st.sampled_from(["temp1", "t", "C", "%", "°C", "🌡", "lab.x"]) | st.text(max_size=6)
odd_texts = st.sampled_from(
    ["", " ", "\x00", "a\x1fb", "a\x85", "x" * 33, "y" * 129, "nan", "-inf", "21.5", "1e999",
     " 1764170000 ", "2025-11-26T12:00:00Z", "2025-11-26T13:00:00+01:00", "99999-01-01"]
)  # fmt: skip
_edge_numbers = [
    0, -0.0, 2**53, 2**53 + 1, -(2**53), -(2**53) - 1, 10**400, 1764170000, 1764170000.123,
    253402300799, 253402300799.0, 253402300799.5, 253402300800, -1, -1e-300, 1e308,
    math.nan, math.inf, -math.inf,
]  # fmt: skip
numbers = (
    st.floats()
    | st.integers()
    | st.floats(min_value=0, max_value=4e11)
    | st.sampled_from(_edge_numbers)
)
scalars = st.none() | st.booleans() | numbers | names | odd_texts
values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(_KEYS), children, max_size=3)
    ),
    max_leaves=6,
)
# Raw JSON value text that json.dumps does not write: big numbers, exponents, escapes.
raw_values = st.sampled_from(
    ["1" * 5000, "-0", "1E2", "1.5e-3", "21.50", "1e400", "-Infinity", "NaN", '"\\u0074emp1"',
     '"\\ud800"', '"a\tb"', "tru", "01", "[", "{}", "}"]
)  # fmt: skip
blanks = st.sampled_from(["", " ", "\t", "  ", "\r", "\n "])


@st.composite
def objects(draw: st.DrawFn) -> str:
    """An object's text: keys the mappings name (maybe twice), any values, any spacing."""
    pairs = draw(
        st.lists(
            st.tuples(st.sampled_from(_KEYS), values.map(json.dumps) | raw_values),
            max_size=6,
        )
    )
    ascii_only = draw(st.booleans())
    blank = draw(blanks)
    members = [
        json.dumps(k, ensure_ascii=ascii_only) + blank + ":" + draw(blanks) + v for k, v in pairs
    ]
    return "{" + blank + ("," + draw(blanks)).join(members) + draw(blanks) + "}"


@st.composite
def _plain_objects(draw: st.DrawFn, cfg: SerialInputConfig) -> str:
    """What devices send: the fields `cfg` maps, most with values the fast path takes."""
    m = cfg.mapping
    doc: dict[str, Any] = {}
    for key, values, present in [
        (m.sensor, names | odd_texts, nearly_always),
        (m.value, numbers | odd_texts, nearly_always),
        (m.unit or "unit", st.none() | names | odd_texts, mostly),
    ]:
        if draw(present):
            doc[key] = draw(values)
    for key in draw(st.lists(st.sampled_from([*m.time, "ts"]), unique=True, max_size=2)):
        doc[key] = draw(st.none() | numbers | odd_texts)
    for key in draw(st.lists(st.sampled_from(_KEYS), max_size=1)):  # maybe again, or another
        doc[key] = draw(values)
    return json.dumps(doc, separators=draw(st.sampled_from([(",", ":"), (", ", ": ")])))


mostly = st.sampled_from([True] * 4 + [False])
nearly_always = st.sampled_from([True] * 19 + [False])
_around = st.sampled_from([" ", "\r", "\t", "\ufeff", "x", "}", ",{}", "\x00", "\\"])


@st.composite
def lines(draw: st.DrawFn, cfg: SerialInputConfig) -> bytes:
    """One line (no terminator): mostly a device's object, else any JSON, maybe with
    something around it, maybe broken, or any bytes."""
    kind = draw(st.sampled_from(["plain"] * 4 + ["object", "list", "value", "raw", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=80))
    if kind == "plain":
        text = draw(_plain_objects(cfg))
    elif kind == "object":
        text = draw(objects())
    elif kind == "list":
        text = "[" + ",".join(draw(st.lists(objects() | _plain_objects(cfg), max_size=3))) + "]"
    else:
        text = draw(values.map(json.dumps) if kind == "value" else raw_values)
    if not draw(mostly):
        text = draw(_around) + text
    if not draw(mostly):
        text += draw(_around)
    line = text.encode()
    broken = draw(st.sampled_from([None] * 8 + ["utf8", "cut"]))
    if broken == "utf8":
        at = draw(st.integers(0, len(line)))
        line = line[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + line[at:]
    elif broken == "cut":  # as the tail of a line is
        line = line[draw(st.integers(0, len(line))) :]
    return line


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("name", CONFIGS)
@settings(max_examples=120, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_reading_is_exactly_the_general_decode(name: str, data: st.DataObject) -> None:
    cfg = config(name)
    line = data.draw(lines(cfg), label="line")
    decode, prefix = decoder_for(cfg), cfg.sensor_prefix
    # Names not seen before take the general path, which learns them; seen, the fast one.
    before = fast(decode, line, prefix)
    expected = general(decode, line, prefix)
    after = fast(decode, line, prefix)
    assert exactly(before) == exactly(expected)
    assert exactly(after) == exactly(expected)


@pytest.mark.parametrize("name", ["default", "prefixed", "renamed", "no-time", "dotted"])
@settings(max_examples=50, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), max_line=st.sampled_from([16, 64, 1024]))
def test_driver_batch_is_exactly_the_general_decode(
    name: str, data: st.DataObject, max_line: int
) -> None:
    """The driver's batch, framer included: readings and rejections in line order."""
    cfg = config(name).model_copy(update={"max_line": max_line})
    chunk_lines = data.draw(st.lists(lines(cfg), max_size=8), label="lines")
    driver = SerialDriver(cfg)  # never opened: `_batch` only frames and decodes
    lines_ = [line.replace(b"\n", b"") for line in chunk_lines]
    chunk = b"".join(line + b"\n" for line in lines_)
    for _ in range(2):  # the second time, every name is known
        items = driver._batch(chunk).items
        recv = items[0].recv_time if items else RECV
        mono = items[0].mono if items else MONO
        decode = decoder_for(cfg)
        expected: list[Any] = []
        for line in lines_:
            if len(line) > max_line:
                detail = f"line longer than {max_line} bytes"
                expected.append(Rejected(line[:max_line], "oversized", detail, "dev1", recv, mono))
                continue
            found = general(decode, line, cfg.sensor_prefix, recv, mono)
            if isinstance(found, Invalid):
                expected.append(Rejected(line, found.reason, found.detail, "dev1", recv, mono))
            else:
                expected.extend(exactly(found))
        got = [i if isinstance(i, Rejected) else exactly([i])[0] for i in items]
        assert got == expected


# --------------------------------------------------------------------------- examples


def test_the_simulators_line_takes_the_fast_path() -> None:
    decode = decoder_for(config("prefixed"))
    line = b'{"sensor":"temp3","value":21.53,"unit":"C","ts":1764170000.123}'
    decode(line)  # the first sight of a name is checked the general way
    found = decode.reading(line, RECV, MONO, "dev1", "lab/")
    assert found == Reading("lab/temp3", 21.53, "C", 1764170000.123, RECV, MONO, "dev1")
    found = decode.reading(b'{"sensor": "temp3", "value": 7, "ts": null}', RECV, MONO, "d", "")
    assert found == Reading("temp3", 7.0, None, RECV, RECV, MONO, "d")
    assert isinstance(found, Reading) and type(found.value) is float


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"sensor":"temp3","value":NaN}', "nan"),
        (b'{"sensor":"temp3","value":1e999}', "nan"),
        (b'{"sensor":"temp3","value":true}', "not_a_number"),
        (b'{"sensor":"temp3","value":1,"ts":-1}', "bad_time"),
        (b'{"sensor":"temp3","value":1}x', "invalid_json"),
        (b'{"sensor":"temp3","value":1,}', "invalid_json"),
        (b'{"sensor":"temp3","unit":"C"}', "missing_field"),
        (b'{"sensor":"temp3","value":1,"unit":"\xb0C"}', "invalid_utf8"),
        (b'{"sensor":"temp3","value":1,"unit":"' + b"x" * 33 + b'"}', "bad_unit"),
    ],
)
def test_known_names_do_not_hide_bad_values(line: bytes, reason: str) -> None:
    decode = decoder_for(config("default"))
    decode(b'{"sensor":"temp3","value":1,"unit":"C"}')
    decode(b'{"sensor":"' + b"x" * 33 + b'","value":1}')  # a name too long for a unit
    found = decode.reading(line, RECV, MONO, "dev1", "")
    assert isinstance(found, Invalid) and found == decode(line)
    assert found.reason == reason
