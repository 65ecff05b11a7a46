"""Payload decoders and the line framer: from bytes to samples, never raising.

A decoder takes one line (terminator already stripped) and returns the samples in it, or an
`Invalid` verdict whose `reason` is a stable short kind used as a counter label. Decoders never
raise: bad input is data, counted and kept in the dead-letter stream, never a crash. All are
pure functions of the line, except the CSV decoder with `csv_header`, which remembers the
last header line it saw.

`decoder_for(cfg)` builds the decoder a `LineFormatConfig` describes (serial and MQTT inputs
share it); it raises ValueError, in config terms, for settings that cannot work, and the
config model calls it when it is loaded. The formats:

- `json`: an object per line, or a list of them (all or nothing: one bad item rejects the
  line). Mapping fields may be dotted paths into nested objects (`data.temp`); a key that
  itself holds a dot wins over the path. Keys the mapping does not name are ignored.
- `csv`: one record per line, its columns named by `csv_columns` (`-` skips one; in long
  lines every other column must be one the mapping uses) or by the header line (`csv_header`).
  A header line is a record of distinct names (each starting with a letter or `_`, and not a
  number such as `nan`) holding the columns the mapping needs; it is recognised wherever it
  comes (a device that resets prints it again), replaces the previous one, and is kept across
  reconnects (a device that does not reset will not send it again). Records before the first
  header are rejected as `no_header`.
- `kv`: `key=value` or `key:value` pairs apart by spaces, commas or semicolons
  (`t1=21.5,t2=22 ts=1764170000`); spaces around `=`/`:` are allowed, quoting is not.
- `regex`: a regular expression searched in the line (stripped of surrounding whitespace;
  anchor it with `^...$` to demand the whole line); its named groups are the fields.

Long lines (the default, except for kv) hold one reading per object, record or match: the
sensor name, value, unit and device time are in the fields `mapping` names (default `sensor`,
`value`, `unit`, and the first of `ts`, `time`), or the sensor name is fixed by `sensor`. Wide
lines (`wide: true`, the default for kv) hold one reading per field: every field that is not
the time, the unit or in `ignore` (an exact name, or a prefix before a dot) is a sensor named
by its key (dotted for nested JSON objects), column or group, and the line's unit and time
apply to all. In a wide line an empty field (`t2=`, an empty CSV cell, JSON null, a regex group
that did not take part) is a sensor with nothing to say this time and yields no reading; a
field that is not a number rejects the whole line.

Device time is epoch seconds (a number or numeric text) or ISO-8601 (naive means UTC).

Reasons: `invalid_utf8`, `invalid_json`, `not_an_object`, `missing_field`, `not_a_number`,
`nan` (NaN or +-inf, which would poison every aggregate), `bad_time`, `wrong_columns`,
`bad_sensor`, `bad_unit`, `bad_pair` (kv: a token that is not `key=value`, or a key twice),
`no_header` (csv_header: a record before any header line), `no_match` (regex); the framer adds
`oversized`. Blank lines (empty, or only whitespace such as the bare `\\r` of a CRLF device)
decode to no samples rather than a rejection.
"""

from __future__ import annotations

import csv
import functools
import json
import math
import operator
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import repeat
from typing import Any, Final, overload

import orjson

from agent.config import LineFormatConfig
from agent.events import Invalid, Reading, Sample

Decoder = Callable[[bytes], list[Sample] | Invalid]

MAX_SENSOR = 128
MAX_UNIT = 32
DEFAULT_CSV_COLUMNS: tuple[str, ...] = ("sensor", "value", "unit", "time")

# Device times outside the years datetime can represent are a device bug (a millisecond
# epoch sent as seconds, an uninitialised clock), and they would break every consumer that
# formats them.
_MIN_TIME = 0.0
_MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z
_OPEN_BRACE = ord("{")  # a line's first byte, compared as an int: cheaper than a slice
_EXACT_INT = 2**53  # integers a float holds exactly; larger ones take the general path
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_DETAIL_MAX = 80


class _Missing:
    """A field the line does not have (None is a value: JSON null)."""

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()

# Sensor names and units already found valid: a device sends the same few on every line, and
# checking them (a regex search each) was a fifth of decoding a line. Units apart, as a valid
# sensor name may be too long for a unit. Bounded: a device inventing names is checked afresh
# once this many were seen.
_KNOWN_NAMES: set[str] = set()
_KNOWN_UNITS: set[str] = set()
_KNOWN_MAX = 4096


def _known(name: str, known: set[str]) -> str:
    if len(known) >= _KNOWN_MAX:
        known.clear()
    known.add(name)
    return name


def loads(data: bytes | str) -> Any:
    """`json.loads` of `data` (bytes as UTF-8), parsed by orjson where orjson can.

    orjson parses a device's message of a hundred objects in a third of the time (it was a
    quarter of the agent's CPU at 100 readings per message). What orjson refuses and `json`
    takes (NaN and Infinity, numbers beyond a float, lone surrogates) `json` parses, and what
    both refuse raises `json`'s error (a ValueError, or RecursionError), with its detail. One
    difference is left: an integer beyond 64 bits comes out as the float `json` would make
    of it as a value, as most JSON parsers do.
    """
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        pass
    return json.loads(data.decode("utf-8") if isinstance(data, bytes) else data)


def _show(value: Any) -> str:
    try:
        text = repr(value)
    except RecursionError:  # a value nested as deep as the JSON parser allows
        text = f"<deeply nested {type(value).__name__}>"
    return text if len(text) <= _DETAIL_MAX else text[: _DETAIL_MAX - 3] + "..."


def _text(line: bytes) -> str | Invalid:
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Invalid("invalid_utf8", f"byte {exc.start}: {exc.reason}")


def _sensor(value: Any) -> str | Invalid:
    if type(value) is str and value in _KNOWN_NAMES:
        return value
    if not isinstance(value, str):
        return Invalid("bad_sensor", f"sensor is not a string: {_show(value)}")
    if not value:
        return Invalid("bad_sensor", "sensor is empty")
    if len(value) > MAX_SENSOR:
        return Invalid("bad_sensor", f"sensor longer than {MAX_SENSOR} characters")
    if _CONTROL.search(value):
        return Invalid("bad_sensor", f"sensor contains control characters: {_show(value)}")
    return _known(value, _KNOWN_NAMES)


def _unit(value: Any) -> str | Invalid | None:
    if type(value) is str and value in _KNOWN_UNITS:
        return value
    if value is None or value == "" or value is _MISSING:
        return None
    if not isinstance(value, str):
        return Invalid("bad_unit", f"unit is not a string: {_show(value)}")
    if len(value) > MAX_UNIT or _CONTROL.search(value):
        return Invalid("bad_unit", f"unit too long or with control characters: {_show(value)}")
    return _known(value, _KNOWN_UNITS)


def _value(value: Any) -> float | Invalid:
    if type(value) is float and value - value == 0.0:  # finite: inf - inf and nan are nan
        return value
    if type(value) is int and -_EXACT_INT <= value <= _EXACT_INT:  # a JSON integer
        return float(value)
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
    if type(value) is float and _MIN_TIME <= value <= _MAX_TIME:
        return value
    if value is None or value == "" or value is _MISSING:
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


# --------------------------------------------------------------------------- fields


Record = dict[str, Any]  # a line's fields by name
Paths = dict[str, tuple[str, ...]]  # dotted field names, split, for nested JSON objects


def _field(record: Record, name: str, paths: Paths | None) -> Any:
    """The field `name` of a line, or _MISSING; a key with a dot wins over the nested path."""
    found = record.get(name, _MISSING)
    if found is not _MISSING or not paths:
        return found
    if (path := paths.get(name)) is not None:
        here: Any = record
        for part in path:
            if not isinstance(here, dict) or part not in here:
                return _MISSING
            here = here[part]
        return here
    return found


@dataclass(frozen=True, slots=True)
class _Fields:
    """The mapping from a line's fields to a reading, resolved from the config."""

    sensor: str  # the field naming the sensor (long lines without a fixed name)
    fixed: str | None  # the sensor name of every reading (long lines)
    value: str
    unit: str | None
    time: tuple[str, ...]
    wide: bool
    ignore: tuple[str, ...]

    @classmethod
    def of(cls, cfg: LineFormatConfig) -> _Fields:
        m = cfg.mapping
        wide = cfg.is_wide
        if wide:
            if cfg.sensor is not None:
                raise ValueError(
                    "sensor (one fixed name) is for long lines; wide lines name each sensor "
                    "by its field (drop sensor, or set wide: false)"
                )
            named = sorted({"sensor", "value"} & m.model_fields_set)
            if named:
                raise ValueError(
                    f"mapping.{named[0]} means nothing for wide lines, which name each sensor "
                    "by its field (drop it, or set wide: false)"
                )
        elif cfg.ignore:
            raise ValueError("ignore is for wide lines (wide: true), where fields are sensors")
        if cfg.sensor is not None:
            fixed = _sensor(cfg.sensor)
            if isinstance(fixed, Invalid):
                raise ValueError(f"sensor: {fixed.detail}")
        names = [m.sensor, m.value, *([m.unit] if m.unit is not None else []), *m.time]
        if any(not n for n in [*names, *cfg.ignore]):
            raise ValueError("mapping and ignore cannot name an empty field")
        return cls(m.sensor, cfg.sensor, m.value, m.unit, tuple(m.time), wide, tuple(cfg.ignore))

    def skips(self, key: str) -> bool:
        """Whether a field of a wide line is not a sensor: the time, the unit, or ignored."""
        if key in self.time or key == self.unit:
            return True
        return any(key == i or key.startswith(i + ".") for i in self.ignore)

    def sensors_among(self, names: Iterable[str]) -> list[str]:
        """The fields of a wide line's known names that are sensors."""
        return [n for n in names if not self.skips(n)]

    def check_names(self, names: Sequence[str], what: str) -> None:
        """Raise ValueError unless fields `names` (columns, groups) hold what the mapping needs."""
        if self.wide:
            if not self.sensors_among(names):
                raise ValueError(f"{what} hold no sensor field (all are time, unit or ignored)")
            return
        if self.fixed is None and self.sensor not in names:
            raise ValueError(
                f"{what} have no {self.sensor!r} field for the sensor name "
                "(set mapping.sensor, or a fixed sensor)"
            )
        if self.value not in names:
            raise ValueError(
                f"{what} have no {self.value!r} field for the value (set mapping.value)"
            )

    def long(self, record: Record, paths: Paths | None = None) -> list[Sample] | Invalid:
        """The one reading of a long line."""
        if self.fixed is not None:
            sensor = self.fixed
        else:
            sensor = _field(record, self.sensor, paths)
            if sensor is _MISSING:
                return Invalid("missing_field", f"no {self.sensor!r}")
        value = _field(record, self.value, paths)
        if value is _MISSING:
            return Invalid("missing_field", f"no {self.value!r}")
        if value == "":
            return Invalid("missing_field", f"empty {self.value!r}")
        unit = None if self.unit is None else _field(record, self.unit, paths)
        sample = _sample(sensor, value, unit, self.first_time(record, paths))
        return sample if isinstance(sample, Invalid) else [sample]

    def first_time(self, record: Record, paths: Paths | None) -> Any:
        for name in self.time:
            found = _field(record, name, paths)
            if found is not _MISSING:
                return found
        return None

    def wide_samples(
        self, items: Iterable[tuple[str, Any]], record: Record, paths: Paths | None = None
    ) -> list[Sample] | Invalid:
        """The readings of a wide line: one per sensor field of `items` that has a value."""
        unit = None if self.unit is None else _unit(_field(record, self.unit, paths))
        if isinstance(unit, Invalid):
            return unit
        time = _time(self.first_time(record, paths))
        if isinstance(time, Invalid):
            return time
        out: list[Sample] = []
        any_sensor = False
        for key, raw in items:
            if key == "-" or self.skips(key):
                continue
            any_sensor = True
            if raw is None or raw == "":
                continue
            name = _sensor(key)
            if isinstance(name, Invalid):
                return name
            number = _value(raw)
            if isinstance(number, Invalid):
                return Invalid(number.reason, f"{_show(key)}: {number.detail}")
            out.append(Sample(name, number, unit, time))
        if not any_sensor:
            return Invalid("missing_field", "no sensor field")
        return out


# --------------------------------------------------------------------------- decoders


class LineDecoder:
    """Decodes one line (terminator stripped) into its samples or an `Invalid`; never raises.

    Calls are never concurrent (one input owns a decoder). Built by `decoder_for`.
    """

    __slots__ = ()

    def __call__(self, line: bytes) -> list[Sample] | Invalid:
        raise NotImplementedError

    def reading(
        self, line: bytes, recv: float, mono: float, source: str, prefix: str
    ) -> Reading | list[Sample] | Invalid:
        """`self(line)`, or the line's one reading as the input hands it on.

        A decoder may return a line holding a single reading as that `Reading` (its sensor
        `prefix` + the name, its event time the device's or else `recv`, received at
        `recv`/`mono` from `source`), skipping the `Sample` in between; otherwise, and by
        default always, it returns what `self(line)` does. The serial input calls this for
        every line: the cost of a line there is a good part of the agent's CPU.
        """
        return self(line)

    def first_line(self, line: bytes) -> list[Sample] | None:
        """Decode the first line after a (re)open, which may be the tail of a line.

        A stream joined in the middle of a line starts with that line's tail, which is neither
        a reading nor bad input. Returns the samples when the line is certainly whole, else
        None: drop it. By default always None, since the tail of a CSV, kv or regex line can
        look whole (`1.5,C` of `t1,21.5,C`).
        """
        return None


_get = dict.get
_DICT: Final = {dict}
_STR: Final = {str}
_FLOAT: Final = {float}
_NUMBER_TYPES: Final = {float, int}
_UNIT_TYPES: Final = {str, type(None)}
_NOT_NONE = functools.partial(operator.is_not, None)


def _finite(column: list[Any], low: float, high: float) -> list[float] | None:
    """A column of numbers as floats, if each is a finite float or an integer within
    [low, high] (as `PlainMapping.reading` takes a value or a time); else None."""
    kinds = set(map(type, column))
    if kinds != _FLOAT:
        if not kinds <= _NUMBER_TYPES:
            return None
        ints = [v for v in column if type(v) is int]
        if min(ints) < low or max(ints) > high:
            return None
        column = list(map(float, column))
    # A sum is finite only if every term is (or, rarely, overflows: then None, and the
    # caller goes item by item).
    return column if math.isfinite(sum(column)) else None


@dataclass(frozen=True, slots=True)
class PlainMapping:
    """The mapping of a long line whose fields are top-level keys of a JSON object and whose
    sensor is named in the object (no dotted paths, no fixed sensor): a device's usual
    object, which `reading` turns into its reading at a fraction of the general way's cost."""

    sensor: str
    value: str
    unit: str | None
    time: tuple[str, ...]

    @property
    def names_by_default(self) -> bool:
        """Whether `reading` may name an object without the sensor field by its `sensor`
        argument: not when the sensor field is also mapped as the unit or a time (an odd
        mapping, but one the config allows), as the general way, which writes the name into
        the object, then reads it there as the unit or the time too."""
        return self.sensor not in (self.unit, *self.time)

    def reading(
        self,
        obj: dict[str, Any],
        recv: float,
        mono: float,
        source: str,
        prefix: str = "",
        sensor: str | None = None,
    ) -> Reading | None:
        """The reading of a parsed object whose fields need no checking beyond their type (a
        sensor name and unit seen before, a finite number, an epoch time in range), as an
        input hands it on (see `LineDecoder.reading`); None for any other object, valid or
        not, which `JsonDecoder.decode_doc` then decodes with every check, saying what is
        wrong. `sensor` names an object without the sensor field (see `names_by_default`).
        """
        # Only what `_sample` would pass unchanged (or convert: an integer to float); anything
        # else, valid or not, goes the general way.
        name = obj.get(self.sensor, sensor)
        if type(name) is not str or name not in _KNOWN_NAMES:
            return None
        value = obj.get(self.value)
        if type(value) is float:
            if value - value != 0.0:  # not finite: inf - inf and nan are nan
                return None
        elif type(value) is int and -_EXACT_INT <= value <= _EXACT_INT:
            value = float(value)
        else:
            return None
        unit = None if self.unit is None else obj.get(self.unit)
        if unit is not None and (type(unit) is not str or unit not in _KNOWN_UNITS):
            return None
        time = None
        for key in self.time:
            if key in obj:
                time = obj[key]
                break
        if time is None:
            time = recv
        elif type(time) is float:
            if not _MIN_TIME <= time <= _MAX_TIME:  # also true for NaN
                return None
        elif type(time) is int and _MIN_TIME <= time <= _MAX_TIME:
            time = float(time)
        else:
            return None
        return Reading(prefix + name, value, unit, time, recv, mono, source)

    def readings(
        self,
        objs: list[Any],
        recv: float,
        mono: float,
        source: str,
        prefix: str = "",
        sensor: str | None = None,
    ) -> list[Reading] | None:
        """`reading` of each item of a list at once: their readings when every item is a
        plain object, else None (then the caller goes item by item, which decides).

        A device's message of a hundred objects costs a function call and a dozen checks per
        object the one-by-one way; here each field is one column taken and checked in C
        loops (`map`, `set`, `sum`, `min`, `max`), at about half the cost. Where a column is
        in doubt (a number too large to sum, a later time key that an object might have
        instead of the first) this answers None rather than decide otherwise than `reading`.
        """
        if not objs or set(map(type, objs)) != _DICT:
            return None
        names = list(map(_get, objs, repeat(self.sensor), repeat(sensor)))
        if set(map(type, names)) != _STR or not _KNOWN_NAMES.issuperset(names):
            return None
        values = _finite(list(map(_get, objs, repeat(self.value))), -_EXACT_INT, _EXACT_INT)
        if values is None:
            return None
        units: Iterable[Any] = repeat(None)
        if self.unit is not None:
            units = list(map(_get, objs, repeat(self.unit)))
            if not set(map(type, units)) <= _UNIT_TYPES or not _KNOWN_UNITS.issuperset(
                filter(_NOT_NONE, units)
            ):
                return None
        times: Iterable[Any] = repeat(recv)
        if self.time:
            found = list(map(_get, objs, repeat(self.time[0]), repeat(_MISSING)))
            if _MISSING in found and len(self.time) > 1:
                return None  # another time key may be in those: each decides
            if None in found or _MISSING in found:
                found = [recv if t is None or t is _MISSING else t for t in found]
            checked = _finite(found, _MIN_TIME, _MAX_TIME)
            if checked is None or min(checked) < _MIN_TIME or max(checked) > _MAX_TIME:
                return None
            times = checked
        if prefix:
            names = [prefix + name for name in names]
        return list(
            map(Reading, names, values, units, times, repeat(recv), repeat(mono), repeat(source))
        )


class JsonDecoder(LineDecoder):
    """JSON objects, or lists of them, one line each (see the module docstring)."""

    __slots__ = ("_fields", "_paths", "plain")

    def __init__(self, fields: _Fields) -> None:
        self._fields = fields
        names = [fields.sensor, fields.value, fields.unit or "", *fields.time]
        self._paths = {n: tuple(n.split(".")) for n in names if "." in n}
        #: The mapping's plain form, when the reading of an object can be read straight from
        #: its top-level keys (long lines, the sensor named in the object, no dotted paths).
        self.plain: PlainMapping | None = None
        if not fields.wide and fields.fixed is None and not self._paths:
            self.plain = PlainMapping(fields.sensor, fields.value, fields.unit, fields.time)

    def __call__(self, line: bytes) -> list[Sample] | Invalid:
        text = _text(line)
        if isinstance(text, Invalid):
            return text
        if not text.strip():
            return []
        try:
            doc = loads(text)
        except (ValueError, RecursionError) as exc:
            return Invalid("invalid_json", str(exc)[:_DETAIL_MAX])
        return self.decode_doc(doc)

    def reading(
        self, line: bytes, recv: float, mono: float, source: str, prefix: str
    ) -> Reading | list[Sample] | Invalid:
        """The reading of a line that is one plain object (see `PlainMapping.reading`), built
        straight from the parsed object; any other line as `self(line)` decodes it."""
        plain = self.plain
        if plain is None or not line or line[0] != _OPEN_BRACE:
            return self(line)
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            return self(line)  # for json's verdict and detail
        found = plain.reading(doc, recv, mono, source, prefix)
        return self._fields.long(doc) if found is None else found

    def decode_doc(self, doc: Any) -> list[Sample] | Invalid:
        """The readings of a JSON document already parsed: an object or a list of them (the
        MQTT input parses once to fill in the topic's sensor, then hands the document here)."""
        if not isinstance(doc, list):
            return self._object(doc)
        samples: list[Sample] = []
        for i, item in enumerate(doc):
            found = self._object(item)
            if isinstance(found, Invalid):
                return Invalid(found.reason, f"item {i}: {found.detail}")
            samples.extend(found)
        return samples

    def first_line(self, line: bytes) -> list[Sample] | None:
        """A JSON line is whole when it decodes: no tail of an object or list is one."""
        # A tail starts inside the outer object or list (or inside a string, where what
        # follows leaves quotes or backslashes unbalanced), so it closes brackets it never
        # opened: it cannot parse. What parses is the line, or the line without blanks.
        found = self(line)
        return None if isinstance(found, Invalid) else found

    def _object(self, obj: Any) -> list[Sample] | Invalid:
        if not isinstance(obj, dict):
            return Invalid("not_an_object", f"expected an object, got {type(obj).__name__}")
        fields = self._fields
        if fields.wide:
            return fields.wide_samples(self._flatten(obj), obj, self._paths)
        return fields.long(obj, self._paths)

    def _flatten(self, obj: dict[str, Any]) -> list[tuple[str, Any]]:
        """Leaves of nested objects under dotted keys, in document order (no recursion: the
        nesting can be as deep as the parser allows)."""
        out: list[tuple[str, Any]] = []
        stack = [("", iter(obj.items()))]
        while stack:
            prefix, items = stack[-1]
            for key, value in items:
                name = prefix + key
                if isinstance(value, dict) and not self._fields.skips(name):
                    stack.append((name + ".", iter(value.items())))
                    break
                out.append((name, value))
            else:
                stack.pop()
        return out


class CsvDecoder(LineDecoder):
    """One CSV record per line, its columns named by config or by a header line."""

    __slots__ = ("_columns", "_fields", "_header")

    def __init__(self, fields: _Fields, columns: Sequence[str] | None) -> None:
        self._fields = fields
        self._header = columns is None
        self._columns: tuple[str, ...] | None = None if columns is None else tuple(columns)

    @property
    def columns(self) -> tuple[str, ...] | None:
        """The column names in use (from config, or the last header; None before a header)."""
        return self._columns

    def __call__(self, line: bytes) -> list[Sample] | Invalid:
        cells = self._cells(line)
        if cells is None:
            return []
        if isinstance(cells, Invalid):
            return cells
        if self._header:
            if self._take_header(cells):
                return []
            if self._columns is None:
                return Invalid("no_header", "a record before any header line naming the columns")
        return self._record(cells)

    def first_line(self, line: bytes) -> list[Sample] | None:
        """A header line is kept (a device that resets on open prints it first); all else is
        dropped, as a CSV tail can look like a whole record."""
        if not self._header:
            return None
        cells = self._cells(line)
        if cells is None:
            return []
        return [] if not isinstance(cells, Invalid) and self._take_header(cells) else None

    @staticmethod
    def _cells(line: bytes) -> list[str] | Invalid | None:
        """The record's fields, stripped; None for a blank line."""
        text = _text(line)
        if isinstance(text, Invalid):
            return text
        text = text.strip()
        if not text:
            return None
        try:
            cells = next(csv.reader([text]))
        except (csv.Error, StopIteration) as exc:
            return Invalid("wrong_columns", f"not a CSV record: {exc}")
        return [c.strip() for c in cells]

    def _take_header(self, cells: list[str]) -> bool:
        if len(set(cells)) != len(cells) or not all(_is_name(c) for c in cells):
            return False
        try:
            self._fields.check_names(cells, "the header's columns")
        except ValueError:
            return False
        self._columns = tuple(cells)
        return True

    def _record(self, cells: list[str]) -> list[Sample] | Invalid:
        columns = self._columns
        assert columns is not None
        if len(cells) != len(columns):
            return Invalid("wrong_columns", f"{len(cells)} fields, expected {len(columns)}")
        record = dict(zip(columns, cells, strict=True))  # "-" columns are never looked up
        fields = self._fields
        if fields.wide:
            return fields.wide_samples(zip(columns, cells, strict=True), record)
        return fields.long(record)


_NAME = re.compile(r"[A-Za-z_]")


def _is_name(cell: str) -> bool:
    """A header cell: starts like a name and is not a number (`nan`, `inf` are numbers)."""
    if not _NAME.match(cell):
        return False
    try:
        float(cell)
    except ValueError:
        return True
    return False


_KV_SPACED = re.compile(r"\s*([=:])\s*")
_KV_APART = re.compile(r"[\s,;]+")
_KV_SEP = re.compile(r"[=:]")


class KvDecoder(LineDecoder):
    """`key=value` (or `key:value`) pairs, apart by spaces, commas or semicolons."""

    __slots__ = ("_fields",)

    def __init__(self, fields: _Fields) -> None:
        self._fields = fields

    def __call__(self, line: bytes) -> list[Sample] | Invalid:
        text = _text(line)
        if isinstance(text, Invalid):
            return text
        text = _KV_SPACED.sub(r"\1", text.strip())
        if not text:
            return []
        pairs: dict[str, str] = {}
        for token in _KV_APART.split(text):
            if not token:
                continue
            sep = _KV_SEP.search(token)
            if sep is None or sep.start() == 0:
                return Invalid("bad_pair", f"not key=value: {_show(token)}")
            key, value = token[: sep.start()], token[sep.end() :]
            if key in pairs:
                return Invalid("bad_pair", f"key {_show(key)} appears twice")
            pairs[key] = value
        fields = self._fields
        if fields.wide:
            return fields.wide_samples(pairs.items(), pairs)
        return fields.long(pairs)


class RegexDecoder(LineDecoder):
    """A regular expression searched in the line; its named groups are the fields."""

    __slots__ = ("_fields", "_pattern")

    def __init__(self, fields: _Fields, pattern: re.Pattern[str]) -> None:
        self._fields = fields
        self._pattern = pattern

    def __call__(self, line: bytes) -> list[Sample] | Invalid:
        text = _text(line)
        if isinstance(text, Invalid):
            return text
        text = text.strip()
        if not text:
            return []
        m = self._pattern.search(text)
        if m is None:
            return Invalid("no_match", f"the line does not match the regex: {_show(text)}")
        groups = m.groupdict()
        # A group that did not take part in the match is a field the line does not have.
        record = {name: found for name, found in groups.items() if found is not None}
        fields = self._fields
        if fields.wide:
            return fields.wide_samples(record.items(), record)
        return fields.long(record)


# --------------------------------------------------------------------------- building


@overload
def decoder_for(format: LineFormatConfig, /) -> LineDecoder: ...


@overload
def decoder_for(format: str, csv_columns: Sequence[str] = DEFAULT_CSV_COLUMNS) -> LineDecoder: ...


def decoder_for(
    format: LineFormatConfig | str, csv_columns: Sequence[str] = DEFAULT_CSV_COLUMNS
) -> LineDecoder:
    """The decoder a line-format config describes; ValueError (in config terms) if none can be.

    `decoder_for(cfg)` is what inputs use. `decoder_for("json")` and `decoder_for("csv",
    columns)` build the default long-line decoders of a format (cached: cheap to call per
    message).
    """
    if isinstance(format, str):
        columns = tuple(csv_columns) if format == "csv" else DEFAULT_CSV_COLUMNS
        return _default_decoder(format, columns)
    cfg = format
    fields = _Fields.of(cfg)
    if cfg.csv_header and cfg.format != "csv":
        raise ValueError(f"csv_header is for format: csv, not {cfg.format}")
    if cfg.regex is not None and cfg.format != "regex":
        raise ValueError(f"regex is set but the format is {cfg.format} (set format: regex)")
    if cfg.format == "json":
        return JsonDecoder(fields)
    if cfg.format == "kv":
        return KvDecoder(fields)
    if cfg.format == "csv":
        if cfg.csv_header:
            if "csv_columns" in cfg.model_fields_set:
                raise ValueError(
                    "csv_columns and csv_header exclude each other: the header names the columns"
                )
            return CsvDecoder(fields, None)
        _check_columns(cfg.csv_columns, fields)
        return CsvDecoder(fields, cfg.csv_columns)
    if cfg.format == "regex":
        if cfg.regex is None:
            raise ValueError("format regex needs a regex with named groups")
        try:
            pattern = re.compile(cfg.regex)
        except re.error as exc:
            raise ValueError(f"regex: not a valid regular expression: {exc}") from None
        if not pattern.groupindex:
            raise ValueError("regex has no named groups, (?P<name>...), to take fields from")
        fields.check_names(list(pattern.groupindex), "the regex's named groups")
        return RegexDecoder(fields, pattern)
    raise ValueError(f"unknown line format {cfg.format!r}")


def _check_columns(columns: Sequence[str], fields: _Fields) -> None:
    named = [c for c in columns if c != "-"]
    if any(not c for c in named):
        raise ValueError("csv_columns: a column name is empty (write '-' to skip a column)")
    if len(set(named)) != len(named):
        raise ValueError(f"csv_columns: a column name appears twice: {list(columns)}")
    fields.check_names(named, "csv_columns")
    if not fields.wide:
        used = {fields.sensor, fields.value, fields.unit, *fields.time}
        unused = [c for c in named if c not in used]
        if unused:
            raise ValueError(
                f"csv_columns: the mapping uses no column {unused[0]!r} "
                "(write '-' to skip a column, or map it in mapping)"
            )


@functools.cache
def _default_decoder(format: str, csv_columns: tuple[str, ...]) -> LineDecoder:
    cfg = LineFormatConfig.model_validate({"format": format, "csv_columns": list(csv_columns)})
    return decoder_for(cfg)


def csv_decoder(columns: Sequence[str] = DEFAULT_CSV_COLUMNS) -> LineDecoder:
    """The long-line CSV decoder for `columns` (`-` skips one); ValueError if they cannot work."""
    return decoder_for("csv", columns)


#: The default JSON decoder: `{"sensor", "value", "unit"?, "ts"|"time"?}` or a list of them.
#: (Built at import: the config's check imports `decoder_for` from this module, defined above.)
decode_json: Final = decoder_for("json")


# --------------------------------------------------------------------------- framing


@dataclass(slots=True, frozen=True)
class Oversized:
    """A line longer than the framer's bound: its first `max_line` bytes; the rest is dropped."""

    raw: bytes


@dataclass(slots=True, frozen=True)
class Tail:
    """The bytes before the first terminator after `LineFramer.resync()`.

    Maybe the tail of a line the stream was joined in the middle of, maybe a whole line: the
    reader decides (`LineDecoder.first_line`). `size` is its length (terminator excluded);
    `raw` is the bytes, or None when there were more than `max_line` of them.
    """

    raw: bytes | None
    size: int


class LineFramer:
    """Cuts a byte stream into lines at `terminator`, holding at most `max_line` bytes of one.

    `feed(chunk)` returns each line the chunk completes (terminator stripped), or an
    `Oversized` for a line longer than `max_line` bytes: it is reported as soon as the bound is
    passed, and the rest of that line, up to the next terminator, is discarded as it arrives.
    After `resync()` the first "line" is returned as a `Tail` instead (never as `Oversized`).
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
        self._tail = False
        self._tail_dropped = 0

    @property
    def pending(self) -> int:
        """Bytes of an unfinished line held (0 while discarding the tail of an oversized one)."""
        return 0 if self._discarding else len(self._buf)

    def feed(self, chunk: bytes) -> Sequence[bytes | Oversized | Tail]:
        """The lines completed by `chunk`, in order."""
        buf = self._buf
        term, max_line = self.terminator, self.max_line
        if not (self._tail or self._discarding):
            # The usual chunk (lines within max_line, a partial line not yet too long) is cut
            # in one C call, as the loop below would cut it: line by line was a fifth of the
            # cost of a short JSON line. Any other chunk goes to that loop (nothing changed).
            lines = (bytes(buf) + chunk if buf else chunk).split(term)
            rest = lines.pop()
            if len(rest) < max_line + len(term) and max(map(len, lines), default=0) <= max_line:
                buf[:] = rest
                return lines
        out: list[bytes | Oversized | Tail] = []
        buf += chunk
        start = 0
        while (end := buf.find(term, start)) >= 0:
            size = end - start
            if self._tail:
                self._tail = False
                if self._discarding or size > max_line:
                    out.append(Tail(None, self._tail_dropped + size))
                else:
                    out.append(Tail(bytes(buf[start:end]), size))
                self._discarding = False
            elif self._discarding:
                self._discarding = False
            elif size > max_line:
                out.append(Oversized(bytes(buf[start : start + max_line])))
            else:
                out.append(bytes(buf[start:end]))
            start = end + len(term)
        del buf[:start]
        # No terminator is left in the buffer, but its last bytes may start one (a split CRLF).
        keep = len(term) - 1
        if not self._discarding and len(buf) > max_line + keep:
            if not self._tail:
                out.append(Oversized(bytes(buf[:max_line])))
            self._discarding = True
        if self._discarding:
            drop = max(0, len(buf) - keep)
            if self._tail:
                self._tail_dropped += drop
            del buf[:drop]
        return out

    def resync(self) -> None:
        """Forget any partial line, and return what comes before the next terminator as a
        `Tail`: the stream is being joined at an arbitrary byte (a port just (re)opened)."""
        self.reset()
        self._tail = True
        self._tail_dropped = 0

    def reset(self) -> None:
        """Forget any partial line (the stream starts anew, at the start of a line)."""
        self._buf.clear()
        self._discarding = False
        self._tail = False
