"""A virtual serial port (a pty pair) and a real-time feed of simulated device lines into it.

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
import termios
import time
import tty
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from simulator.signals import Line, LineGenerator


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
                _replace_symlink(self.link, path)
        except OSError as e:
            os.close(master)
            os.close(slave)
            raise PortError(f"cannot set up the pty: {e}") from e
        self._master, self._slave, self._path = master, slave, path
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


@dataclass(slots=True)
class FeedStats:
    """What a feed has sent so far."""

    lines: int = 0
    garbled: int = 0
    nans: int = 0
    bytes: int = 0
    resyncs: int = 0  # times the schedule moved forward because the reader held the feed back


class SerialFeed:
    """Writes a `LineGenerator`'s lines to a port in real time, `rate` lines per second.

    Line i is due at `i / rate` seconds after start (plus any resync shift) and is stamped
    with the wall-clock time it was due. When the reader holds the feed back by more than
    `max_lag` seconds, the schedule moves forward instead of bursting: no line is dropped and
    device times stay close to the wall clock. Stops after `count` lines or `duration`
    seconds of schedule, or runs until cancelled. `stats` is live while it runs.
    """

    #: Lines due at the same moment are written together, up to this many per write.
    MAX_LINES_PER_WRITE = 256

    def __init__(
        self,
        port: VirtualSerialPort,
        lines: LineGenerator,
        *,
        count: int | None = None,
        duration: float | None = None,
        max_lag: float = 1.0,
    ) -> None:
        if count is not None and count < 0:
            raise ValueError("count must be >= 0")
        if duration is not None and duration < 0:
            raise ValueError("duration must be >= 0")
        self.port = port
        self.lines = lines
        self.count = count
        self.duration = duration
        self.max_lag = max_lag
        self.stats = FeedStats()

    def _done(self, index: int) -> bool:
        if self.count is not None and index >= self.count:
            return True
        return self.duration is not None and self.lines.signal_time(index) >= self.duration

    async def run(self) -> FeedStats:
        """Feed lines until done (or cancelled); return the stats."""
        mono0 = time.monotonic()
        epoch0 = time.time()
        shift = 0.0
        index = 0
        while not self._done(index):
            due = self.lines.signal_time(index) + shift
            now = time.monotonic() - mono0
            if due > now:
                await asyncio.sleep(due - now)
                now = time.monotonic() - mono0
            elif now - due > self.max_lag:
                shift += now - due
                self.stats.resyncs += 1
            chunk: list[Line] = []
            while (
                not self._done(index)
                and len(chunk) < self.MAX_LINES_PER_WRITE
                and self.lines.signal_time(index) + shift <= now
            ):
                chunk.append(self.lines.line(index, epoch0 + self.lines.signal_time(index) + shift))
                index += 1
            data = b"".join(line.data for line in chunk)
            await self.port.write(data)
            self.stats.lines += len(chunk)
            self.stats.bytes += len(data)
            self.stats.garbled += sum(line.fault == "garble" for line in chunk)
            self.stats.nans += sum(line.fault == "nan" for line in chunk)
        return self.stats
