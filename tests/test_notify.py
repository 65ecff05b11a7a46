"""sd_notify against a real AF_UNIX datagram socket: the protocol, a real `agent run` process
under a pretend systemd, and the watchdog withheld while the log writer is stuck."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.log import EventLog
from agent.notify import Notifier
from agent.runtime import Agent
from tests.conftest import eventually, wait_until


class NotifySocket:
    """What systemd listens on: a datagram socket; every message received is kept."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"edge-agent-test-{os.getpid()}-{id(self)}"
            self.sock.bind("\0" + name)
            self.env = "@" + name
        else:
            # sun_path holds 108 bytes: pytest's tmp paths can be longer.
            self._dir = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
            self.env = f"{self._dir}/notify"
            self.sock.bind(self.env)
        self.sock.settimeout(0.1)
        self.messages: list[dict[str, str]] = []
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines())
            with self._lock:
                self.messages.append(fields | {"_at": repr(time.monotonic())})

    def having(self, key: str) -> list[dict[str, str]]:
        with self._lock:
            return [m for m in self.messages if key in m]

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        if not self.env.startswith("@"):
            Path(self.env).unlink(missing_ok=True)
            os.rmdir(self._dir)


@pytest.fixture(params=[False, True], ids=["path", "abstract"])
def notify_socket(request: pytest.FixtureRequest) -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=request.param)
    yield s
    s.close()


def test_messages_arrive_as_one_datagram_each(notify_socket: NotifySocket) -> None:
    notifier = Notifier(notify_socket.env, watchdog_usec=30_000_000)
    assert notifier.enabled and notifier.watchdog_interval == 15.0
    assert notifier.ready("ok · 3.0 readings/s\nsecond line")
    assert notifier.watchdog()
    assert notifier.reloading()
    assert notifier.stopping()
    wait_until(lambda: len(notify_socket.messages) == 4, 5, "4 datagrams")
    ready, ping, reloading, stopping = notify_socket.messages
    assert ready["READY"] == "1" and ready["STATUS"] == "ok · 3.0 readings/s second line"
    assert ping["WATCHDOG"] == "1"
    assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
    assert stopping["STOPPING"] == "1"


def test_without_a_socket_nothing_is_sent_and_nothing_fails(tmp_path: Path) -> None:
    assert not Notifier(None).enabled
    assert Notifier(None).ready("x") is False
    gone = Notifier(str(tmp_path / "nobody-listens"))
    assert gone.enabled and gone.watchdog() is False  # logged once, never raised


def test_watchdog_env_is_for_this_process_only(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "@x")
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier.from_env().watchdog_interval is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env(unset=True)
    assert notifier.watchdog_interval == 2.0
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ


def _agent_events(db: Path) -> list[str]:
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return [k for (k,) in conn.execute("SELECT kind FROM events WHERE stream=4 ORDER BY seq")]
    except sqlite3.OperationalError:
        return []
    finally:
        conn.close()


@pytest.fixture
def abstract_socket() -> Iterator[NotifySocket]:
    s = NotifySocket(abstract=True)
    yield s
    s.close()


def test_a_real_agent_process_speaks_sd_notify(
    tmp_path: Path, abstract_socket: NotifySocket
) -> None:
    notify_socket = abstract_socket
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{name: notify-test, data_dir: {tmp_path / "data"}, status_interval: 100ms}}
inputs:
  - {{type: simulated, name: sim, rate: 200, sensors: [{{name: t1}}]}}
""")
    env = os.environ | {"NOTIFY_SOCKET": notify_socket.env, "WATCHDOG_USEC": "400000"}
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "agent", "run", str(config)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: bool(notify_socket.having("READY")), 20, "READY=1")
        # READY only once the pipeline runs: the start is already committed to the log.
        assert "agent.started" in _agent_events(tmp_path / "data" / "events.db")
        ready = notify_socket.having("READY")[0]
        assert ready["STATUS"].startswith(("ok", "degraded"))
        # Every 200 ms (half of WATCHDOG_USEC) while the pipeline moves.
        wait_until(lambda: len(notify_socket.having("WATCHDOG")) >= 5, 10, "5 watchdog pings")
        assert any("readings/s" in m.get("STATUS", "") for m in notify_socket.messages)
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    stopping = notify_socket.having("STOPPING")
    assert len(stopping) == 1 and stopping[0]["STATUS"].startswith("stopping")
    assert len(notify_socket.having("READY")) == 1
    pings = [float(m["_at"]) for m in notify_socket.having("WATCHDOG")]
    gaps = sorted(b - a for a, b in itertools.pairwise(pings))
    assert gaps[len(gaps) // 2] < 0.4, "pinged well within WATCHDOG_USEC"


async def test_watchdog_is_withheld_while_the_log_writer_is_stuck(tmp_path: Path) -> None:
    notify = NotifySocket()
    cfg = AgentConfig.model_validate(
        {
            "agent": {"data_dir": str(tmp_path / "data"), "status_interval": 0.1},
            "log": {"commit_interval": 0.01},
            "inputs": [
                {"type": "simulated", "name": "sim", "rate": 200, "sensors": [{"name": "t"}]}
            ],
            "health": {"stall_after": 0.5},
        }
    )
    agent = Agent(cfg, Notifier(notify.env, watchdog_usec=200_000))
    ready = asyncio.Event()
    task = asyncio.create_task(agent.run(ready))
    release = asyncio.Event()
    try:
        await asyncio.wait_for(ready.wait(), 10)
        event_log = agent.log
        assert event_log is not None
        await eventually(lambda: len(notify.having("WATCHDOG")) >= 3, what="pings")

        async def stuck(batch: list[Any]) -> None:
            # An SD card that stopped answering: the commit neither returns nor fails.
            await release.wait()
            await EventLog._commit(event_log, batch)

        event_log._commit = stuck  # type: ignore[method-assign]
        await eventually(lambda: bool(agent.monitor.stalled), what="the stall to be seen")
        assert "log writer has work and made no progress" in agent.monitor.stalled[0]
        health = agent.monitor.health()
        assert not health.ok and any("log writer" in r for r in health.reasons)
        withheld = len(notify.having("WATCHDOG"))
        await asyncio.sleep(0.6)  # three watchdog intervals: nothing may arrive
        assert len(notify.having("WATCHDOG")) == withheld
        assert any("log writer" in m.get("STATUS", "") for m in notify.messages)

        del event_log._commit
        release.set()
        await eventually(lambda: len(notify.having("WATCHDOG")) > withheld, what="pings again")
        assert agent.monitor.health().ok
    finally:
        release.set()
        agent.stop()
        await asyncio.wait_for(task, 15)
        notify.close()
