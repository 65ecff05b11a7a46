"""End to end with real processes: the simulator on a pty, the agent, the ingestion endpoint.

The agent is SIGKILLed several times mid-stream and restarted. Afterwards every reading the
agent had committed is at the endpoint exactly once (after dedupe by event id), and the
endpoint's lost acknowledgements made the agent resend, which the endpoint counted.
"""

from __future__ import annotations

import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from simulator.cloud import CloudStore
from tests.conftest import wait_until


def spawn(args: list[str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args],
        stdout=subprocess.PIPE,
        stderr=log.open("a"),
        text=True,
    )


def first_line(proc: subprocess.Popen[str], prefix: str) -> str:
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()  # the child prints it at once, or dies
    assert line.startswith(prefix), f"expected {prefix!r}, got {line!r}"
    return line.removeprefix(prefix).strip()


def query(db: Path, sql: str) -> list[tuple[int, ...]]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return conn.execute(sql).fetchall()
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return []
    finally:
        conn.close()


def head(db: Path) -> int:
    rows = query(db, "SELECT max(seq) FROM events WHERE stream=1")
    return int(rows[0][0] or 0) if rows else 0


def upstream_cursor(db: Path) -> int:
    rows = query(db, "SELECT seq FROM cursors WHERE consumer='upstream:cloud' AND stream=1")
    return int(rows[0][0]) if rows else 0


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.timeout(120)
def test_sigkill_mid_stream_loses_nothing_committed(
    tmp_path: Path, procs: list[subprocess.Popen[str]]
) -> None:
    logs = tmp_path / "logs.txt"
    cloud = spawn(
        [
            "-m",
            "simulator.cli",
            "cloud",
            "--port",
            "0",
            "--db",
            str(tmp_path / "cloud.db"),
            "--token",
            "tok",
            "--lose-ack-rate",
            "0.1",
            "--seed",
            "7",
        ],
        logs,
    )
    procs.append(cloud)
    url = first_line(cloud, "LISTENING")
    link = tmp_path / "ttySIM0"
    sim = spawn(
        ["-m", "simulator.cli", "serial", "--link", str(link), "--rate", "400", "--sensors", "3"],
        logs,
    )
    procs.append(sim)
    first_line(sim, "PORT")
    config = tmp_path / "agent.yaml"
    data = tmp_path / "data"
    config.write_text(f"""
agent: {{name: e2e, data_dir: {data}, status_interval: 0.5}}
log: {{commit_interval: 20ms}}
inputs:
  - {{type: serial, name: board, port: {link}, reconnect_initial: 50ms, reconnect_max: 200ms}}
processing:
  windows: [{{name: w, size: 1s}}]
  rules: [{{name: hot, window: w, sensors: "temp*", above: 25, clear_below: 22}}]
upstreams:
  - {{type: http, name: cloud, url: "{url}/ingest", token: tok, batch_size: 50, linger: 10ms,
      backoff_initial: 20ms, backoff_max: 200ms}}
""")
    db = data / "events.db"
    agent_args = ["-m", "agent", "run", str(config)]
    for _ in range(4):
        agent = spawn(agent_args, logs)
        procs.append(agent)
        start = head(db)
        # Kill at a different point each round: while readings flow and batches are in flight.
        wait_until(lambda start=start: head(db) >= start + 150, 30, "readings to flow")  # type: ignore[misc]
        agent.send_signal(signal.SIGKILL)
        assert agent.wait(10) == -signal.SIGKILL
    agent = spawn(agent_args, logs)
    procs.append(agent)
    wait_until(lambda: head(db) > 0 and upstream_cursor(db) >= head(db) - 50, 30, "catching up")
    sim.send_signal(signal.SIGTERM)
    assert sim.wait(15) == 0
    # Input stopped: once the lines the agent had read are in the log (an input hands on at
    # most one batch per batch_interval; what it still holds at a SIGTERM is committed then,
    # for the next run to deliver), it delivers everything it committed, then exits cleanly.
    seen = [head(db), time.monotonic()]

    def settled() -> bool:
        now = head(db)
        if now != seen[0]:
            seen[:] = [now, time.monotonic()]
        return time.monotonic() - seen[1] > 1.0 and upstream_cursor(db) == now

    wait_until(settled, 30, "the log to settle and the upstream to drain")
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0, logs.read_text()[-2000:]

    committed = query(db, "SELECT seq FROM events WHERE stream=1 ORDER BY seq")
    n = head(db)
    assert [s for (s,) in committed] == list(range(1, n + 1)), "seqs are dense: nothing vanished"
    log_id = query(db, "SELECT value FROM meta WHERE key='log_id'")[0][0]
    with CloudStore(tmp_path / "cloud.db") as store:
        cloud_ids = store.event_ids("readings")
        duplicates = store.duplicates()
        stored = store.count("readings")
    expected = {f"{log_id}:readings:{i}" for i in range(1, n + 1)}
    assert cloud_ids == expected, (
        f"missing {len(expected - cloud_ids)}, extra {len(cloud_ids - expected)}"
    )
    assert stored == n, "exactly once after dedupe"
    assert duplicates > 0, "lost acks and kills made the agent resend; the endpoint must count it"
    assert n >= 4 * 150
    # Restarts are visible in the agent stream: one agent.started per run.
    starts = query(db, "SELECT count(*) FROM events WHERE stream=4 AND kind='agent.started'")
    assert starts[0][0] == 5
    cloud.send_signal(signal.SIGTERM)
    assert cloud.wait(15) == 0
