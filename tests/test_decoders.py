"""Decoders and the line framer: every rejection reason, and properties over arbitrary bytes."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.events import Invalid, Sample
from drivers.decoders import (
    MAX_SENSOR,
    LineFramer,
    Oversized,
    csv_decoder,
    decode_json,
    decoder_for,
)

decode_csv = csv_decoder()


# --------------------------------------------------------------------------- json


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"sensor": "temp1", "value": 21.5}', [Sample("temp1", 21.5)]),
        (
            b'{"sensor": "temp1", "value": 21.5, "unit": "C", "ts": 1764170000.1}',
            [Sample("temp1", 21.5, "C", 1764170000.1)],
        ),
        (b'{"sensor": "t", "value": 3, "ts": 1764170000}', [Sample("t", 3.0, None, 1764170000.0)]),
        (b'{"sensor": "t", "value": 1, "time": 12.5}', [Sample("t", 1.0, None, 12.5)]),
        (b'{"sensor": "t", "value": 1, "ts": 5, "time": 7}', [Sample("t", 1.0, None, 5.0)]),
        (
            b'{"sensor": "t", "value": 1, "ts": "2025-11-26T12:00:00Z"}',
            [Sample("t", 1.0, None, 1764158400.0)],
        ),
        (
            b'{"sensor": "t", "value": 1, "ts": "2025-11-26T13:00:00+01:00"}',
            [Sample("t", 1.0, None, 1764158400.0)],
        ),
        (
            b'{"sensor": "t", "value": 1, "ts": "2025-11-26T12:00:00"}',
            [Sample("t", 1.0, None, 1764158400.0)],
        ),
        (b'{"sensor": "t", "value": "4.25", "unit": ""}', [Sample("t", 4.25)]),
        (b'{"sensor": "t", "value": 1, "rssi": -70}', [Sample("t", 1.0)]),
        (b'{"sensor": "t", "value": 1}\r', [Sample("t", 1.0)]),
        (
            b'[{"sensor": "a", "value": 1}, {"sensor": "b", "value": 2, "unit": "%"}]',
            [Sample("a", 1.0), Sample("b", 2.0, "%")],
        ),
        (b"[]", []),
        (b"", []),
        (b"  \r", []),
    ],
)
def test_json_accepts(line: bytes, expected: list[Sample]) -> None:
    assert decode_json(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b'{"sensor": "t", "value": 1, "unit": "\xb0C"}', "invalid_utf8"),
        (b"\xff\xfe", "invalid_utf8"),
        (b'{"sensor": "t", "value": 1', "invalid_json"),
        (b"hello", "invalid_json"),
        (b"[" * 100_000, "invalid_json"),
        (b"42", "not_an_object"),
        (b'"text"', "not_an_object"),
        (b"null", "not_an_object"),
        (b'[{"sensor": "a", "value": 1}, 7]', "not_an_object"),
        (b"[[]]", "not_an_object"),
        (b'{"value": 1}', "missing_field"),
        (b'{"sensor": "t"}', "missing_field"),
        (b'{"sensor": "t", "value": "warm"}', "not_a_number"),
        (b'{"sensor": "t", "value": true}', "not_a_number"),
        (b'{"sensor": "t", "value": null}', "not_a_number"),
        (b'{"sensor": "t", "value": [1]}', "not_a_number"),
        (b'{"sensor": "t", "value": NaN}', "nan"),
        (b'{"sensor": "t", "value": Infinity}', "nan"),
        (b'{"sensor": "t", "value": -Infinity}', "nan"),
        (b'{"sensor": "t", "value": 1e400}', "nan"),
        (b'{"sensor": "t", "value": "nan"}', "nan"),
        (b'{"sensor": "t", "value": ' + b"9" * 400 + b"}", "nan"),
        (b'{"sensor": "t", "value": 1, "ts": "yesterday"}', "bad_time"),
        (b'{"sensor": "t", "value": 1, "ts": -1}', "bad_time"),
        (b'{"sensor": "t", "value": 1, "ts": 1764170000000000}', "bad_time"),
        (b'{"sensor": "t", "value": 1, "ts": NaN}', "bad_time"),
        (b'{"sensor": "t", "value": 1, "ts": true}', "bad_time"),
        (b'{"sensor": "t", "value": 1, "time": {}}', "bad_time"),
        (b'{"sensor": "", "value": 1}', "bad_sensor"),
        (b'{"sensor": 5, "value": 1}', "bad_sensor"),
        (b'{"sensor": "a\\nb", "value": 1}', "bad_sensor"),
        (b'{"sensor": "a\\u0085b", "value": 1}', "bad_sensor"),
        (b'{"sensor": "' + b"s" * (MAX_SENSOR + 1) + b'", "value": 1}', "bad_sensor"),
        (b'{"sensor": "t", "value": 1, "unit": 5}', "bad_unit"),
        (b'{"sensor": "t", "value": 1, "unit": "C\\u0000"}', "bad_unit"),
    ],
)
def test_json_rejects(line: bytes, reason: str) -> None:
    result = decode_json(line)
    assert isinstance(result, Invalid), result
    assert result.reason == reason
    assert result.detail


def test_json_list_is_all_or_nothing() -> None:
    result = decode_json(b'[{"sensor": "a", "value": 1}, {"sensor": "b", "value": NaN}]')
    assert result == Invalid("nan", "item 1: value is not finite: nan")


def test_sensor_of_max_length_is_accepted() -> None:
    name = "s" * MAX_SENSOR
    assert decode_json(json.dumps({"sensor": name, "value": 1}).encode()) == [Sample(name, 1.0)]


# --------------------------------------------------------------------------- csv


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b"temp1,21.5,C,1764170000.1", [Sample("temp1", 21.5, "C", 1764170000.1)]),
        (b"temp1,21.5,,", [Sample("temp1", 21.5)]),
        (b" temp1 , 21.5 , C , \r", [Sample("temp1", 21.5, "C")]),
        (b"t,1,C,2025-11-26T12:00:00Z", [Sample("t", 1.0, "C", 1764158400.0)]),
        (b'"room, north",1,C,', [Sample("room, north", 1.0, "C")]),
        (b"", []),
        (b"   ", []),
    ],
)
def test_csv_accepts(line: bytes, expected: list[Sample]) -> None:
    assert decode_csv(line) == expected


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        (b"t,\xe9,C,", "invalid_utf8"),
        (b"t,1,C", "wrong_columns"),
        (b"t,1,C,,extra", "wrong_columns"),
        (b"t,1\rC,x,", "wrong_columns"),
        (b"t,,C,", "missing_field"),
        (b"t,warm,C,", "not_a_number"),
        (b"sensor,value,unit,time", "not_a_number"),
        (b"t,nan,C,", "nan"),
        (b"t,-inf,C,", "nan"),
        (b"t,1,C,soon", "bad_time"),
        (b",1,C,", "bad_sensor"),
        (b"a\x01b,1,C,", "bad_sensor"),
        (b"t,1,\x7f,", "bad_unit"),
    ],
)
def test_csv_rejects(line: bytes, reason: str) -> None:
    result = decode_csv(line)
    assert isinstance(result, Invalid), result
    assert result.reason == reason


def test_csv_columns_choose_and_skip_fields() -> None:
    decode = decoder_for("csv", ["time", "-", "sensor", "value"])
    assert decode(b"100,ignored,t,2") == [Sample("t", 2.0, None, 100.0)]
    assert decode(b"100,ignored,t") == Invalid("wrong_columns", "3 fields, expected 4")


@pytest.mark.parametrize(
    "columns",
    [["sensor", "value", "bogus"], ["sensor", "value", "value"], ["sensor", "unit"]],
)
def test_csv_columns_are_checked_when_built(columns: list[str]) -> None:
    with pytest.raises(ValueError):
        csv_decoder(columns)


def test_decoder_for_json() -> None:
    assert decoder_for("json", []) is decode_json


# --------------------------------------------------------------------------- properties


def _well_formed(result: list[Sample] | Invalid) -> bool:
    if isinstance(result, Invalid):
        return bool(result.reason)
    return all(
        isinstance(s, Sample)
        and math.isfinite(s.value)
        and (s.time is None or math.isfinite(s.time))
        and 0 < len(s.sensor) <= MAX_SENSOR
        for s in result
    )


@given(st.binary(max_size=300))
def test_json_never_raises_on_bytes(line: bytes) -> None:
    assert _well_formed(decode_json(line))


@given(st.binary(max_size=300))
def test_csv_never_raises_on_bytes(line: bytes) -> None:
    assert _well_formed(decode_csv(line))


_json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(["sensor", "value", "unit", "ts", "time", "x"])


@given(
    st.dictionaries(_keys, _json_values, max_size=5)
    | st.lists(st.dictionaries(_keys, _json_values, max_size=5), max_size=3)
    | _json_values
)
def test_json_never_raises_on_json(doc: Any) -> None:
    """Structured noise reaches deeper than random bytes: wrong types in every field."""
    assert _well_formed(decode_json(json.dumps(doc).encode()))


@given(st.lists(st.text(max_size=12).filter(lambda f: "\n" not in f), max_size=6))
def test_csv_never_raises_on_fields(fields: list[str]) -> None:
    assert _well_formed(decode_csv(",".join(fields).encode()))


_sensor_names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=MAX_SENSOR
)
_samples = st.builds(
    Sample,
    sensor=_sensor_names,
    value=st.floats(allow_nan=False, allow_infinity=False),
    unit=st.none()
    | st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=8),
    time=st.none() | st.floats(min_value=0, max_value=4_102_444_800),
)


def _encode(s: Sample) -> dict[str, Any]:
    out: dict[str, Any] = {"sensor": s.sensor, "value": s.value}
    if s.unit is not None:
        out["unit"] = s.unit
    if s.time is not None:
        out["ts"] = s.time
    return out


@given(_samples)
def test_json_round_trip_object(sample: Sample) -> None:
    assert decode_json(json.dumps(_encode(sample)).encode()) == [sample]


@given(st.lists(_samples, max_size=5))
def test_json_round_trip_list(samples: list[Sample]) -> None:
    line = json.dumps([_encode(s) for s in samples], ensure_ascii=False).encode()
    assert decode_json(line) == samples


# --------------------------------------------------------------------------- framing


def test_framer_splits_lines_across_chunks() -> None:
    framer = LineFramer(16)
    assert framer.feed(b"one\ntw") == [b"one"]
    assert framer.pending == 2
    assert framer.feed(b"o\n\nthree\n") == [b"two", b"", b"three"]
    assert framer.pending == 0


def test_framer_oversized_line_is_one_rejection_and_the_next_line_survives() -> None:
    framer = LineFramer(8)
    out = framer.feed(b"ok\n0123456789")
    assert out == [b"ok", Oversized(b"01234567")]
    assert framer.feed(b"abcdef" * 100) == []
    assert framer.pending == 0
    assert framer.feed(b"xyz\nnext\n") == [b"next"]


def test_framer_oversized_line_within_one_chunk() -> None:
    framer = LineFramer(4)
    assert framer.feed(b"123456\nabcd\nabcde\n") == [
        Oversized(b"1234"),
        b"abcd",
        Oversized(b"abcd"),
    ]


def test_framer_multibyte_terminator_split_across_chunks() -> None:
    framer = LineFramer(4, b"\r\n")
    assert framer.feed(b"abcd\r") == []
    assert framer.feed(b"\nef\r\n") == [b"abcd", b"ef"]
    # An oversized line whose terminator is split across the chunk where it is given up on.
    assert framer.feed(b"abcdefg\r") == [Oversized(b"abcd")]
    assert framer.feed(b"\nok\r\n") == [b"ok"]


@given(st.lists(st.binary(max_size=40), max_size=30), st.integers(0, 12))
def test_framer_memory_is_bounded_and_lines_match_a_split(
    chunks: list[bytes], max_line: int
) -> None:
    framer = LineFramer(max_line, b"\r\n")
    out: list[bytes | Oversized] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
        assert len(framer._buf) <= max_line + 1
    stream = b"".join(chunks)
    *complete, partial = stream.split(b"\r\n")
    expected = [Oversized(line[:max_line]) if len(line) > max_line else line for line in complete]
    # An unfinished line is reported as soon as it is certainly too long, not before.
    if len(partial) > max_line + 1:
        expected.append(Oversized(partial[:max_line]))
    assert out == expected
