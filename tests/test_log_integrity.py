"""The log's start-up integrity check: damage is moved aside, good logs are never touched."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.config import LogConfig
from agent.events import Reading, Stream
from agent.log import KEEP_CORRUPT, EventLog, check_integrity, move_aside
from tests.conftest import eventually


def readings(n: int, start: int = 0) -> list[Reading]:
    now = time.time()
    return [
        Reading(f"s{i % 7}", float(i), "C", now, now, time.monotonic(), "test")
        for i in range(start, start + n)
    ]


async def fill(path: Path, batches: int = 10) -> None:
    async with EventLog.open(path, LogConfig(commit_interval=0)) as log:
        for b in range(batches):
            await log.append(readings(1000, b * 1000))


@pytest.mark.parametrize("keep", [0.3, 0.8, 0.99])
async def test_a_log_truncated_mid_page_is_moved_aside(tmp_path: Path, keep: float) -> None:
    path = tmp_path / "events.db"
    await fill(path)
    size = path.stat().st_size
    os.truncate(path, int(size * keep) + 100)  # never on a page boundary
    damaged = path.read_bytes()
    assert check_integrity(path) is not None
    async with EventLog.open(path, LogConfig()) as log:
        assert log.recovered is not None
        assert log.head(Stream.READINGS) == 0, "a fresh log"
        await log.append(readings(5))
        assert log.head(Stream.READINGS) == 5
    moved = Path(log.recovered["moved_to"])
    assert moved.name.startswith("events.db.corrupt-")
    assert moved.read_bytes() == damaged  # noqa: ASYNC240
    assert "malformed" in log.recovered["reason"]
    assert check_integrity(path) is None


async def test_with_the_check_off_damage_found_at_open_is_recovered_too(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    path.write_bytes(b"\x00garbage" * 1000)
    async with EventLog.open(path, LogConfig(integrity_check="off")) as log:
        assert log.recovered is not None and "not a database" in log.recovered["reason"]


async def test_a_log_killed_mid_write_is_sound_and_kept(tmp_path: Path) -> None:
    """kill -9 leaves a WAL whose last frame may be torn: SQLite ignores it, and so must we."""
    path = tmp_path / "events.db"
    copy = tmp_path / "copy" / "events.db"
    copy.parent.mkdir()
    async with EventLog.open(path, LogConfig(commit_interval=0)) as log:
        for b in range(3):
            await log.append(readings(1000, b * 1000))
        # What the card holds at the instant of a power cut: the database and its WAL.
        shutil.copy(path, copy)
        shutil.copy(f"{path}-wal", f"{copy}-wal")
    wal = Path(f"{copy}-wal")
    os.truncate(wal, os.stat(wal).st_size - 1000)  # the last frame is torn
    assert check_integrity(copy) is None
    async with EventLog.open(copy, LogConfig()) as log:
        assert log.recovered is None
        assert 0 < log.head(Stream.READINGS) <= 3000
    assert not list(copy.parent.glob("*.corrupt-*"))


def test_only_the_newest_corrupt_copies_are_kept(tmp_path: Path) -> None:
    path = tmp_path / "events.db"
    for i in range(KEEP_CORRUPT + 2):
        path.write_bytes(b"bad %d" % i)
        Path(f"{path}-wal").write_bytes(b"wal %d" % i)
        move_aside(path)
    kept = sorted(p.read_bytes() for p in tmp_path.iterdir() if not p.name.endswith("-wal"))
    assert kept == [b"bad 2", b"bad 3"]
    assert sorted(p.read_bytes() for p in tmp_path.glob("*-wal")) == [b"wal 2", b"wal 3"]


def test_a_missing_or_empty_log_needs_no_check(tmp_path: Path) -> None:
    assert check_integrity(tmp_path / "none.db") is None
    (tmp_path / "empty.db").touch()
    assert check_integrity(tmp_path / "empty.db") is None
    sqlite3.connect(tmp_path / "ok.db").execute("CREATE TABLE t (x)").connection.close()
    assert check_integrity(tmp_path / "ok.db", "full") is None


# --------------------------------------------------------------------------- a full disk


async def test_a_full_disk_pauses_producers_and_loses_nothing(tmp_path: Path) -> None:
    """SQLITE_FULL (here from max_page_count, the same error a full card gives): the batch
    stays queued and is retried, producers wait on the bounded queue, and once there is room
    everything commits in order, exactly once."""
    path = tmp_path / "events.db"
    cfg = LogConfig(commit_interval=0, queue_size=2000, max_batch=500)
    async with EventLog.open(path, cfg) as log:
        await log.append(readings(100))
        db = log._writer_db
        assert db is not None
        async with db.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
        assert row is not None
        await db.execute(f"PRAGMA max_page_count={row[0]}")
        submitted = 100
        futures = []

        async def produce() -> None:
            nonlocal submitted
            while True:
                futures.append(await log.submit(readings(100, submitted)))
                submitted += 100

        producer = asyncio.create_task(produce())
        try:
            await eventually(lambda: log.stats.write_errors >= 2, what="failed commits")
            assert "full" in (log.stats.last_write_error or "")
            stalled_at = submitted
            await asyncio.sleep(0.3)
            assert submitted == stalled_at <= 100 + cfg.queue_size + 100, "back-pressure"
            assert log.head(Stream.READINGS) < submitted
            await db.execute("PRAGMA max_page_count=1073741823")  # room again
            await eventually(
                lambda: log.head(Stream.READINGS) >= stalled_at + 1000, within=15, what="resume"
            )
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        await asyncio.gather(*futures)
        total = submitted
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT seq, value FROM events WHERE stream=1 ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert [seq for seq, _ in rows] == list(range(1, total + 1))
    assert [value for _, value in rows] == [float(i) for i in range(total)]


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs: a real ENOSPC (needs root and mount, as in CI's container)."""
    where = tmp_path / "fs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mount = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(where)], capture_output=True
    )
    if mount.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mount.stderr.decode().strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


async def test_a_really_full_filesystem_pauses_and_loses_nothing(tiny_fs: Path) -> None:
    path = tiny_fs / "events.db"
    async with EventLog.open(path, LogConfig(commit_interval=0.01, queue_size=5000)) as log:
        await log.append(readings(100))
        ballast = tiny_fs / "ballast"
        fill_up(ballast)
        submitted, futures = 100, []

        async def produce() -> None:
            nonlocal submitted
            while True:
                futures.append(await log.submit(readings(100, submitted)))
                submitted += 100

        producer = asyncio.create_task(produce())
        try:
            await eventually(lambda: log.stats.write_errors >= 2, what="ENOSPC")
            assert log.head(Stream.READINGS) == 100
        finally:
            producer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await producer
        assert submitted <= 100 + 5000 + 100, "producers waited on the bounded queue"
        ballast.unlink()
        await asyncio.wait_for(asyncio.gather(*futures), 20)
    conn = sqlite3.connect(path)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        rows = conn.execute("SELECT seq, value FROM events WHERE stream=1 ORDER BY seq").fetchall()
    finally:
        conn.close()
    assert rows == [(i + 1, float(i)) for i in range(submitted)]


def fill_up(ballast: Path) -> None:
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 65536)
    except OSError:
        pass
    finally:
        os.close(fd)
