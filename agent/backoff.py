"""Jittered exponential backoff: small enough to write by hand (STYLE.md)."""

from __future__ import annotations

import random


class Backoff:
    """Delays that double from `initial` up to `cap`, with full jitter, reset on success.

    Full jitter (a uniform draw between half and all of the current step) keeps a fleet of
    agents that lost the same upstream from reconnecting in lock step.
    """

    def __init__(self, initial: float, cap: float, *, rng: random.Random | None = None) -> None:
        self.initial = initial
        self.cap = max(cap, initial)
        self.failures = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        """The delay before the next attempt; counts one more failure."""
        step = min(self.cap, self.initial * 2**self.failures)
        self.failures = min(self.failures + 1, 32)
        return self._rng.uniform(step / 2, step)

    def reset(self) -> None:
        """Forget past failures after a success."""
        self.failures = 0
