"""`drivers.decoders.loads` parses with orjson where orjson can, and gives what `json.loads`
gives: the same document for every text both take, and `json`'s own verdict (its document
or its error) for every text orjson refuses."""

from __future__ import annotations

import json
import math
from typing import Any

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from drivers.decoders import loads

# JSON documents as a device might send them, numbers of every kind included: integers up to
# 64 bits (beyond, see below), floats at the edges of the range, -0.0, subnormals.
scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
documents = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20,
)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0, -0.0 is not 0.0)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(map(same, a, b))
    if isinstance(a, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    return bool(a == b)


def verdict(parse: Any, data: bytes) -> tuple[str, Any]:
    try:
        return "ok", parse(data)
    except (ValueError, RecursionError) as exc:
        return "error", type(exc)


def by_json(data: bytes) -> Any:
    return json.loads(data.decode("utf-8"))


@settings(max_examples=300, deadline=None)
@given(documents, st.sampled_from([{}, {"indent": 1}, {"ensure_ascii": False}]))
@example([0.1, -0.0, 5e-324, 1.7976931348623157e308, 2**53 + 1, -(2**63)], {})
@example({"a": 1, "a ": [True, None, "é\u2028\U0001f600"]}, {"ensure_ascii": False})
def test_every_document_parses_as_json_parses_it(doc: Any, how: dict[str, Any]) -> None:
    text = json.dumps(doc, **how)
    for data in (text.encode(), text):
        assert same(loads(data), json.loads(text)), data


@pytest.mark.parametrize(
    "data",
    [
        b'{"value": NaN}',
        b"[Infinity, -Infinity]",
        b"1e400",
        b'"\\ud800"',  # a lone surrogate: json takes it, orjson does not
        b'{"a":1,"a":2}',  # the last one wins in both
        b" [1] \n",
        b"\xef\xbb\xbf{}",  # a byte order mark
        b"\xff",  # not UTF-8
        b'{"a":1} x',  # extra data
        b"[1,]",
        b"",
        b"   ",
        b'"\x01"',  # a control character in a string
        b"[" * 5000 + b"]" * 5000,  # deeper than either parser goes
        b"-",
        b"01",
    ],
)
def test_what_orjson_refuses_gets_json_verdict(data: bytes) -> None:
    (got, found), (want, expected) = verdict(loads, data), verdict(by_json, data)
    assert got == want
    assert same(found, expected) if got == "ok" else found is expected


def test_orjson_does_the_parsing() -> None:
    """The point of it: a plain document never reaches json (which would be 2.5x slower)."""
    doc = b'[{"sensor":"t1","value":1.5}]'
    assert orjson.loads(doc) == loads(doc)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(json, "loads", lambda *_: pytest.fail("json parsed a plain document"))
        assert loads(doc) == [{"sensor": "t1", "value": 1.5}]


def test_integers_beyond_64_bits_come_out_as_the_float_a_value_becomes() -> None:
    """The one difference left: orjson makes a float of an integer beyond 64 bits. A reading's
    value or time becomes that float either way (`_value` converts json's integer)."""
    for n in (2**64, -(2**63) - 1, 10**30):
        assert loads(str(n).encode()) == float(n)
