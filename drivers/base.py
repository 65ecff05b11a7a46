"""The driver contract: an async iterator of batches of readings, behind open and close."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from agent.events import Reading, Rejected


class DriverError(Exception):
    """A driver could not reach or keep its source. The runtime decides whether to retry."""


@dataclass(slots=True)
class Batch:
    """What a driver hands the runtime in one go: readings and rejected input, in arrival order.

    `ack`, when set, is called by the runtime after every item of the batch is committed to
    the log, and never before (write-ahead: a source is acknowledged only after the commit).
    It is called from the event loop thread.
    """

    items: list[Reading | Rejected] = field(default_factory=list)
    ack: Callable[[], None] | None = None


@runtime_checkable
class Driver(Protocol):
    """A sensor input.

    `open` is called once before iteration; iteration yields batches until the source ends
    or `close` is called; `close` may be called while iteration is blocked waiting for input,
    and more than once. Iteration is never called concurrently with itself.
    """

    name: str

    async def open(self) -> None: ...

    def __aiter__(self) -> AsyncIterator[Batch]: ...

    async def close(self) -> None: ...
