"""The virtual serial port: real ptys, read the way the agent reads them (pyserial, os.read)."""

from __future__ import annotations

import asyncio
import errno
import json
import math
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import serial
from typer.testing import CliRunner

from simulator.cli import app
from simulator.serial_port import SerialFeed, VirtualSerialPort
from simulator.signals import GARBAGE_LINE, LineGenerator, parse_sensors

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 5.0


def read_lines(fd: int, n: int, timeout: float = DEADLINE) -> list[bytes]:
    """Read `n` lines (each with its newline) from `fd`, failing after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    buf = b""
    while buf.count(b"\n") < n:
        left = deadline - time.monotonic()
        if left <= 0:
            got = buf.count(b"\n")
            raise AssertionError(f"only {got} of {n} lines within {timeout}s")
        ready, _, _ = select.select([fd], [], [], left)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError as e:  # EIO: the master side is gone
            if e.errno == errno.EIO:
                break
            raise
        if not chunk:
            break
        buf += chunk
    lines = [line + b"\n" for line in buf.split(b"\n")[:-1]]
    assert len(lines) >= n, f"the port hung up after {len(lines)} of {n} lines"
    return lines[:n]


def start_sim(*args: str) -> tuple[subprocess.Popen[bytes], str]:
    """Start `python -m simulator.cli serial ARGS` and read the port from its first line."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "serial", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 10.0)
    if not ready:
        proc.kill()
        raise AssertionError("the simulator printed no PORT line")
    first = proc.stdout.readline().decode()
    assert first.startswith("PORT /dev/"), (first, proc.stderr.read() if proc.stderr else b"")
    return proc, first.split()[1]


def stop(proc: subprocess.Popen[bytes]) -> int:
    try:
        return proc.wait(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_subprocess_csv_with_link_and_faults(tmp_path: Path) -> None:
    link = tmp_path / "ttySIM0"
    proc, port = start_sim(
        "--format", "csv", "--rate", "500", "--count", "35", "--sensors", "temp1,hum1",
        "--seed", "4", "--link", str(link), "--garble-every", "7", "--nan-every", "5",
    )  # fmt: skip
    try:
        assert link.is_symlink() and os.readlink(link) == port
        # O_NOCTTY and no flush on open: everything since the first line is still queued.
        fd = os.open(link, os.O_RDONLY | os.O_NOCTTY)
        try:
            lines = read_lines(fd, 35)
        finally:
            os.close(fd)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not link.exists() and not link.is_symlink()
    for i, line in enumerate(lines):
        number = i + 1
        if number % 7 == 0:
            assert line == GARBAGE_LINE
            continue
        sensor, value, unit, ts = line.decode().rstrip("\n").split(",")
        assert sensor == ("temp1", "hum1")[i % 2]
        assert unit == ("C", "%")[i % 2]
        assert abs(float(ts) - time.time()) < 30
        assert math.isnan(float(value)) == (number % 5 == 0)
    # Same seed, same values: the generator is what the process ran.
    gen = LineGenerator(parse_sensors("temp1,hum1"), fmt="csv", rate=500, seed=4)
    assert [line.split(b",")[1] for line in lines[:4]] == [
        gen.line(i, 0.0).data.split(b",")[1] for i in range(4)
    ]


def test_subprocess_runs_until_sigterm_and_removes_link(tmp_path: Path) -> None:
    link = tmp_path / "ttySIM1"
    link.write_text("a stale file where the link goes")
    proc, port = start_sim("--format", "json", "--rate", "200", "--link", str(link))
    try:
        assert os.readlink(link) == port
        fd = os.open(port, os.O_RDONLY | os.O_NOCTTY)
        try:
            lines = read_lines(fd, 20)
        finally:
            os.close(fd)
        for line in lines:
            obj = json.loads(line)
            assert set(obj) == {"sensor", "value", "unit", "ts"}
            assert obj["sensor"] in {"temp1", "hum1", "press1"}
        proc.send_signal(signal.SIGTERM)
        assert stop(proc) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not link.exists() and not link.is_symlink()


async def test_in_process_feed_read_with_pyserial() -> None:
    gen = LineGenerator(parse_sensors("2"), fmt="json", rate=400.0, seed=9, nan_every=4)
    with VirtualSerialPort() as port:
        # pyserial flushes the input queue on open, like a real port: open it before feeding.
        ser = serial.Serial(port.path, baudrate=115200, timeout=0.1)
        try:
            feed = SerialFeed(port, gen, count=24)
            stats = await asyncio.wait_for(feed.run(), DEADLINE)
            assert (stats.lines, stats.nans, stats.garbled) == (24, 6, 0)

            def read_24() -> list[bytes]:
                deadline = time.monotonic() + DEADLINE
                out: list[bytes] = []
                while len(out) < 24 and time.monotonic() < deadline:
                    line = ser.readline()
                    if line:
                        out.append(line)
                return out

            lines = await asyncio.to_thread(read_24)
        finally:
            ser.close()
    assert len(lines) == 24
    assert lines == [gen.line(i, json.loads(lines[i])["ts"]).data for i in range(24)]
    values = [json.loads(line)["value"] for line in lines]
    assert [math.isnan(v) for v in values] == [(i + 1) % 4 == 0 for i in range(24)]


async def test_no_reader_gives_back_pressure_not_a_crash() -> None:
    with VirtualSerialPort() as port:
        block = b"x" * 1023 + b"\n"
        written = 0

        async def flood() -> None:
            nonlocal written
            for _ in range(200):
                await port.write(block)
                written += len(block)

        writer = asyncio.create_task(flood())
        # The pty fills up and the writer waits for room: `written` stops moving.
        deadline = time.monotonic() + DEADLINE
        seen, steady = -1, 0
        while steady < 3:
            assert time.monotonic() < deadline, "the writer never stalled"
            seen, steady = written, steady + 1 if written == seen else 0
            await asyncio.sleep(0.03)
        assert not writer.done() and 0 < written < 200 * len(block)
        assert port.pending() > 0
        fd = os.open(port.path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            got = 0
            while got < 200 * len(block):
                assert time.monotonic() < deadline + DEADLINE, f"read {got} bytes"
                try:
                    got += len(os.read(fd, 65536))
                except BlockingIOError:
                    await asyncio.sleep(0.005)
            await asyncio.wait_for(writer, DEADLINE)
        finally:
            os.close(fd)
        assert got == written == 200 * len(block)


def test_port_close_removes_only_its_own_link(tmp_path: Path) -> None:
    link = tmp_path / "tty"
    port = VirtualSerialPort(link)
    path = port.open()
    assert os.readlink(link) == path
    os.remove(link)
    os.symlink("/dev/null", link)  # someone else owns the name now
    port.close()
    assert os.readlink(link) == "/dev/null"
    port.close()  # idempotent


@pytest.mark.parametrize(
    "args",
    [["--format", "xml"], ["--count", "3", "--duration", "1"], ["--sensors", "a,a"]],
)
def test_cli_rejects_bad_options(args: list[str]) -> None:
    result = CliRunner().invoke(app, ["serial", *args])
    assert result.exit_code == 2
    assert "PORT" not in result.stdout
