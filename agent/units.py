"""Config building blocks: durations and sizes as people write them, and the strict base model.

`Duration` reads `500ms`, `5s`, `5m`, `2h`, `7d` (or a bare number of seconds) as float seconds.
`ByteSize` reads `512B`, `64KiB`, `512MiB`, `2GiB`, `1GB` (or a bare number of bytes) as int bytes.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_NUMBER_UNIT = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from `500ms`, `5s`, `5m`, `2h`, `7d` or a plain number of seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 500ms, 5s, 5m, 2h or 7d")
    if isinstance(value, int | float):
        if value < 0:
            raise ValueError("a duration cannot be negative")
        return float(value)
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m:
            number, unit = m.groups()
            factor = _DURATION_UNITS.get(unit.lower() if unit else "s")
            if factor is not None:
                return float(number) * factor
    raise ValueError(f"{value!r} is not a duration; write it as 500ms, 5s, 5m, 2h or 7d")


def parse_size(value: Any) -> int:
    """Bytes from `512B`, `64KiB`, `512MiB`, `2GiB`, `1GB` or a plain number of bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as 512B, 64KiB, 512MiB or 2GiB")
    if isinstance(value, int):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if isinstance(value, str):
        m = _NUMBER_UNIT.match(value)
        if m:
            number, unit = m.groups()
            factor = _SIZE_UNITS.get(unit.lower() if unit else "b")
            if factor is not None:
                return int(float(number) * factor)
    raise ValueError(f"{value!r} is not a size; write it as 512B, 64KiB, 512MiB or 2GiB")


Duration = Annotated[float, BeforeValidator(parse_duration)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]


class StrictModel(BaseModel):
    """Base of every config model: unknown keys are errors, values are not coerced silently."""

    model_config = ConfigDict(extra="forbid", frozen=True)
