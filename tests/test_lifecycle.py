"""The agent's life under systemd, with real processes: SIGTERM against a stuck upstream,
SIGHUP reloads (refused and applied), and a corrupt log at start."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.status import read_live
from simulator.cloud import CloudStore
from tests.conftest import free_port, wait_until


class Agent:
    """`python -m agent run CONFIG` in the background, its stderr kept for assertions."""

    def __init__(self, config: Path, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.stderr_path = config.with_suffix(".stderr")
        with self.stderr_path.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent", "run", str(config)],
                stdout=subprocess.DEVNULL,
                stderr=err,
                env=os.environ | (env or {}),
            )

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)


def agent_events(db: Path) -> list[tuple[str, dict[str, Any]]]:
    if not db.exists():
        return []
    try:
        # The agent may move the file aside between the check above and this open.
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return []
    try:
        rows = conn.execute("SELECT kind, data FROM events WHERE stream=4 ORDER BY seq").fetchall()
    except sqlite3.DatabaseError:  # not created yet, or the garbage before recovery
        return []
    finally:
        conn.close()
    return [(kind, json.loads(data) if data else {}) for kind, data in rows]


def count(db: Path, stream: int) -> int:
    if not db.exists():
        return 0
    try:
        # The agent may move the file aside between the check above and this open.
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    except sqlite3.OperationalError:
        return 0
    try:
        return int(
            conn.execute("SELECT count(*) FROM events WHERE stream=?", (stream,)).fetchone()[0]
        )
    except sqlite3.DatabaseError:  # not created yet, or the garbage before recovery
        return 0
    finally:
        conn.close()


@pytest.fixture
def black_hole() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung upstream."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    done = threading.Event()

    def accept() -> None:
        server.settimeout(0.1)
        while not done.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            held.append(conn)

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    done.set()
    thread.join(2)
    for conn in held:
        conn.close()
    server.close()


def test_sigterm_exits_0_in_time_with_a_stuck_upstream(tmp_path: Path, black_hole: int) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{name: stuck, data_dir: {tmp_path / "data"}, shutdown_timeout: 2s, status_interval: 100ms}}
inputs:
  - {{type: simulated, name: sim, rate: 500, sensors: [{{name: t1}}]}}
upstreams:
  - {{type: http, name: hung, url: "http://127.0.0.1:{black_hole}/ingest", timeout: 60s}}
""")
    agent = Agent(config)
    db = tmp_path / "data" / "events.db"
    try:
        wait_until(lambda: count(db, 1) > 200, 20, "readings")
        # The first batch is out and its request hangs: nothing acknowledged, nothing failed.
        time.sleep(0.5)
        live = read_live(tmp_path / "data")
        assert live["upstreams"]["hung"]["sent"] == 0
        assert live["upstreams"]["hung"]["failures"] == 0
        t0 = time.monotonic()
        agent.signal(signal.SIGTERM)
        code = agent.proc.wait(10)
        took = time.monotonic() - t0
    finally:
        agent.stop()
    assert code == 0, agent.stderr
    assert took < 2 + 1.5, f"shutdown took {took:.1f}s with shutdown_timeout 2s"
    assert "Traceback" not in agent.stderr
    live = read_live(tmp_path / "data")
    assert live["inputs"]["sim"]["readings"] == count(db, 1), "all that was read is in the log"


@pytest.fixture
def cloud(tmp_path: Path) -> Iterator[str]:
    """The simulator's ingestion endpoint as its own process; yields its base url."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "cloud",
            "--port",
            "0",
            "--db",
            str(tmp_path / "c.db"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    assert line.startswith("LISTENING"), line
    yield line.removeprefix("LISTENING").strip()
    proc.terminate()
    proc.wait(15)


def test_sighup_refuses_an_invalid_config_and_applies_a_valid_one(
    tmp_path: Path, cloud: str
) -> None:
    from tests.test_notify import NotifySocket

    data = tmp_path / "data"
    config = tmp_path / "agent.yaml"
    first = f"""
agent: {{name: hup, data_dir: {data}, status_interval: 100ms}}
log: {{commit_interval: 20ms}}
inputs:
  - {{type: simulated, name: a, rate: 200, seed: 1, sensors: [{{name: temp1, base: 40, amplitude: 0}}]}}
upstreams:
  - {{type: http, name: cloud, url: "http://127.0.0.1:{free_port()}/ingest", backoff_max: 200ms}}
"""
    config.write_text(first)
    notify = NotifySocket(abstract=True)
    agent = Agent(config, env={"NOTIFY_SOCKET": notify.env})
    db = data / "events.db"
    try:
        wait_until(lambda: bool(notify.having("READY")), 20, "READY=1")
        # 1. Invalid: every problem is logged with its position, the agent goes on as it was.
        config.write_text(
            first.replace("rate: 200", "rate: fast").replace("log: {", "log: {x: 1, ")
        )
        agent.signal(signal.SIGHUP)
        wait_until(lambda: "reload refused" in agent.stderr, 10, "the refusal")
        errors = [line for line in agent.stderr.splitlines() if "reload: " in line]
        assert any(f"reload: {config}:3:" in e and "log.x: unknown key" in e for e in errors)
        assert any(f"reload: {config}:5:" in e and "inputs[0].rate" in e for e in errors)
        before = count(db, 1)
        wait_until(lambda: count(db, 1) > before + 50, 10, "readings to go on")
        assert agent.proc.poll() is None
        assert len(notify.having("RELOADING")) == 1 and len(notify.having("READY")) == 2
        # 2. Valid: a rule, a changed and a new input, the upstream pointed at the cloud, and
        # a new quota (that one needs a restart).
        read_before = read_live(data)["inputs"]["a"]["readings"]
        config.write_text(f"""
agent: {{name: hup, data_dir: {data}, status_interval: 100ms}}
log: {{commit_interval: 20ms, quota: 64MiB}}
inputs:
  - {{type: simulated, name: a, rate: 300, seed: 1, sensors: [{{name: temp1, base: 40, amplitude: 0}}]}}
  - {{type: simulated, name: b, rate: 100, sensors: [{{name: hum1}}]}}
processing:
  windows: [{{name: w, size: 200ms}}]
  rules: [{{name: hot, window: w, sensors: "temp*", above: 30, clear_below: 28}}]
upstreams:
  - {{type: http, name: cloud, url: "{cloud}/ingest", backoff_max: 200ms}}
""")
        agent.signal(signal.SIGHUP)
        wait_until(lambda: "reloaded: " in agent.stderr, 10, "the reload")
        assert "processing" in agent.stderr and "input b started" in agent.stderr
        assert "input a restarted" in agent.stderr
        assert "upstream:cloud restarted" in agent.stderr
        assert "log.quota changed; running on the old value until a restart" in agent.stderr
        wait_until(lambda: count(db, 3) >= 1, 15, "an alert from the new rule")
        with CloudStore(tmp_path / "c.db") as store:
            wait_until(lambda: store.count("readings") > 100, 15, "delivery to the new url")
        live = read_live(data)
        assert set(live["inputs"]) == {"a", "b"} and live["inputs"]["b"]["readings"] > 0
        assert live["inputs"]["a"]["readings"] > read_before, "a restarted input keeps counting"
        assert len(notify.having("READY")) == 3
        assert agent.proc.poll() is None
    finally:
        code = agent.stop()
        notify.close()
    assert code == 0, agent.stderr
    assert "Traceback" not in agent.stderr


# --------------------------------------------------------------------------- a corrupt log


def test_a_garbage_log_is_moved_aside_and_a_fresh_one_started(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    garbage = b"this is not a database, it is what a dying SD card returns\n" * 200
    (data / "events.db").write_bytes(garbage)
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{name: corrupt, data_dir: {data}}}
inputs:
  - {{type: simulated, name: sim, rate: 200, sensors: [{{name: t1}}]}}
""")
    agent = Agent(config)
    db = data / "events.db"
    try:
        wait_until(lambda: count(db, 1) > 10, 20, "readings in a fresh log")
    finally:
        code = agent.stop()
    assert code == 0, agent.stderr
    (moved,) = data.glob("events.db.corrupt-*")
    assert moved.read_bytes() == garbage
    kinds = agent_events(db)
    assert [k for k, _ in kinds[:2]] == ["agent.started", "log.recovered"]
    assert kinds[1][1]["moved_to"] == str(moved)
    assert "file is not a database" in kinds[1][1]["reason"]
    assert f"moved it to {moved} and started a new log" in agent.stderr
    assert "Traceback" not in agent.stderr


# --------------------------------------------------------------------------- reload planning


def test_a_reload_plan_applies_what_it_can_and_keeps_the_rest() -> None:
    from agent.config import AgentConfig
    from agent.reload import plan_reload

    sim = {"type": "simulated", "name": "a", "rate": 1, "sensors": [{"name": "t"}]}
    http = {"type": "http", "name": "c", "url": "http://x/i"}
    old = AgentConfig.model_validate(
        {"agent": {"name": "one", "data_dir": "/d1"}, "inputs": [sim], "upstreams": [http]}
    )
    new = AgentConfig.model_validate(
        {
            "agent": {"name": "two", "data_dir": "/d2", "log_level": "debug"},
            "log": {"quota": "1MiB", "max_age": "1d"},
            "inputs": [sim, sim | {"name": "b"}],
            "upstreams": [http | {"url": "http://y/i"}],
            "health": {"listen": "127.0.0.1:9108", "stall_after": "2m"},
        }
    )
    plan = plan_reload(old, new)
    assert plan.restart_needed == [
        "agent.name",
        "agent.data_dir",
        "log.quota",
        "log.max_age",
        "health.listen",
    ]
    assert plan.cfg.agent.name == "one" and str(plan.cfg.agent.data_dir) == "/d1"
    assert plan.cfg.agent.log_level == "debug", "applied live"
    assert plan.cfg.log == old.log and plan.cfg.health.listen is None
    assert plan.cfg.health.stall_after == 120.0
    assert (plan.stop_inputs, plan.start_inputs) == ([], ["b"])
    assert (plan.stop_consumers, plan.start_upstreams) == (["upstream:c"], ["c"])
    assert not plan.processing
    assert plan.changes == ["input b started", "upstream:c restarted"]
    assert plan_reload(old, old).changes == [] and plan_reload(old, old).restart_needed == []
