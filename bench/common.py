"""What every benchmark shares: PASS/FAIL marks, argument types and the core count.

Benchmarks run as scripts (`python bench/x.py`); each puts the repository on `sys.path` so
that `bench.common` is found.
"""

from __future__ import annotations

import argparse
import os


def mark(ok: bool) -> str:
    """A target's verdict as printed."""
    return "PASS" if ok else "FAIL"


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def non_negative_float(text: str) -> float:
    """An argparse type: a number that is not negative."""
    value = float(text)
    if value < 0:
        raise argparse.ArgumentTypeError("cannot be negative")
    return value


def cores() -> int:
    """The cores this process may run on (what the figures were measured with)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 0
