"""The command line against a real agent process: run, SIGTERM, status, tail."""

from __future__ import annotations

import json
import logging
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.events import Rejected
from agent.runtime import _RateLimitedLog
from tests.conftest import free_port, wait_until


def edge_agent(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent", *args], capture_output=True, text=True, timeout=60
    )


def readings_in(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM events WHERE stream=1").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def test_run_sigterm_status_and_tail(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{name: cli-test, data_dir: {tmp_path / "data"}, status_interval: 200ms}}
inputs:
  - {{type: simulated, name: sim, rate: 0, count: 250, sensors: [{{name: t1, unit: C}}]}}
upstreams:
  - {{type: http, name: nowhere, url: "http://127.0.0.1:{free_port()}/ingest", backoff_initial: 50ms}}
""")
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(config)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    db = tmp_path / "data" / "events.db"
    try:
        wait_until(lambda: readings_in(db) == 250, 30, "250 readings")
        status_file = tmp_path / "data" / "status.json"
        wait_until(
            lambda: status_file.exists() and "Connect" in status_file.read_text(),
            30,
            "the upstream error in status",
        )
        live = json.loads(edge_agent("status", str(config), "--json").stdout)
        assert live["running"] is True
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "Traceback" not in err

    info = json.loads(edge_agent("status", str(config), "--json").stdout)
    assert info["running"] is False
    assert info["streams"]["readings"] == {"head": 250, "oldest": 1, "count": 250}
    lag = {(c["consumer"], c["stream"]): c["lag"] for c in info["consumers"]}
    assert lag[("upstream:nowhere", "readings")] == 250
    upstream = info["agent"]["upstreams"]["nowhere"]
    assert upstream["sent"] == 0 and upstream["failures"] >= 1 and upstream["last_error"]
    assert info["agent"]["inputs"]["sim"]["readings"] == 250

    table = edge_agent("status", str(config))
    assert (
        table.returncode == 0 and "upstream:nowhere" in table.stdout and "Streams" in table.stdout
    )

    tail = edge_agent("tail", str(config), "--stream", "readings", "-n", "3", "--no-follow")
    events = [json.loads(line) for line in tail.stdout.splitlines()]
    log_id = info["log"]["log_id"]
    assert [e["id"] for e in events] == [f"{log_id}:readings:{i}" for i in (248, 249, 250)]
    assert all(e["sensor"] == "t1" and e["unit"] == "C" for e in events)


def test_status_without_a_log_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "a.yaml"
    config.write_text(f"agent: {{data_dir: {tmp_path / 'none'}}}\n")
    proc = edge_agent("status", str(config))
    assert proc.returncode == 1 and "no log at" in proc.stderr and "Traceback" not in proc.stderr


def test_run_with_a_bad_config_exits_1_without_traceback(tmp_path: Path) -> None:
    config = tmp_path / "a.yaml"
    config.write_text("inputs:\n  - type: serial\n    name: x\n")
    proc = edge_agent("run", str(config))
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"{config}:2:5: inputs[0].port: required field is missing"


def test_bad_input_is_logged_once_per_kind_per_period(caplog: pytest.LogCaptureFixture) -> None:
    limiter = _RateLimitedLog(period=60.0)
    now = time.monotonic()
    with caplog.at_level(logging.WARNING):
        for reason in ["nan", "nan", "invalid_json", "nan", "invalid_json"]:
            limiter(Rejected(b"x", reason, "d", "board", time.time(), now))
    assert [r.getMessage().split("(")[1].split(")")[0] for r in caplog.records] == [
        "nan",
        "invalid_json",
    ]
