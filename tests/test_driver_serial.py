"""The serial driver on a real pty pair: the master end plays the device.

Waiting is on conditions with deadlines (`take`, `wait_for`), never on sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import struct
import termios
import time
import tty
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import SerialInputConfig
from agent.events import Reading, Rejected
from drivers.base import Batch, DriverError
from drivers.serial import SerialDriver
from tests.conftest import eventually

TIMEOUT = 5.0


class PtyDevice:
    """A pty pair: the driver opens `path` (the slave), the test writes to the master."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        self.path = os.ttyname(self.slave)

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.master, view) :]

    def unplug(self) -> None:
        """The device goes away: the driver's end is hung up."""
        if self.master >= 0:
            os.close(self.master)
            self.master = -1

    def close(self) -> None:
        self.unplug()
        if self.slave >= 0:
            os.close(self.slave)
            self.slave = -1


@pytest.fixture
def pty_device() -> Iterator[PtyDevice]:
    device = PtyDevice()
    yield device
    device.close()


def serial_config(path: str, **overrides: Any) -> SerialInputConfig:
    return SerialInputConfig.model_validate(
        {"type": "serial", "name": "bench1", "port": path, **overrides}
    )


@pytest.fixture
async def driver(pty_device: PtyDevice) -> AsyncIterator[SerialDriver]:
    drv = SerialDriver(serial_config(pty_device.path, max_line=128, sensor_prefix="lab/"))
    await drv.open()
    yield drv
    await drv.close()


async def take(driver: SerialDriver, n: int) -> list[Reading | Rejected]:
    """The next `n` items from the driver (batches are cut wherever reads happen to fall)."""

    async def collect() -> list[Reading | Rejected]:
        items: list[Reading | Rejected] = []
        async for batch in driver:
            assert batch.items, "a driver never yields an empty batch"
            items.extend(batch.items)
            if len(items) >= n:
                break
        return items

    items = await asyncio.wait_for(collect(), TIMEOUT)
    assert len(items) == n, items
    return items


async def test_lines_come_out_as_readings_in_order(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    before = time.time()
    lines = [f'{{"sensor": "t{i}", "value": {i}.5, "unit": "C"}}\n' for i in range(50)]
    pty_device.write("".join(lines).encode())
    pty_device.write(
        b'[{"sensor": "a", "value": 1, "ts": 1764170000}, {"sensor": "b", "value": 2}]\n'
    )
    items = await take(driver, 52)
    readings = [i for i in items if isinstance(i, Reading)]
    assert [(r.sensor, r.value, r.unit) for r in readings[:50]] == [
        (f"lab/t{i}", i + 0.5, "C") for i in range(50)
    ]
    for r in readings:
        assert r.source == "bench1"
        assert before <= r.recv_time <= time.time()
        assert r.mono <= time.monotonic()
    a, b = readings[50:]
    assert (a.sensor, a.time) == ("lab/a", 1764170000.0)
    assert (b.sensor, b.time) == ("lab/b", b.recv_time)


async def test_a_line_split_across_writes_is_one_reading(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    pty_device.write(b'{"sensor": "t", ')
    pty_device.write(b'"value": 7}\n')
    [reading] = await take(driver, 1)
    assert isinstance(reading, Reading)
    assert (reading.sensor, reading.value) == ("lab/t", 7.0)


async def test_bad_lines_are_rejected_with_raw_bytes(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    pty_device.write(
        b"\n"  # a blank line is skipped, not rejected
        b"garbage\n"
        b'{"sensor": "t", "value": NaN}\n'
        b'{"sensor": "t", "value": 1, "unit": "\xb0C"}\n'
        b'{"sensor": "t", "value": 2}\n'
    )
    items = await take(driver, 4)
    assert [(type(i).__name__, getattr(i, "reason", None)) for i in items] == [
        ("Rejected", "invalid_json"),
        ("Rejected", "nan"),
        ("Rejected", "invalid_utf8"),
        ("Reading", None),
    ]
    rejected = [i for i in items if isinstance(i, Rejected)]
    assert [r.raw for r in rejected] == [
        b"garbage",
        b'{"sensor": "t", "value": NaN}',
        b'{"sensor": "t", "value": 1, "unit": "\xb0C"}',
    ]
    assert all(r.source == "bench1" and r.detail for r in rejected)


async def test_oversized_line_is_one_rejection_and_the_next_line_decodes(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    long_line = b'{"sensor": "t", "value": 1, "pad": "' + b"x" * 1000 + b'"}\n'
    pty_device.write(
        b'{"sensor": "t", "value": 0}\n' + long_line + b'{"sensor": "t", "value": 2}\n'
    )
    first, oversized, reading = await take(driver, 3)
    assert isinstance(first, Reading) and first.value == 0.0
    assert isinstance(oversized, Rejected)
    assert (oversized.reason, oversized.raw) == ("oversized", long_line[:128])
    assert isinstance(reading, Reading)
    assert reading.value == 2.0


async def test_csv_format_drops_the_first_line_after_open(pty_device: PtyDevice) -> None:
    """The port is joined mid-line: the tail of "t22,2.5,C," must not become sensor "2"."""
    cfg = serial_config(pty_device.path, format="csv", terminator="\r\n")
    async with SerialDriver(cfg) as drv:
        pty_device.write(b"2,2.5,C,\r\nt1,1.5,C,\r\nt2,2.5,,1764170000\r\nt3,x,,\r\n")
        a, b, c = await take(drv, 3)
        assert drv.resync_bytes == len(b"2,2.5,C,")
    assert isinstance(a, Reading) and (a.sensor, a.value, a.unit) == ("t1", 1.5, "C")
    assert isinstance(b, Reading) and (b.unit, b.time) == (None, 1764170000.0)
    assert isinstance(c, Rejected) and (c.reason, c.raw) == ("not_a_number", b"t3,x,,")


async def test_kv_wide_lines(pty_device: PtyDevice) -> None:
    cfg = serial_config(pty_device.path, format="kv", sensor_prefix="b.", ignore=["id"])
    async with SerialDriver(cfg) as drv:
        pty_device.write(b"mp=21.5 hum=40\n")  # the tail of a line: dropped, counted
        pty_device.write(b"id=7 temp=21.5 hum=40 ts=1764170000\nt1:1,t2:\nboot ok\n")
        items = await take(drv, 4)
        assert drv.resync_bytes == len(b"mp=21.5 hum=40")
    readings = [(i.sensor, i.value, i.time) for i in items if isinstance(i, Reading)]
    assert readings[:2] == [("b.temp", 21.5, 1764170000.0), ("b.hum", 40.0, 1764170000.0)]
    assert readings[2][:2] == ("b.t1", 1.0)
    assert isinstance(items[3], Rejected) and items[3].reason == "bad_pair"


async def test_regex_with_a_fixed_sensor(pty_device: PtyDevice) -> None:
    cfg = serial_config(
        pty_device.path,
        format="regex",
        regex=r"^T=(?P<value>[-\d.]+) ?(?P<unit>\w*)$",
        sensor="temp",
    )
    async with SerialDriver(cfg) as drv:
        pty_device.write(b"\nT=21.5 C\nHELLO\n")
        reading, rejected = await take(drv, 2)
    assert isinstance(reading, Reading) and (reading.sensor, reading.value, reading.unit) == (
        "temp",
        21.5,
        "C",
    )
    assert isinstance(rejected, Rejected) and (rejected.reason, rejected.raw) == (
        "no_match",
        b"HELLO",
    )


async def test_csv_header_comes_after_the_tail_and_is_kept_across_reopens(
    pty_device: PtyDevice,
) -> None:
    cfg = serial_config(pty_device.path, format="csv", csv_header=True, wide=True)
    drv = SerialDriver(cfg)
    await drv.open()
    # Joined mid-record; then the device resets and prints its header, then records.
    pty_device.write(b"0,21.4,40\nts,temp,hum\n1764170000,21.5,41\n")
    items = await take(drv, 2)
    assert [(i.sensor, i.value) for i in items if isinstance(i, Reading)] == [
        ("temp", 21.5),
        ("hum", 41.0),
    ]
    await drv.close()
    await drv.open()  # this device does not reset on open: no new header
    pty_device.write(b"4170001,22,42\n1764170002,22.5,43\n")
    items = await take(drv, 2)
    assert [(i.sensor, i.value, i.time) for i in items if isinstance(i, Reading)] == [
        ("temp", 22.5, 1764170002.0),
        ("hum", 43.0, 1764170002.0),
    ]
    assert drv.resync_bytes == len(b"0,21.4,40") + len(b"4170001,22,42")
    await drv.close()


async def test_line_settings_reach_the_port(pty_device: PtyDevice) -> None:
    cfg = serial_config(
        pty_device.path,
        baudrate=9600,
        bytesize=7,
        parity="even",
        stopbits=2,
        flow_control="rtscts",
    )
    async with SerialDriver(cfg) as drv:
        cflag, speed = (lambda a: (a[2], a[4]))(termios.tcgetattr(pty_device.slave))
        assert speed == termios.B9600
        assert cflag & termios.CSTOPB and cflag & termios.CRTSCTS
        # A pty forces 8 bits and no parity into its termios; pyserial was asked for them.
        assert drv._port is not None
        assert (drv._port.bytesize, drv._port.parity) == (7, "E")
    cfg = serial_config(pty_device.path, flow_control="xonxoff", stopbits=1)
    async with SerialDriver(cfg):
        iflag, cflag = (lambda a: (a[0], a[2]))(termios.tcgetattr(pty_device.slave))
        assert iflag & termios.IXON and iflag & termios.IXOFF
        assert not cflag & termios.CSTOPB and not cflag & termios.CRTSCTS


async def test_idle_port_raises_after_idle_timeout(pty_device: PtyDevice) -> None:
    cfg = serial_config(pty_device.path, idle_timeout="200ms")
    async with SerialDriver(cfg) as drv:
        pty_device.write(b'{"sensor": "t", "value": 1}\n')
        await take(drv, 1)
        started = time.monotonic()
        with pytest.raises(DriverError, match=r"no data for 0\.2s"):
            await asyncio.wait_for(take(drv, 1), TIMEOUT)
        assert time.monotonic() - started >= 0.2


async def test_back_pressure_holds_input_in_the_tty_until_asked(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    """While nobody iterates nothing is read: the device's writes block, and nothing is lost."""
    os.set_blocking(pty_device.master, False)
    line = b'{"sensor": "t", "value": 1.0}\n'
    written = 0
    with pytest.raises(BlockingIOError):
        while True:
            written += os.write(pty_device.master, line)
    # Partial writes happen at the limit; complete the last line once there is room.
    tail = line[written % len(line) :] if written % len(line) else b""
    expected = written // len(line) + (1 if tail else 0)

    got = 0

    async def drain() -> None:
        nonlocal got, tail
        async for batch in driver:
            got += len(batch.items)
            if tail:
                with contextlib.suppress(BlockingIOError):
                    tail = tail[os.write(pty_device.master, tail) :]
            if got >= expected:
                return

    await asyncio.wait_for(drain(), TIMEOUT)
    assert got == expected


async def test_close_while_blocked_ends_iteration_promptly(driver: SerialDriver) -> None:
    batches: list[Batch] = []

    async def consume() -> None:
        async for batch in driver:
            batches.append(batch)

    task = asyncio.create_task(consume())
    await asyncio.sleep(0)  # let it reach the wait for input
    assert not task.done()
    await driver.close()
    await asyncio.wait_for(task, TIMEOUT)
    assert batches == []


def unread(device: PtyDevice) -> int:
    """Bytes waiting at the driver's end of the pty."""
    return int(struct.unpack("i", fcntl.ioctl(device.slave, termios.FIONREAD, b"\0" * 4))[0])


def count_readers(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors the running loop is asked to watch from now on, one per call."""
    loop = asyncio.get_running_loop()
    add_reader, calls = loop.add_reader, []

    def counting(fd: Any, callback: Any, *args: Any) -> None:
        calls.append(fd)
        add_reader(fd, callback, *args)

    monkeypatch.setattr(loop, "add_reader", counting)
    return calls


async def test_a_stream_is_read_when_batches_are_due_not_when_bytes_come(
    driver: SerialDriver, pty_device: PtyDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While lines keep coming the driver sleeps until each batch is due and then reads: it
    waits for the port (a reader registered, a wake-up for the first byte) only at the start,
    not for every batch."""
    readers = count_readers(monkeypatch)
    driver.batch_interval = 0.1
    sent = 0

    async def device() -> None:
        nonlocal sent
        until = time.monotonic() + 0.6
        while time.monotonic() < until:
            pty_device.write(f'{{"sensor": "t", "value": {sent}}}\n'.encode())
            sent += 1
            await asyncio.sleep(0.002)  # the device's pace, not a wait for anything
        pty_device.write(b'{"sensor": "end", "value": 0}\n')

    async def consume() -> tuple[list[float], int]:
        values: list[float] = []
        batches = 0
        async for batch in driver:
            batches += 1
            for item in batch.items:
                assert isinstance(item, Reading)
                if item.sensor == "lab/end":
                    return values, batches
                values.append(item.value)
        raise AssertionError("iteration ended")

    writer = asyncio.create_task(device())
    values, batches = await asyncio.wait_for(consume(), TIMEOUT)
    await writer
    assert values == [float(i) for i in range(sent)]
    assert batches >= 4  # about 0.6 s / batch_interval
    assert len(readers) <= 2, f"{len(readers)} waits for the port in {batches} batches"


async def test_close_while_a_batch_is_due_hands_on_what_was_read_promptly(
    driver: SerialDriver, pty_device: PtyDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver.batch_interval = 30.0
    pty_device.write(b'{"sensor": "t", "value": 1}\n')
    await take(driver, 1)  # handed on at once: the port was quiet
    pty_device.write(b'{"sensor": "t", "value": 2}\n')
    await eventually(lambda: unread(pty_device) > 0, within=TIMEOUT, what="the line in the tty")
    task = asyncio.create_task(anext(aiter(driver)))
    await asyncio.sleep(0)  # let it read the line and wait for the batch to be due
    assert not task.done() and unread(pty_device) == 0
    await driver.close()
    batch = await asyncio.wait_for(task, TIMEOUT)  # not 30 s
    assert [(i.sensor, i.value) for i in batch.items if isinstance(i, Reading)] == [("lab/t", 2.0)]
    with pytest.raises(StopAsyncIteration):
        await anext(aiter(driver))


async def test_close_while_sleeping_between_batches_ends_iteration_promptly(
    driver: SerialDriver, pty_device: PtyDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    driver.batch_interval = 0.3
    pty_device.write(b'{"sensor": "t", "value": 1}\n')
    await take(driver, 1)  # handed on at once: the port was quiet
    pty_device.write(b'{"sensor": "t", "value": 2}\n')
    await take(driver, 1)  # waited out the interval: lines come faster than batches
    readers = count_readers(monkeypatch)
    task = asyncio.create_task(anext(aiter(driver)))
    await asyncio.sleep(0)  # let it sleep until the next batch is due
    assert not task.done() and readers == []
    started = time.monotonic()
    await driver.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(task, TIMEOUT)
    assert time.monotonic() - started < 0.3


async def test_a_quiet_sensor_after_a_stream_is_not_delayed(
    driver: SerialDriver, pty_device: PtyDevice, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a stream stops the driver waits for the port again, and a line that comes later
    than batch_interval after the last batch is handed on as it arrives."""
    driver.batch_interval = 0.3
    pty_device.write(b'{"sensor": "t", "value": 1}\n')
    await take(driver, 1)
    pty_device.write(b'{"sensor": "t", "value": 2}\n')
    await take(driver, 1)  # waited out the interval: it sleeps until the next is due
    readers = count_readers(monkeypatch)
    task = asyncio.create_task(anext(aiter(driver)))
    await eventually(lambda: len(readers) == 1, within=TIMEOUT, what="a wait for the port")
    written = time.monotonic()
    pty_device.write(b'{"sensor": "t", "value": 3}\n')
    batch = await asyncio.wait_for(task, TIMEOUT)
    assert [i.value for i in batch.items if isinstance(i, Reading)] == [3.0]
    assert time.monotonic() - written < 0.3


async def test_close_twice_and_iterate_after_close(driver: SerialDriver) -> None:
    await driver.close()
    await driver.close()
    with pytest.raises(StopAsyncIteration):
        await anext(aiter(driver))


async def test_port_vanishing_while_blocked_raises_driver_error(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    async def next_batch() -> Batch:
        return await anext(aiter(driver))

    task = asyncio.create_task(next_batch())
    await asyncio.sleep(0)
    assert not task.done()
    pty_device.unplug()
    with pytest.raises(DriverError) as info:
        await asyncio.wait_for(task, TIMEOUT)
    assert info.value.__cause__ is not None or "hung up" in str(info.value)
    await driver.close()


async def test_port_vanishing_mid_stream_raises_driver_error(
    driver: SerialDriver, pty_device: PtyDevice
) -> None:
    pty_device.write(b'{"sensor": "t", "value": 1}\n{"sensor": "t", "val')
    await take(driver, 1)
    pty_device.unplug()
    with pytest.raises(DriverError):
        await asyncio.wait_for(take(driver, 1), TIMEOUT)


async def test_missing_port_is_a_driver_error(tmp_path: Any) -> None:
    drv = SerialDriver(serial_config(str(tmp_path / "ttyUSB9")))
    with pytest.raises(DriverError, match="no such device") as info:
        await drv.open()
    assert isinstance(info.value.__cause__, Exception)
    await drv.close()


async def test_not_a_tty_is_a_driver_error(tmp_path: Any) -> None:
    path = tmp_path / "plain-file"
    path.write_bytes(b"")
    with pytest.raises(DriverError):
        await SerialDriver(serial_config(str(path))).open()


async def test_one_owner_per_port(driver: SerialDriver, pty_device: PtyDevice) -> None:
    second = SerialDriver(serial_config(pty_device.path))
    with pytest.raises(DriverError) as info:
        await second.open()
    assert "lock" in str(info.value).lower() or getattr(info.value.__cause__, "errno", None) in (
        errno.EWOULDBLOCK,
        errno.EAGAIN,
    )


async def test_reopen_after_the_device_comes_back(pty_device: PtyDevice) -> None:
    """The runtime's retry loop: close after a DriverError, open again, read again."""
    drv = SerialDriver(serial_config(pty_device.path))
    await drv.open()
    pty_device.write(b'{"sensor": "t", "value": 1}\n{"sensor": "t", "val')
    await take(drv, 1)
    await drv.close()
    await drv.open()
    pty_device.write(b'{"sensor": "t", "value": 2}\n')
    [reading] = await take(drv, 1)
    assert isinstance(reading, Reading) and reading.value == 2.0
    await drv.close()


async def test_reopen_mid_line_stores_no_fragment(pty_device: PtyDevice) -> None:
    """The port is reopened while the device is in the middle of a line: the stream starts with
    that line's tail ("2,2.5,C,"), which would decode as a bogus reading of sensor "2"."""
    drv = SerialDriver(serial_config(pty_device.path, format="csv"))
    await drv.open()
    pty_device.write(b"\nt1,1.5,C,\n")
    [first] = await take(drv, 1)
    await drv.close()
    await drv.open()  # pyserial flushes what the tty held from before: it is stale
    pty_device.write(b"2,2.5,C,\nt3,3.5,C,\n")
    [reading] = await take(drv, 1)
    assert isinstance(first, Reading) and first.sensor == "t1"
    assert isinstance(reading, Reading) and (reading.sensor, reading.value) == ("t3", 3.5)
    assert drv.resync_bytes == len(b"2,2.5,C,")
    await drv.close()


async def test_by_id_link_that_vanishes_and_comes_back(tmp_path: Path) -> None:
    """udev's /dev/serial/by-id link goes with the unplugged device and comes back pointing at
    a new tty: the driver raises, fails to open while the link is gone, then reads the new tty,
    and the tail of a line it was joined in the middle of is neither a reading nor bad input."""
    by_id = tmp_path / "serial" / "by-id"
    by_id.mkdir(parents=True)
    link = by_id / "usb-Arduino_Uno_0001-if00"
    first, second = PtyDevice(), PtyDevice()
    try:
        link.symlink_to(first.path)
        drv = SerialDriver(serial_config(str(link), format="kv"))
        await drv.open()
        first.write(b"\nt=1\n")
        [reading] = await take(drv, 1)
        assert isinstance(reading, Reading) and reading.value == 1.0

        first.unplug()
        link.unlink()
        with pytest.raises(DriverError):
            await asyncio.wait_for(take(drv, 1), TIMEOUT)
        await drv.close()
        with pytest.raises(DriverError, match="no such device"):
            await drv.open()

        link.symlink_to(second.path)
        await drv.open()
        second.write(b"=2.5 h=40\nt=3 h=41\n")  # joined in the middle of "t=2.5 h=40"
        items = await take(drv, 2)
        assert [(i.sensor, i.value) for i in items if isinstance(i, Reading)] == [
            ("t", 3.0),
            ("h", 41.0),
        ]
        assert drv.resync_bytes == len(b"=2.5 h=40")
        await drv.close()
    finally:
        first.close()
        second.close()
