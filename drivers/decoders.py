"""Payload decoders and the line framer: pure functions from bytes to samples.

A decoder takes one line (terminator already stripped) and returns the samples in it, or an
`Invalid` verdict whose `reason` is a stable short kind used as a counter label. Decoders never
raise: bad input is data, counted and kept in the dead-letter stream, never a crash.

Reasons: `invalid_utf8`, `invalid_json`, `not_an_object`, `missing_field`, `not_a_number`,
`nan` (NaN or +-inf, which would poison every aggregate), `bad_time`, `wrong_columns`,
`bad_sensor`, `bad_unit`; the framer adds `oversized`. Blank lines (empty, or only whitespace
such as the bare `\\r` of a CRLF device) decode to no samples rather than a rejection.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from agent.events import Invalid, Sample

Decoder = Callable[[bytes], list[Sample] | Invalid]

MAX_SENSOR = 128
MAX_UNIT = 32
CSV_COLUMNS = frozenset({"sensor", "value", "unit", "time", "-"})

# Device times outside the years datetime can represent are a device bug (a millisecond
# epoch sent as seconds, an uninitialised clock), and they would break every consumer that
# formats them.
_MIN_TIME = 0.0
_MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DETAIL_MAX = 80


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _text(line: bytes) -> str | Invalid:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("invalid_utf8", f"byte {exc.start}: {exc.reason}")


def _sensor(value: Any) -> str | Invalid:
    if not isinstance(value, str):
        return Invalid("bad_sensor", f"sensor is not a string: {_show(value)}")
    if not value:
        return Invalid("bad_sensor", "sensor is empty")
    if len(value) > MAX_SENSOR:
        return Invalid("bad_sensor", f"sensor longer than {MAX_SENSOR} characters")
    if _CONTROL.search(value):
        return Invalid("bad_sensor", f"sensor contains control characters: {_show(value)}")
    return value


def _unit(value: Any) -> str | Invalid | None:
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return Invalid("bad_unit", f"unit is not a string: {_show(value)}")
    if len(value) > MAX_UNIT or _CONTROL.search(value):
        return Invalid("bad_unit", f"unit too long or with control characters: {_show(value)}")
    return value


def _value(value: Any) -> float | Invalid:
    # bool is an int in Python, but `true` is never a measurement.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return Invalid("not_a_number", f"value is not a number: {_show(value)}")
    try:
        number = float(value)
    except ValueError:
        return Invalid("not_a_number", f"value is not a number: {_show(value)}")
    except OverflowError:
        return Invalid("nan", f"value out of range: {_show(value)}")
    if not math.isfinite(number):
        return Invalid("nan", f"value is not finite: {_show(value)}")
    return number


def _time(value: Any) -> float | Invalid | None:
    """Epoch seconds (int, float, or a numeric string) or an ISO-8601 string; naive is UTC."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return Invalid("bad_time", f"time is neither a number nor a string: {_show(value)}")
    seconds: float
    try:
        seconds = float(value)
    except OverflowError:
        return Invalid("bad_time", f"time out of range: {_show(value)}")
    except ValueError:
        assert isinstance(value, str)
        try:
            parsed = datetime.fromisoformat(value.strip())
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=UTC)
            seconds = parsed.timestamp()
        except (ValueError, OverflowError):
            return Invalid("bad_time", f"time is not epoch seconds or ISO-8601: {_show(value)}")
    if not _MIN_TIME <= seconds <= _MAX_TIME:  # also false for NaN
        return Invalid("bad_time", f"time outside 1970..9999: {_show(value)}")
    return seconds


def _sample(sensor: Any, value: Any, unit: Any, time: Any) -> Sample | Invalid:
    name = _sensor(sensor)
    if isinstance(name, Invalid):
        return name
    number = _value(value)
    if isinstance(number, Invalid):
        return number
    unit_ = _unit(unit)
    if isinstance(unit_, Invalid):
        return unit_
    time_ = _time(time)
    if isinstance(time_, Invalid):
        return time_
    return Sample(name, number, unit_, time_)


def _from_object(obj: Any) -> Sample | Invalid:
    if not isinstance(obj, dict):
        return Invalid("not_an_object", f"expected an object, got {type(obj).__name__}")
    if "sensor" not in obj:
        return Invalid("missing_field", "no 'sensor'")
    if "value" not in obj:
        return Invalid("missing_field", "no 'value'")
    # `ts` wins when a device sends both; extra keys (rssi, battery, ...) are ignored.
    time = obj["ts"] if "ts" in obj else obj.get("time")
    return _sample(obj["sensor"], obj["value"], obj.get("unit"), time)


def decode_json(line: bytes) -> list[Sample] | Invalid:
    """One JSON object `{"sensor", "value", "unit"?, "ts"|"time"?}` or a list of them.

    A list is all or nothing: one bad item rejects the line, which then goes to the dead-letter
    stream whole, so nothing of it is lost silently.
    """
    text = _text(line)
    if isinstance(text, Invalid):
        return text
    if not text.strip():
        return []
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        return Invalid("invalid_json", str(exc)[:_DETAIL_MAX])
    if isinstance(doc, list):
        samples: list[Sample] = []
        for i, item in enumerate(doc):
            sample = _from_object(item)
            if isinstance(sample, Invalid):
                return Invalid(sample.reason, f"item {i}: {sample.detail}")
            samples.append(sample)
        return samples
    sample = _from_object(doc)
    return sample if isinstance(sample, Invalid) else [sample]


def csv_decoder(columns: Sequence[str] = ("sensor", "value", "unit", "time")) -> Decoder:
    """A decoder of one CSV record per line, its fields named by `columns` (`-` skips one).

    Fields are stripped of surrounding whitespace; an empty unit or time is None. Raises
    ValueError (when built, never when decoding) for unknown or repeated column names.
    """
    unknown = [c for c in columns if c not in CSV_COLUMNS]
    if unknown:
        raise ValueError(f"unknown csv column {unknown[0]!r}; use {sorted(CSV_COLUMNS)}")
    named = [c for c in columns if c != "-"]
    if len(set(named)) != len(named):
        raise ValueError(f"csv columns repeat a name: {list(columns)}")
    if "sensor" not in named or "value" not in named:
        raise ValueError("csv columns must name a 'sensor' and a 'value' column")
    width = len(columns)
    index = {name: columns.index(name) for name in named}
    i_sensor, i_value = index["sensor"], index["value"]
    i_unit, i_time = index.get("unit"), index.get("time")

    def decode_csv(line: bytes) -> list[Sample] | Invalid:
        text = _text(line)
        if isinstance(text, Invalid):
            return text
        text = text.strip()
        if not text:
            return []
        try:
            fields = next(csv.reader([text]))
        except (csv.Error, StopIteration) as exc:
            return Invalid("wrong_columns", f"not a CSV record: {exc}")
        if len(fields) != width:
            return Invalid("wrong_columns", f"{len(fields)} fields, expected {width}")
        fields = [f.strip() for f in fields]
        if not fields[i_value]:
            return Invalid("missing_field", "empty 'value'")
        sample = _sample(
            fields[i_sensor],
            fields[i_value],
            None if i_unit is None else fields[i_unit],
            None if i_time is None else fields[i_time],
        )
        return sample if isinstance(sample, Invalid) else [sample]

    return decode_csv


def decoder_for(
    format: Literal["json", "csv"], csv_columns: Sequence[str] = ("sensor", "value", "unit", "time")
) -> Decoder:
    """The decoder for a configured line format."""
    if format == "json":
        return decode_json
    if format == "csv":
        return csv_decoder(csv_columns)
    raise ValueError(f"unknown line format {format!r}")


# --------------------------------------------------------------------------- framing


@dataclass(slots=True, frozen=True)
class Oversized:
    """A line longer than the framer's bound: its first `max_line` bytes; the rest is dropped."""

    raw: bytes


class LineFramer:
    """Cuts a byte stream into lines at `terminator`, holding at most `max_line` bytes of one.

    `feed(chunk)` returns each line the chunk completes (terminator stripped), or an
    `Oversized` for a line longer than `max_line` bytes: it is reported as soon as the bound is
    passed, and the rest of that line, up to the next terminator, is discarded as it arrives.
    Between feeds the buffer holds at most `max_line + len(terminator) - 1` bytes. A partial
    line left when the stream ends is not a line; `pending` tells how many bytes it has.
    """

    def __init__(self, max_line: int, terminator: bytes = b"\n") -> None:
        if not terminator:
            raise ValueError("terminator cannot be empty")
        if max_line < 0:
            raise ValueError("max_line cannot be negative")
        self.max_line = max_line
        self.terminator = terminator
        self._buf = bytearray()
        self._discarding = False

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held (0 while discarding the tail of an oversized one)."""
        return 0 if self._discarding else len(self._buf)

    def feed(self, chunk: bytes) -> list[bytes | Oversized]:
        """The lines completed by `chunk`, in order."""
        out: list[bytes | Oversized] = []
        buf = self._buf
        buf += chunk
        term, max_line = self.terminator, self.max_line
        start = 0
        while (end := buf.find(term, start)) >= 0:
            if self._discarding:
                self._discarding = False
            elif end - start > max_line:
                out.append(Oversized(bytes(buf[start : start + max_line])))
            else:
                out.append(bytes(buf[start:end]))
            start = end + len(term)
        del buf[:start]
        # No terminator is left in the buffer, but its last bytes may start one (a split CRLF).
        keep = len(term) - 1
        if self._discarding:
            del buf[: max(0, len(buf) - keep)]
        elif len(buf) > max_line + keep:
            out.append(Oversized(bytes(buf[:max_line])))
            self._discarding = True
            del buf[: len(buf) - keep]
        return out

    def reset(self) -> None:
        """Forget any partial line (after a reconnect the stream starts anew)."""
        self._buf.clear()
        self._discarding = False
