"""Decoders and the line framer: every rejection reason, each mapping feature in a table, and
properties over arbitrary bytes for every decoder."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.config import ConfigError, LineFormatConfig, SerialInputConfig, parse_config
from agent.events import Invalid, Sample
from drivers.decoders import (
    MAX_SENSOR,
    MAX_UNIT,
    CsvDecoder,
    LineDecoder,
    LineFramer,
    Oversized,
    Tail,
    csv_decoder,
    decode_json,
    decoder_for,
)

decode_csv = csv_decoder()
TS = 1764170000.0


def build(**cfg: Any) -> LineDecoder:
    """The decoder of a line-format config, validated as a config file would be."""
    return decoder_for(LineFormatConfig.model_validate(cfg))


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


def test_decoder_for_a_format_name_is_the_default_decoder_and_cached() -> None:
    # drivers/mqtt.py builds decoders by format name, per message.
    assert decoder_for("json") is decode_json
    assert decoder_for("json", []) is decode_json
    assert decoder_for("csv") is decoder_for("csv")
    line = b'{"sensor": "t", "value": 1, "ts": 5}'
    assert decoder_for(LineFormatConfig())(line) == decode_json(line) == [Sample("t", 1.0, None, 5)]
    with pytest.raises(ValueError):
        decoder_for("xml")


# --------------------------------------------------------------------------- mapping


def S(sensor: str, value: float, unit: str | None = None, time: float | None = None) -> Sample:
    return Sample(sensor, value, unit, time)


MAPPED: list[tuple[dict[str, Any], bytes, list[Sample]]] = [
    # json, long lines: fields renamed, dotted paths, a fixed sensor, time candidates
    (
        {"mapping": {"sensor": "id", "value": "v", "unit": "u", "time": "t"}},
        b'{"id": "a", "v": 1, "u": "C", "t": 5, "ts": 9}',
        [S("a", 1, "C", 5)],
    ),
    (
        {"mapping": {"sensor": "meta.name", "value": "data.temp", "time": "meta.ts"}},
        b'{"meta": {"name": "t1", "ts": 5}, "data": {"temp": 21.5, "hum": 40}}',
        [S("t1", 21.5, None, 5)],
    ),
    (
        {"mapping": {"value": "data.temp"}},
        b'{"sensor": "t", "data.temp": 1, "data": {"temp": 2}}',
        [S("t", 1)],
    ),
    ({"sensor": "door"}, b'{"value": 1, "sensor": "ignored"}', [S("door", 1)]),
    ({"mapping": {"time": None}}, b'{"sensor": "t", "value": 1, "ts": 5}', [S("t", 1)]),
    (
        {"mapping": {"time": ["epoch", "ts"]}},
        b'{"sensor": "t", "value": 1, "ts": 5}',
        [S("t", 1, None, 5)],
    ),
    ({"mapping": {"unit": None}}, b'{"sensor": "t", "value": 1, "unit": "C"}', [S("t", 1)]),
    # json, wide lines: every other field a sensor, nested ones dotted
    (
        {"wide": True},
        b'{"ts": 5, "temp": 21.5, "hum": 40}',
        [S("temp", 21.5, None, 5), S("hum", 40, None, 5)],
    ),
    (
        {"wide": True},
        b'{"time": "2025-11-26T12:00:00Z", "env": {"t": 1, "h": {"rel": 2}}, "unit": "x"}',
        [S("env.t", 1, "x", 1764158400.0), S("env.h.rel", 2, "x", 1764158400.0)],
    ),
    ({"wide": True}, b'{"a": null, "b": 2, "c": {}}', [S("b", 2)]),
    (
        {"wide": True, "ignore": ["id", "meta"]},
        b'{"id": "board7", "meta": {"rssi": -70, "fw": "1.2"}, "metal": 3}',
        [S("metal", 3)],
    ),
    (
        {"wide": True, "ignore": ["meta.fw"]},
        b'{"meta": {"rssi": -70, "fw": "1.2"}}',
        [S("meta.rssi", -70)],
    ),
    ({"wide": True}, b'[{"a": 1, "ts": 5}, {"b": 2}]', [S("a", 1, None, 5), S("b", 2)]),
    ({"wide": True, "mapping": {"time": "t"}}, b'{"t": 5, "ts": 7}', [S("ts", 7, None, 5)]),
    # kv: wide by default
    (
        {"format": "kv"},
        b"temp=21.5 hum=40 ts=1764170000",
        [S("temp", 21.5, None, TS), S("hum", 40, None, TS)],
    ),
    ({"format": "kv"}, b"t1=21.5,t2=22.0\r", [S("t1", 21.5), S("t2", 22.0)]),
    ({"format": "kv"}, b"t1:21.5; t2 : 22 ,t3= -1", [S("t1", 21.5), S("t2", 22), S("t3", -1)]),
    ({"format": "kv"}, b"ts=2025-11-26T12:00:00Z t=1", [S("t", 1, None, 1764158400.0)]),
    ({"format": "kv"}, b"unit=C a=1 b=", [S("a", 1, "C")]),
    ({"format": "kv"}, b"room.temp=1", [S("room.temp", 1)]),
    ({"format": "kv", "ignore": ["id"]}, b"id=7 t=1", [S("t", 1)]),
    ({"format": "kv"}, b"  ", []),
    # kv: long lines
    (
        {"format": "kv", "wide": False},
        b"sensor=t1 value=21.5 unit=C rssi=-70",
        [S("t1", 21.5, "C")],
    ),
    (
        {"format": "kv", "wide": False, "mapping": {"sensor": "id", "value": "v", "time": "at"}},
        b"id=t v=2 at=5",
        [S("t", 2, None, 5)],
    ),
    ({"format": "kv", "wide": False, "sensor": "door"}, b"value=1", [S("door", 1)]),
    # csv: columns named by config, mapped, wide
    (
        {
            "format": "csv",
            "csv_columns": ["id", "-", "reading"],
            "mapping": {"sensor": "id", "value": "reading"},
        },
        b"t,skipped,2",
        [S("t", 2)],
    ),
    (
        {"format": "csv", "csv_columns": ["ts", "temp", "hum"], "wide": True},
        b"1764170000, 21.5, 40",
        [S("temp", 21.5, None, TS), S("hum", 40, None, TS)],
    ),
    (
        {"format": "csv", "csv_columns": ["ts", "temp", "hum"], "wide": True},
        b"1764170000,,40",
        [S("hum", 40, None, TS)],
    ),
    ({"format": "csv", "csv_columns": ["value"], "sensor": "t"}, b"3", [S("t", 3)]),
    # regex: named groups
    (
        {"format": "regex", "regex": r"(?P<sensor>\w+)=(?P<value>\S+)"},
        b"temp=21.5",
        [S("temp", 21.5)],
    ),
    (
        {"format": "regex", "regex": r"^T:(?P<value>[-\d.]+)(?P<unit>C)$", "sensor": "temp"},
        b"T:21.5C\r",
        [S("temp", 21.5, "C")],
    ),
    (
        {
            "format": "regex",
            "regex": r"(?P<ts>\d+) (?P<sensor>\w+) (?P<v>[\d.]+)",
            "mapping": {"value": "v"},
        },
        b"<1764170000 t1 2.5>",
        [S("t1", 2.5, None, TS)],
    ),
    (
        {"format": "regex", "regex": r"T:(?P<temp>\S+)(?: H:(?P<hum>\S+))?", "wide": True},
        b"T:21.5 H:40",
        [S("temp", 21.5), S("hum", 40)],
    ),
    (
        {"format": "regex", "regex": r"T:(?P<temp>\S+)(?: H:(?P<hum>\S+))?", "wide": True},
        b"T:21.5",
        [S("temp", 21.5)],
    ),
]


@pytest.mark.parametrize(("cfg", "line", "expected"), MAPPED)
def test_mapping_accepts(cfg: dict[str, Any], line: bytes, expected: list[Sample]) -> None:
    assert build(**cfg)(line) == expected


MAPPED_REJECTS: list[tuple[dict[str, Any], bytes, str, str]] = [
    (
        {"mapping": {"value": "data.temp"}},
        b'{"sensor": "t", "data": {}}',
        "missing_field",
        "no 'data.temp'",
    ),
    (
        {"mapping": {"value": "data.temp"}},
        b'{"sensor": "t", "data": 5}',
        "missing_field",
        "data.temp",
    ),
    ({"mapping": {"sensor": "id"}}, b'{"sensor": "t", "value": 1}', "missing_field", "no 'id'"),
    ({"wide": True}, b'{"a": 1, "b": "warm"}', "not_a_number", "'b': value is not a number"),
    ({"wide": True}, b'{"a": 1, "b": [1]}', "not_a_number", "'b'"),
    ({"wide": True}, b'{"a": NaN}', "nan", "'a'"),
    ({"wide": True}, b'{"ts": 5}', "missing_field", "no sensor field"),
    ({"wide": True}, b'{"ts": "soon", "a": 1}', "bad_time", "soon"),
    ({"wide": True}, b'{"unit": 5, "a": 1}', "bad_unit", "5"),
    ({"wide": True}, b'{"a\\u0001": 1}', "bad_sensor", "control"),
    ({"wide": True}, b'{"' + b"k" * MAX_SENSOR + b'": {"x": 1}}', "bad_sensor", "longer"),
    ({"wide": True}, b"[1]", "not_an_object", "item 0"),
    ({"format": "kv"}, b"temp 21.5", "bad_pair", "'temp'"),
    ({"format": "kv"}, b"=5", "bad_pair", "'=5'"),
    ({"format": "kv"}, b"t=1 t=2", "bad_pair", "twice"),
    ({"format": "kv"}, b"t=warm", "not_a_number", "'t'"),
    ({"format": "kv"}, b"t=1e999", "nan", "'t'"),
    ({"format": "kv"}, b"t=inf", "nan", "'t'"),
    ({"format": "kv"}, b"ts=soon t=1", "bad_time", "soon"),
    ({"format": "kv"}, b"ts=5", "missing_field", "no sensor field"),
    ({"format": "kv"}, b"t=\xb0", "invalid_utf8", "byte 2"),
    ({"format": "kv", "wide": False}, b"sensor=t", "missing_field", "no 'value'"),
    ({"format": "kv", "wide": False}, b"sensor=t value=", "missing_field", "empty 'value'"),
    ({"format": "csv", "csv_columns": ["ts", "a"], "wide": True}, b"5,x", "not_a_number", "'a'"),
    (
        {"format": "csv", "csv_columns": ["ts", "a"], "wide": True},
        b"5",
        "wrong_columns",
        "1 fields",
    ),
    (
        {"format": "regex", "regex": r"^(?P<sensor>\w+)=(?P<value>\S+)$"},
        b"hello",
        "no_match",
        "hello",
    ),
    (
        {"format": "regex", "regex": r"(?P<sensor>\w+)=(?P<value>\S+)"},
        b"t=warm",
        "not_a_number",
        "warm",
    ),
    (
        {"format": "regex", "regex": r"(?P<sensor>\w+)(?:=(?P<value>\S+))?"},
        b"t",
        "missing_field",
        "no 'value'",
    ),
    (
        {"format": "regex", "regex": r"(?P<value>.*)", "sensor": "t"},
        b"\xff",
        "invalid_utf8",
        "byte 0",
    ),
]


@pytest.mark.parametrize(("cfg", "line", "reason", "detail"), MAPPED_REJECTS)
def test_mapping_rejects(cfg: dict[str, Any], line: bytes, reason: str, detail: str) -> None:
    result = build(**cfg)(line)
    assert isinstance(result, Invalid), result
    assert (result.reason, detail in result.detail) == (reason, True), result


def test_wide_is_the_default_for_kv_only() -> None:
    assert [LineFormatConfig(format=f).is_wide for f in ("json", "csv", "kv")] == [
        False,
        False,
        True,
    ]
    assert not LineFormatConfig(format="kv", wide=False).is_wide


# --------------------------------------------------------------------------- csv header


def test_csv_header_names_the_columns_and_can_change() -> None:
    decode = build(format="csv", csv_header=True, mapping={"time": "at"})
    assert decode(b"t,1") == Invalid(
        "no_header", "a record before any header line naming the columns"
    )
    assert decode(b"at, sensor, value, unit, rssi") == []
    assert decode(b"5,t1,21.5,C,-70") == [S("t1", 21.5, "C", 5)]
    assert decode(b"5,t1,21.5") == Invalid("wrong_columns", "3 fields, expected 5")
    # The device was reflashed and reset: it prints its new header first.
    assert decode(b"value,sensor") == []
    assert decode(b"2,t2") == [S("t2", 2)]
    # A record of names that is not a header (no 'sensor' and 'value' columns) is a record.
    result = decode(b"t3,warm")
    assert isinstance(result, Invalid) and result.reason == "not_a_number"
    assert isinstance(decode, CsvDecoder) and decode.columns == ("value", "sensor")


@pytest.mark.parametrize(
    "line",
    [
        b"sensor,value,sensor",  # a name twice
        b"sensor,value,nan",  # a number
        b"sensor,value,2025-11-26T12:00:00Z",  # does not start like a name
        b"sensor,value,",  # an empty name
        b"name,reading",  # lacks the mapped columns
    ],
)
def test_csv_header_lines_must_be_distinct_names_with_the_mapped_columns(line: bytes) -> None:
    decode = build(format="csv", csv_header=True)
    result = decode(line)
    assert isinstance(result, Invalid) and result.reason == "no_header"


def test_csv_header_wide_and_mapped() -> None:
    wide = build(format="csv", csv_header=True, wide=True, ignore=["n"])
    assert wide(b"ts,n,temp,hum") == []
    assert wide(b"1764170000,7,21.5,") == [S("temp", 21.5, None, TS)]
    assert wide(b"ts,n") != []  # no sensor column: not a header
    mapped = build(format="csv", csv_header=True, mapping={"sensor": "name", "value": "val"})
    assert mapped(b"name,val") == []
    assert mapped(b"t,4") == [S("t", 4)]


# --------------------------------------------------------------------------- first line


@pytest.mark.parametrize(
    ("cfg", "line", "expected"),
    [
        ({}, b'{"sensor": "t", "value": 1}', [S("t", 1)]),  # a JSON line that decodes is whole
        ({}, b'ue": 1}', None),  # the tail of one
        ({}, b'{"sensor": "t", "value": NaN}', None),  # bad or a tail: either way not kept
        ({}, b"", []),  # the stream was joined right at a line's start
        ({"wide": True}, b'a": 1, "b": 2}', None),
        ({"format": "csv"}, b"t1,21.5,C,", None),  # could be the tail of "xt1,21.5,C,"
        ({"format": "csv", "csv_header": True}, b"sensor,value", []),  # a header is kept
        ({"format": "csv", "csv_header": True}, b"ue,unit", None),
        ({"format": "kv"}, b"mp=21.5 hum=40", None),
        ({"format": "regex", "regex": r"(?P<sensor>\w+)=(?P<value>\S+)"}, b"mp=21.5", None),
    ],
)
def test_first_line_is_kept_only_when_certainly_whole(
    cfg: dict[str, Any], line: bytes, expected: list[Sample] | None
) -> None:
    assert build(**cfg).first_line(line) == expected


def test_csv_header_as_first_line_is_taken() -> None:
    decode = build(format="csv", csv_header=True)
    assert decode.first_line(b"sensor,value") == []
    assert decode(b"t,1") == [S("t", 1)]


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"format": "regex"}, "format regex needs a regex"),
        ({"format": "regex", "regex": "(?P<value>"}, "not a valid regular expression"),
        ({"format": "regex", "regex": r"(\w+)=(\S+)"}, "no named groups"),
        ({"format": "regex", "regex": r"(?P<sensor>\w+)=(?P<v>\S+)"}, "no 'value' field"),
        ({"format": "regex", "regex": r"=(?P<value>\S+)"}, "no 'sensor' field"),
        ({"format": "regex", "regex": r"(?P<ts>\d+)", "wide": True}, "no sensor field"),
        ({"format": "json", "regex": r"(?P<value>\S+)"}, "set format: regex"),
        ({"format": "json", "csv_header": True}, "csv_header is for format: csv"),
        (
            {"format": "csv", "csv_header": True, "csv_columns": ["sensor", "value"]},
            "exclude each other",
        ),
        ({"format": "csv", "csv_columns": ["sensor", "value", "rssi"]}, "no column 'rssi'"),
        ({"format": "csv", "csv_columns": ["sensor", "value", "value"]}, "appears twice"),
        ({"format": "csv", "csv_columns": ["sensor", ""]}, "empty"),
        ({"format": "csv", "csv_columns": ["sensor", "unit"]}, "no 'value' field"),
        ({"format": "csv", "csv_columns": ["ts", "unit"], "wide": True}, "no sensor field"),
        ({"wide": True, "sensor": "t"}, "sensor (one fixed name) is for long lines"),
        ({"wide": True, "mapping": {"sensor": "id"}}, "mapping.sensor means nothing for wide"),
        ({"format": "kv", "mapping": {"value": "v"}}, "mapping.value means nothing for wide"),
        ({"ignore": ["id"]}, "ignore is for wide lines"),
        ({"sensor": ""}, "sensor is empty"),
        ({"sensor": "a\tb"}, "control characters"),
        ({"mapping": {"value": ""}}, "empty field"),
        ({"mapping": {"sensr": "id"}}, "Extra inputs are not permitted"),
        ({"format": "xml"}, "Input should be"),
    ],
)
def test_line_format_config_is_checked_when_loaded(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError) as info:
        LineFormatConfig.model_validate(cfg)
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"stopbits": 3}, "stopbits must be 1, 1.5 or 2"),
        ({"parity": "N"}, "Input should be 'none', 'even', 'odd', 'mark' or 'space'"),
        ({"bytesize": 9}, "Input should be 5, 6, 7 or 8"),
        ({"terminator": ""}, "terminator cannot be empty"),
        ({"flow_control": "dtr"}, "Input should be 'none', 'rtscts' or 'xonxoff'"),
    ],
)
def test_serial_settings_are_checked(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        SerialInputConfig.model_validate({"type": "serial", "name": "s", "port": "/dev/x", **extra})


def test_serial_config_errors_point_at_the_line_to_edit() -> None:
    text = """\
inputs:
  - type: serial
    name: board
    port: /dev/ttyUSB0
    stopbits: 1.5
    format: regex
    regex: "(?P<value>[0-9.]+"
  - type: serial
    name: kv
    port: /dev/ttyUSB1
    format: kv
    mapping: {sensr: id}
  - type: serial
    name: csv
    port: /dev/ttyUSB2
    format: csv
    csv_columns: [sensor, value, rssi]
"""
    with pytest.raises(ConfigError) as info:
        parse_config(text, "pi.yaml")
    lines = [str(i) for i in info.value.issues]
    assert lines[0].startswith("pi.yaml:7:12: inputs[0].regex: not a valid regular expression")
    assert (
        lines[1] == "pi.yaml:12:15: inputs[1].mapping.sensr: unknown key (did you mean 'sensor'?)"
    )
    assert lines[2].startswith(
        "pi.yaml:13:5: inputs[2]: csv_columns: the mapping uses no column 'rssi'"
    )
    assert len(lines) == 3


def test_full_serial_config_loads() -> None:
    cfg = parse_config("""\
inputs:
  - type: serial
    name: board
    port: /dev/serial/by-id/usb-Arduino_Uno_0001-if00
    baudrate: 9600
    bytesize: 7
    parity: even
    stopbits: 2
    flow_control: rtscts
    idle_timeout: 5m
    format: kv
    mapping: {time: t, unit: null}
    ignore: [id]
""")
    (serial,) = cfg.inputs
    assert isinstance(serial, SerialInputConfig)
    assert (serial.bytesize, serial.parity, serial.stopbits, serial.idle_timeout) == (
        7,
        "even",
        2,
        300,
    )
    assert decoder_for(serial)(b"id=7 t=5 temp=1") == [S("temp", 1, None, 5)]


# --------------------------------------------------------------------------- properties

#: One decoder per format and mode, each run over arbitrary input below.
EVERY_DECODER: dict[str, dict[str, Any]] = {
    "json": {},
    "json-mapped": {"mapping": {"sensor": "a.b", "value": "v.w", "unit": "u", "time": "t.s"}},
    "json-wide": {"wide": True, "ignore": ["x"]},
    "csv": {"format": "csv"},
    "csv-wide": {"format": "csv", "csv_columns": ["ts", "-", "a", "b"], "wide": True},
    "csv-header": {"format": "csv", "csv_header": True},
    "csv-header-wide": {"format": "csv", "csv_header": True, "wide": True},
    "kv": {"format": "kv"},
    "kv-long": {"format": "kv", "wide": False},
    "regex": {"format": "regex", "regex": r"(?P<sensor>\S+)=(?P<value>\S*)(?: (?P<unit>\S+))?"},
    "regex-wide": {
        "format": "regex",
        "regex": r"T:(?P<temp>\S*)(?: H:(?P<hum>\S*))?(?: (?P<ts>\S+))?",
        "wide": True,
    },
}
_DECODERS = {name: build(**cfg) for name, cfg in EVERY_DECODER.items()}


def _well_formed(result: list[Sample] | Invalid | None) -> bool:
    if result is None:
        return True
    if isinstance(result, Invalid):
        return bool(result.reason) and isinstance(result.detail, str)
    return all(
        isinstance(s, Sample)
        and isinstance(s.value, float)
        and math.isfinite(s.value)
        and (s.time is None or 0 <= s.time <= 253402300799.0)
        and 0 < len(s.sensor) <= MAX_SENSOR
        and (s.unit is None or 0 < len(s.unit) <= MAX_UNIT)
        for s in result
    )


# Lines built from tokens the decoders care about reach further than random bytes do.
_tokens = st.sampled_from(
    ["sensor", "value", "unit", "ts", "time", "temp", "T", "H", "a", "x", "t1", "1", "-21.5",
     "1e999", "nan", "-inf", "2025-11-26T12:00:00Z", "1764170000", "C", "", '"', "\\", "{",
     "}", "[", "\x00", "\r", "\xe9", "\U0001f321"]
)  # fmt: skip
_separators = st.sampled_from([",", "=", ":", " ", ";", ", ", "\t", '":', "="])
_token_lines = st.lists(st.tuples(_tokens, _separators), max_size=10).map(
    lambda pairs: "".join(t + s for t, s in pairs).encode()
)
_lines = st.binary(max_size=200) | _token_lines


@pytest.mark.parametrize("name", EVERY_DECODER)
@given(lines=st.lists(_lines, min_size=1, max_size=6))
def test_every_decoder_never_raises_and_yields_only_finite_values(
    name: str, lines: list[bytes]
) -> None:
    decode = build(**EVERY_DECODER[name])  # a fresh one: the csv header decoder has state
    for line in lines:
        assert _well_formed(decode(line))
        assert _well_formed(decode.first_line(line))


@pytest.mark.parametrize("name", EVERY_DECODER)
@given(line=st.binary(max_size=300))
def test_every_decoder_never_raises_on_bytes(name: str, line: bytes) -> None:
    assert _well_formed(_DECODERS[name](line))


_json_values = st.recursive(
    st.none() | st.booleans() | st.floats() | st.integers() | st.text(max_size=10),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=4)
    ),
    max_leaves=12,
)
_keys = st.sampled_from(["sensor", "value", "unit", "ts", "time", "x", "a", "v", "t", "u"])


@pytest.mark.parametrize("name", ["json", "json-mapped", "json-wide"])
@given(
    doc=st.dictionaries(_keys, _json_values, max_size=5)
    | st.lists(st.dictionaries(_keys, _json_values, max_size=5), max_size=3)
    | _json_values
)
def test_json_never_raises_on_json(name: str, doc: Any) -> None:
    """Structured noise reaches deeper than random bytes: wrong types in every field."""
    assert _well_formed(_DECODERS[name](json.dumps(doc).encode()))


def test_json_nested_as_deep_as_the_parser_allows() -> None:
    for depth in (900, 990, 5000):
        for name in ("json", "json-mapped", "json-wide"):
            deep = b'{"a": ' * depth + b"1" + b"}" * depth
            assert _well_formed(_DECODERS[name](deep))
            nested_value = b'{"sensor": "t", "value": ' + b"[" * depth + b"]" * depth + b"}"
            assert _well_formed(_DECODERS[name](nested_value))


@given(st.lists(st.text(max_size=12).filter(lambda f: "\n" not in f), max_size=6))
def test_csv_never_raises_on_fields(fields: list[str]) -> None:
    line = ",".join(fields).encode()
    for name in ("csv", "csv-wide", "csv-header"):
        assert _well_formed(_DECODERS[name](line))


_sensor_names = st.text(
    st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=MAX_SENSOR
)
_finite = st.floats(allow_nan=False, allow_infinity=False)
_samples = st.builds(
    Sample,
    sensor=_sensor_names,
    value=_finite,
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


# Names a device would use for the keys of a wide line (no separators, not time or unit).
_field_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_.\-]{0,20}", fullmatch=True).filter(
    lambda k: k not in ("ts", "time", "unit")
)
_wide_lines = st.dictionaries(_field_names, _finite, min_size=1, max_size=6)
_times = st.none() | st.integers(0, 4_102_444_800)


@given(_wide_lines, _times, st.sampled_from([" ", ",", ";", ", "]))
def test_kv_round_trip(values: dict[str, float], ts: int | None, sep: str) -> None:
    pairs = [f"{k}={v!r}" for k, v in values.items()]
    if ts is not None:
        pairs.insert(len(pairs) // 2, f"ts={ts}")
    decoded = _DECODERS["kv"](sep.join(pairs).encode())
    assert decoded == [Sample(k, v, None, ts) for k, v in values.items()]


@given(_wide_lines, _times)
def test_json_wide_round_trip(values: dict[str, float], ts: int | None) -> None:
    doc: dict[str, Any] = {"ts": ts} if ts is not None else {}
    doc.update({k: v for k, v in values.items() if "." not in k})
    decoded = build(wide=True)(json.dumps(doc).encode())
    expected = [Sample(k, v, None, ts) for k, v in doc.items() if k != "ts"]
    assert decoded == (expected or Invalid("missing_field", "no sensor field"))


@given(_wide_lines, _times)
def test_csv_header_wide_round_trip(values: dict[str, float], ts: int | None) -> None:
    decode = build(format="csv", csv_header=True, wide=True)
    assert decode(("ts," + ",".join(values)).encode()) == []
    row = ("" if ts is None else str(ts)) + "," + ",".join(repr(v) for v in values.values())
    assert decode(row.encode()) == [Sample(k, v, None, ts) for k, v in values.items()]


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


def test_framer_resync_returns_the_first_line_as_a_tail() -> None:
    framer = LineFramer(8)
    assert framer.feed(b"one\ntw") == [b"one"]
    framer.resync()  # the partial "tw" is forgotten; the stream is joined mid-line
    assert framer.feed(b"ail\nfour\n") == [Tail(b"ail", 3), b"four"]
    framer.resync()
    assert framer.feed(b"\nfive\n") == [Tail(b"", 0), b"five"]
    framer.reset()  # a fresh stream at a line start: no tail
    assert framer.feed(b"six\n") == [b"six"]


def test_framer_long_tail_is_counted_not_oversized() -> None:
    framer = LineFramer(4, b"\r\n")
    framer.resync()
    assert framer.feed(b"0123456789\r") == []
    assert framer.pending == 0
    assert framer.feed(b"abc") == []
    assert framer.feed(b"\r\nok\r\n") == [Tail(None, 14), b"ok"]
    framer.resync()
    assert framer.feed(b"abcde\r\n") == [Tail(None, 5)]


@given(
    st.lists(st.binary(max_size=40), max_size=30),
    st.integers(0, 12),
    st.sampled_from([b"\n", b"\r\n", b"END"]),
    st.booleans(),
)
def test_framer_memory_is_bounded_and_lines_match_a_split(
    chunks: list[bytes], max_line: int, term: bytes, resync: bool
) -> None:
    framer = LineFramer(max_line, term)
    if resync:
        framer.resync()
    out: list[bytes | Oversized | Tail] = []
    for chunk in chunks:
        out.extend(framer.feed(chunk))
        assert len(framer._buf) <= max_line + len(term) - 1
    stream = b"".join(chunks)
    *complete, partial = stream.split(term)
    expected: list[bytes | Oversized | Tail] = [
        Oversized(line[:max_line]) if len(line) > max_line else line for line in complete
    ]
    if resync and complete:
        first = complete[0]
        expected[0] = Tail(first if len(first) <= max_line else None, len(first))
    # An unfinished line is reported as soon as it is certainly too long, not before (and a
    # tail never is: it is not a line).
    if len(partial) > max_line + len(term) - 1 and not (resync and not complete):
        expected.append(Oversized(partial[:max_line]))
    assert out == expected
