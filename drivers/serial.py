"""A sensor on a serial port: lines framed, decoded (json, csv, kv, regex) and batched.

The port is read only when the consumer asks for the next batch, with non-blocking reads on
its file descriptor woken by the event loop (`loop.add_reader`), or, while lines keep coming,
by a timer when the next batch is due (see `batch_interval` below), so there is no reader thread and
no queue: while the runtime is busy, the bytes wait in the kernel's tty buffer and, once that
is full, the device blocks or its flow control kicks in. Nothing is buffered here beyond one
partial line (at most `max_line` bytes) and one batch's bytes.

A port is opened by path each time, so a `/dev/serial/by-id/...` link that udev removes on
unplug and re-creates, pointing at a new tty, on replug is simply found again (while it is gone,
`open` fails and the runtime retries). pyserial flushes what the tty held at open (stale bytes),
and the device may be in the middle of a line at that instant, so the stream is joined at an
arbitrary byte: the bytes up to the first terminator are dropped and counted in `resync_bytes`,
as the tail of a line is neither a reading nor bad input. Only a first line the decoder can
tell is whole (a JSON line that decodes, a CSV header) is kept.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import math
import os
import termios
import time
from types import TracebackType
from typing import Self

import serial

from agent.config import SerialInputConfig
from agent.events import Invalid, Reading, Rejected, Sample
from drivers.base import Batch, DriverError
from drivers.decoders import LineFramer, Tail, decoder_for

log = logging.getLogger(__name__)

#: Bytes asked of the port per read.
READ_SIZE = 4096
# `batch_interval` (config, 200 ms by default): at most one batch per this interval while lines
# keep coming: after a short read that comes sooner than this after the previous batch, the
# driver waits out the rest and hands on everything that arrived meanwhile. Every batch costs
# a round of the event loop, a log submission, a commit and its fsync whatever its size: a
# board at 1,000 lines/s handed on in 20 ms batches cost the agent 7.5 % of a core, in 100 ms
# batches 4.6 % (bench/soak.py setup, input and log only); with a window, a rule and an HTTP
# upstream, 200 ms instead of 100 ms took it from 5.1 to 4.4 % and from 263 to 218 bytes
# written per reading (half the commits). Once a batch has waited like that (lines come faster
# than batches), the driver does not wait for the port's next byte: it sleeps until the next
# batch is due and then reads what came, so the process wakes once per batch rather than twice
# (a wake-up costs 50-100 us of CPU before any work, its caches cold); if nothing came, it
# waits for the port again (and idle_timeout counts from then). A sensor sending less often
# than this is never delayed (its line is handed on as it arrives). Reads that fill
# READ_SIZE, or gather COALESCE_BYTES, never wait: the next read follows at once.
#: Most bytes gathered into one batch.
COALESCE_BYTES = 16 * READ_SIZE

_PARITY = {
    "none": serial.PARITY_NONE,
    "even": serial.PARITY_EVEN,
    "odd": serial.PARITY_ODD,
    "mark": serial.PARITY_MARK,
    "space": serial.PARITY_SPACE,
}


class SerialDriver:
    """Readings from one serial port (one owner: the port is locked while open).

    What is read from the port in one go (see `batch_interval`) becomes one `Batch` of
    `Reading`s and `Rejected` lines, in arrival order; bytes holding no complete line yield
    nothing. A partial line left when the driver is closed, or when the port vanishes, is
    dropped: it was never a reading. After each `open` the bytes before the first terminator
    are dropped and counted in `resync_bytes` (unless the decoder can tell the line is whole,
    see `LineDecoder.first_line`).

    `open` and iteration raise `DriverError` when the port cannot be opened (missing, a by-id
    link gone, busy, not a tty) or vanishes (unplugged: EIO/ENODEV, hang-up), or when no byte
    came for `idle_timeout`; the runtime then closes the driver and decides whether and when to
    `open` it again.
    `close` may be called while iteration waits for input or for the next batch to be due,
    and more than once; iteration then ends promptly: lines already read from the port come
    in one last batch, then StopAsyncIteration. Iteration is never called concurrently with
    itself; everything runs on the event loop thread.
    """

    def __init__(self, cfg: SerialInputConfig, *, read_size: int = READ_SIZE) -> None:
        self.name = cfg.name
        self.cfg = cfg
        self._read_size = read_size
        self._decode = decoder_for(cfg)
        self._framer = LineFramer(cfg.max_line, cfg.terminator.encode("utf-8"))
        self._port: serial.Serial | None = None
        self._fd = -1
        self._closed = False
        self._waiter: asyncio.Future[None] | None = None
        #: At most one batch per this many seconds while lines keep coming (see above).
        self.batch_interval = cfg.batch_interval
        self._last_batch = -math.inf  # monotonic time the last batch was handed on
        #: Whether the last batch waited out batch_interval and then emptied the port: lines
        #: come faster than batches, so the next read waits for the next batch to be due.
        self._flowing = False
        #: Bytes dropped as the tail of a line after an open (the port joined mid-line).
        self.resync_bytes = 0

    async def open(self) -> None:
        """Open and lock the port; raise DriverError if it is missing, busy or not a tty."""
        if self._port is not None:
            raise RuntimeError(f"serial input {self.name!r} is already open")
        cfg = self.cfg
        try:
            # The device is opened O_NONBLOCK by pyserial, so this does not wait for carrier.
            port = serial.Serial(
                port=cfg.port,
                baudrate=cfg.baudrate,
                bytesize=cfg.bytesize,
                parity=_PARITY[cfg.parity],
                stopbits=cfg.stopbits,
                xonxoff=cfg.flow_control == "xonxoff",
                rtscts=cfg.flow_control == "rtscts",
                timeout=0,
                exclusive=True,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            if getattr(exc, "errno", None) == errno.ENOENT:
                why = "no such device (unplugged?)"
            else:
                why = str(exc)
            raise DriverError(f"serial input {self.name!r}: cannot open {cfg.port}: {why}") from exc
        try:
            fd = port.fileno()
            # pyserial leaves VMIN at 0, where a read with nothing to read returns b"", the same
            # as a hang-up. With VMIN 1 an empty port is EAGAIN and b"" means the device is gone.
            attrs = termios.tcgetattr(fd)
            attrs[6][termios.VMIN] = 1
            attrs[6][termios.VTIME] = 0
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
        except (termios.error, OSError) as exc:
            port.close()
            raise DriverError(
                f"serial input {self.name!r}: cannot set up {self.cfg.port}: {exc}"
            ) from exc
        self._port, self._fd, self._closed = port, fd, False
        self._flowing = False
        self._framer.resync()

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Batch:
        while True:
            if self._closed:
                raise StopAsyncIteration
            if self._port is None:
                raise RuntimeError(f"serial input {self.name!r} is not open")
            if self._flowing:
                # Lines kept coming, so the next ones would wait for the next batch anyway:
                # sleep until it is due and take what came. That is one wake-up per batch
                # instead of two (the first byte, then the batch), and a wake-up costs as
                # much CPU as decoding a few dozen lines. Nothing came: wait as below.
                self._flowing = False
                await self._pause(self._last_batch + self.batch_interval - time.monotonic())
                chunk = self._more()
                if not chunk:
                    continue  # closed, nothing sent, or an error the next read reports
                flowing = len(chunk) < COALESCE_BYTES
            else:
                try:
                    chunk = os.read(self._fd, self._read_size)
                except BlockingIOError:
                    await self._readable()
                    continue
                except OSError as exc:
                    raise DriverError(
                        f"serial input {self.name!r}: {self.cfg.port}: {exc}"
                    ) from exc
                if not chunk:
                    raise DriverError(f"serial input {self.name!r}: {self.cfg.port} hung up")
                flowing = False
                if len(chunk) < self._read_size and not self._closed:
                    wait = self._last_batch + self.batch_interval - time.monotonic()
                    if wait > 0:
                        await self._pause(wait)
                        more = self._more()
                        chunk += more
                        flowing = len(more) < COALESCE_BYTES
            batch = self._batch(chunk)
            if batch.items:
                self._last_batch = time.monotonic()
                # Not after a full read, nor after COALESCE_BYTES: a backlog is read at once.
                self._flowing = flowing
                return batch

    def _more(self) -> bytes:
        """What else the port holds now, without waiting; an error is left for the next read."""
        parts: list[bytes] = []
        size = 0
        while size < COALESCE_BYTES and not self._closed:
            try:
                part = os.read(self._fd, self._read_size)
            except OSError:  # BlockingIOError (nothing more) or the port going away
                break
            if not part:
                break
            parts.append(part)
            size += len(part)
        return b"".join(parts)

    async def _pause(self, delay: float) -> None:
        """Sleep for `delay` seconds (if positive), or until `close`."""
        if delay <= 0:
            return
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        timer = loop.call_later(delay, _wake, waiter)
        try:
            await waiter
        finally:
            self._waiter = None
            timer.cancel()

    async def _readable(self) -> None:
        """Wait until the port has bytes (or an error, or a hang-up), or until `close`."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        self._waiter = waiter
        loop.add_reader(self._fd, _wake, waiter)
        idle = self.cfg.idle_timeout
        try:
            async with asyncio.timeout(idle if idle > 0 else None):
                await waiter
        except TimeoutError:
            # A wedged USB-serial adapter or a hung device: reopening is the cure that exists.
            raise DriverError(
                f"serial input {self.name!r}: {self.cfg.port}: no data for {idle:g}s"
            ) from None
        finally:
            self._waiter = None
            if not self._closed:  # close() has already unregistered the fd it closed
                loop.remove_reader(self._fd)

    def _batch(self, chunk: bytes) -> Batch:
        recv, mono = time.time(), time.monotonic()
        source, prefix = self.name, self.cfg.sensor_prefix
        items: list[Reading | Rejected] = []
        decode = self._decode.reading
        for line in self._framer.feed(chunk):
            found: Reading | list[Sample] | Invalid | None
            if isinstance(line, bytes):
                found = decode(line, recv, mono, source, prefix)
                if isinstance(found, Reading):
                    items.append(found)
                    continue
                if isinstance(found, Invalid):
                    items.append(Rejected(line, found.reason, found.detail, source, recv, mono))
                    continue
            elif isinstance(line, Tail):
                found = None if line.raw is None else self._decode.first_line(line.raw)
                if found is None:
                    self.resync_bytes += line.size
                    if line.size:
                        log.debug("%s: dropped %d bytes before the first line", source, line.size)
                    continue
            else:
                detail = f"line longer than {self.cfg.max_line} bytes"
                items.append(Rejected(line.raw, "oversized", detail, source, recv, mono))
                continue
            for s in found:
                event_time = recv if s.time is None else s.time
                items.append(
                    Reading(prefix + s.sensor, s.value, s.unit, event_time, recv, mono, source)
                )
        return Batch(items)

    async def close(self) -> None:
        """Release the port and end iteration; safe while iteration waits, and twice."""
        self._closed = True
        port, self._port = self._port, None
        if port is None:
            return
        if self._waiter is not None:  # iteration waits for the port, or for a batch to be due
            asyncio.get_running_loop().remove_reader(self._fd)  # (none while it sleeps)
            _wake(self._waiter)
        # A vanished device can fail its close; the descriptor is released anyway.
        with contextlib.suppress(OSError):
            port.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
