"""A virtual serial port (a pty pair), the output that writes simulated lines into it, and
`SerialFeed`, a feed of a `LineGenerator` into one.

The agent opens the pty's slave side (`VirtualSerialPort.path`, or the symlink `link`) as if
it were `/dev/ttyUSB0`; the simulator writes to the master side.

Pty facts this module is built around:
- The simulator keeps its own fd on the slave open for the port's whole life. Without it, the
  slave has no opener between agent restarts and writes to the master fail with EIO.
- Bytes nobody reads pile up in the slave's input queue; when it is full, writes to the
  master would block. The master is non-blocking and `write` awaits room, so a slow or absent
  reader slows the feed down (back-pressure) instead of crashing it or losing lines.
- Closing the master hangs the slave up and discards what it still holds, so `drain` waits
  for the reader to take the queued bytes before a finite feed closes the port.
- The kernel moves written bytes into the slave's queue a moment later (a work queue), so
  "nothing queued" is only believed once it has held for a short while.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import errno
import fcntl
import os
import sys
import termios
import time
import tty
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from simulator.outputs import Feed, FeedStats
from simulator.signals import Line, LineGenerator

__all__ = ["FeedStats", "PortError", "SerialFeed", "SerialOutput", "VirtualSerialPort"]


class PortError(Exception):
    """The virtual serial port could not be created or written to."""


class VirtualSerialPort:
    """A pty pair in raw mode, so bytes pass through unchanged, and an optional fixed symlink.

    `open` and `close` are synchronous and idempotent; `write` is a coroutine and must not be
    called concurrently with itself (lines would interleave). One owner per port.
    """

    def __init__(self, link: str | os.PathLike[str] | None = None) -> None:
        self.link: Path | None = Path(link) if link is not None else None
        self._master: int | None = None
        self._slave: int | None = None
        self._path: str | None = None
        self._settings: list[object] = []

    @property
    def path(self) -> str:
        """The slave's device path, e.g. `/dev/pts/7`."""
        if self._path is None:
            raise PortError("the port is not open")
        return self._path

    @property
    def master_fd(self) -> int:
        """The fd the simulator writes to."""
        if self._master is None:
            raise PortError("the port is not open")
        return self._master

    def open(self) -> str:
        """Create the pty pair and the symlink; return the slave path."""
        if self._master is not None:
            return self.path
        try:
            master, slave = os.openpty()
        except OSError as e:
            raise PortError(f"cannot create a pty: {e}") from e
        try:
            # Raw on the slave: no echo, no CR/NL translation, no XON/XOFF, no line editing.
            tty.setraw(slave, termios.TCSANOW)
            os.set_blocking(master, False)
            path = os.ttyname(slave)
            if self.link is not None:
                self.link.parent.mkdir(parents=True, exist_ok=True)
                _replace_symlink(self.link, path)
        except OSError as e:
            os.close(master)
            os.close(slave)
            raise PortError(f"cannot set up the pty: {e}") from e
        self._master, self._slave, self._path = master, slave, path
        self._settings = self.settings()  # as set up here, before any reader changes them
        return path

    def close(self) -> None:
        """Remove the symlink (if it still points at this port) and close the pty pair."""
        if self._master is None:
            return
        if self.link is not None and self._path is not None:
            with contextlib.suppress(OSError):
                if os.readlink(self.link) == self._path:
                    self.link.unlink()
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None

    def __enter__(self) -> VirtualSerialPort:
        self.open()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def settings(self) -> list[object]:
        """The slave's terminal settings (`termios.tcgetattr`)."""
        if self._slave is None:
            raise PortError("the port is not open")
        return list(termios.tcgetattr(self._slave))

    async def opened(self, interval: float = 0.02) -> None:
        """Return once a reader has opened the port (bound it with asyncio.timeout).

        A pty tells its master nothing about who opens the slave, but a serial reader sets the
        line up when it opens it (pyserial always does: speed, CLOCAL, CREAD), and that change
        is visible here. A reader that leaves the settings alone (`cat`) is never noticed.
        """
        # Polled: there is no wake-up for "the terminal settings changed" either.
        while True:
            if self.settings() != self._settings:
                break
            await asyncio.sleep(interval)
        # pyserial flushes the port's input right after setting it up: let that happen first.
        await asyncio.sleep(0.1)

    def pending(self) -> int:
        """Bytes written but not yet read from the slave side."""
        if self._slave is None:
            return 0
        buf = array.array("i", [0])
        fcntl.ioctl(self._slave, termios.FIONREAD, buf, True)
        return buf[0]

    async def write(self, data: bytes) -> None:
        """Write all of `data`, awaiting room in the pty when the reader is behind."""
        fd = self.master_fd
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                await self._writable(fd)
                continue
            except OSError as e:
                raise PortError(f"write to the pty failed: {e}") from e
            view = view[n:]

    async def drain(self, settle: float = 0.2) -> None:
        """Wait until the reader has taken everything written (bound it with asyncio.timeout).

        The kernel moves bytes written to the master into the slave's queue asynchronously,
        so an empty queue right after a write proves nothing: it must stay empty `settle` s.
        """
        # A pty gives no wake-up for "the other side has read", so this polls.
        quiet_since: float | None = None
        while quiet_since is None or time.monotonic() - quiet_since < settle:
            if self.pending() > 0:
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            await asyncio.sleep(0.02)

    @staticmethod
    async def _writable(fd: int) -> None:
        loop = asyncio.get_running_loop()
        ready: asyncio.Future[None] = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_writer(fd, wake)
        try:
            await ready
        finally:
            loop.remove_writer(fd)


def _replace_symlink(link: Path, target: str) -> None:
    """Point `link` at `target`, atomically replacing whatever is there."""
    tmp = link.with_name(f".{link.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    os.symlink(target, tmp)
    try:
        os.replace(tmp, link)
    except OSError as e:
        tmp.unlink()
        if e.errno == errno.EISDIR:
            raise OSError(e.errno, f"{link} is a directory") from e
        raise


class SerialOutput:
    """The `Output` of a virtual serial port: chunks written to the pty's master side.

    An outage closes the pty, as an unplugged device vanishes (the link goes too), after
    waiting up to `outage_drain` s for the reader to take what was written; `interrupt`
    returns the bytes it never took, which the close destroyed. `resume` creates a new pty and
    points the same link at it, as a device plugged back in comes back under its stable name.

    With `wait_open`, `ready` returns only once a reader has opened the port (see
    `VirtualSerialPort.opened`): pyserial flushes a port's input when it opens it, so lines
    written before the agent opened the port would be lost before anyone could count them.
    """

    name = "serial"

    def __init__(
        self, port: VirtualSerialPort, *, outage_drain: float = 0.5, wait_open: bool = False
    ) -> None:
        self.port = port
        self.outage_drain = outage_drain
        self.wait_open = wait_open

    async def open(self) -> None:
        self.port.open()

    async def ready(self) -> None:
        """Return when lines may be sent: at once, or (`wait_open`) once a reader opened it."""
        if self.wait_open:
            await self.port.opened()

    async def write(self, lines: Sequence[Line], data: bytes) -> Sequence[Line]:
        await self.port.write(data)
        return lines

    async def interrupt(self) -> int:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.outage_drain):
                await self.port.drain(settle=0.05)
        lost = self.port.pending()
        self.port.close()
        return lost

    async def resume(self) -> None:
        path = self.port.open()
        print(f"port back at {path}", file=sys.stderr, flush=True)

    async def finish(self, within: float) -> None:
        try:
            async with asyncio.timeout(within):
                await self.port.drain()
        except TimeoutError:
            print(
                f"reader did not take the last {self.port.pending()} bytes in {within}s",
                file=sys.stderr,
                flush=True,
            )

    async def close(self) -> None:
        self.port.close()


class SerialFeed(Feed):
    """A `Feed` into a virtual serial port (kept for callers of the first version)."""

    def __init__(
        self,
        port: VirtualSerialPort,
        lines: LineGenerator,
        *,
        count: int | None = None,
        duration: float | None = None,
        max_lag: float = 1.0,
        **options: Any,
    ) -> None:
        super().__init__(
            SerialOutput(port), lines, count=count, duration=duration, max_lag=max_lag, **options
        )
