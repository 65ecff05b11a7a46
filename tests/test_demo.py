"""`edge-sim demo` end to end: three real child processes, a short run, a clean stop."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from simulator.cloud import CloudStore
from tests.conftest import free_port, wait_until

REPO = Path(__file__).resolve().parent.parent
DEMO_CONFIG = REPO / "config" / "demo.yaml"
DEADLINE = 40.0  # the whole demo run: startup + --duration + ordered shutdown
SUMMARY = re.compile(
    r"demo summary \(this run\): (?P<committed>\d+) readings committed, "
    r"(?P<delivered>\d+) events delivered to the cloud \((?P<readings>\d+) readings\), "
    r"(?P<duplicates>\d+) duplicates, "
)
CHILD = re.compile(r"^(cloud|serial|agent):.*?pid (\d+)", re.MULTILINE)


def demo_config(tmp_path: Path, port: int) -> Path:
    """The shipped demo config, with its state, pty link and cloud port moved into tmp_path."""
    doc = yaml.safe_load(DEMO_CONFIG.read_text())
    data_dir = tmp_path / "demo"
    doc["agent"]["data_dir"] = str(data_dir)
    doc["inputs"][0]["port"] = str(data_dir / "ttySIM0")
    doc["upstreams"][0]["url"] = f"http://127.0.0.1:{port}/ingest"
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is gone for our purposes: only its parent (the demo, now exited) could reap it.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def run_demo(*args: str, timeout: float = DEADLINE) -> subprocess.CompletedProcess[str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "demo", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # Stop it (and so its children) before failing, so the test leaves nothing running.
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        pytest.fail(f"the demo did not finish within {timeout}s\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_demo_runs_delivers_and_stops_cleanly(tmp_path: Path) -> None:
    port = free_port()
    config = demo_config(tmp_path, port)
    data_dir = tmp_path / "demo"

    done = run_demo("--config", str(config), "--rate", "50", "--duration", "6")

    report = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    summary = SUMMARY.search(done.stdout)
    assert summary is not None, report
    assert int(summary["committed"]) > 0, report
    assert int(summary["delivered"]) > 0, report
    assert int(summary["readings"]) > 0, report
    # Not a TTY: plain status lines instead of the live view.
    assert re.search(r"^\[0:00:0\d\] readings \d+", done.stdout, re.MULTILINE), report

    # Every child was started, and none is left running once the demo has exited.
    pids = {name: int(pid) for name, pid in CHILD.findall(done.stderr)}
    assert set(pids) == {"cloud", "serial", "agent"}, report
    wait_until(
        lambda: not any(alive(pid) for pid in pids.values()),
        timeout=5,
        what=f"children {pids} to be gone",
    )
    assert not (data_dir / "ttySIM0").is_symlink(), "the simulator's pty link was left behind"
    for name in ("agent", "cloud", "serial"):
        assert (data_dir / f"{name}.log").exists()

    # The cloud holds the agent's readings under the agent's own event ids.
    log_id = _agent_log_id(data_dir / "events.db")
    with CloudStore(data_dir / "cloud.db") as store:
        ids = store.event_ids("readings")
        assert len(ids) == int(summary["readings"])
        assert ids and all(i.startswith(f"{log_id}:readings:") for i in ids)
        seqs = sorted(int(i.rsplit(":", 1)[1]) for i in ids)
        assert seqs == list(range(1, len(seqs) + 1))  # in order, none missing
        assert store.count() == int(summary["delivered"])
        assert store.duplicates() == int(summary["duplicates"])


def test_demo_refuses_a_port_in_use(tmp_path: Path) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = demo_config(tmp_path, port)
        done = run_demo("--config", str(config), "--duration", "5", timeout=20)
    assert done.returncode == 1
    assert f"port {port} on 127.0.0.1 is already in use" in done.stderr
    assert "cloud:" not in done.stderr  # nothing was started


def _agent_log_id(path: Path) -> str:
    import sqlite3

    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return str(conn.execute("SELECT value FROM meta WHERE key='log_id'").fetchone()[0])
    finally:
        conn.close()
