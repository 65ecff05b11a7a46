"""The MQTT input when something dies: the agent (SIGKILL), the broker (restart), the network.

A publisher sends the values 0..N-1 at QoS 1 while the agent, a real process, is SIGKILLed and
restarted, or while the broker is stopped and started again. Afterwards every value the broker
acknowledged to the publisher is in the log. MQTT gives a message no stable identity, so a
message committed just before a kill, and not yet acknowledged, is delivered again (with the
DUP flag) and logged twice: duplicates are allowed, one extra copy at most, as many as were
committed and not yet acknowledged when the agent died (the driver counts DUP deliveries).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import AgentConfig
from agent.runtime import Agent
from drivers.mqtt import MqttDriver
from tests.conftest import Broker, eventually, wait_until

_ids = itertools.count()
#: A kill at a random instant of a live flow catches the messages of the commit or two whose
#: PUBACKs are not out yet: a handful at the publisher's rate here, this much on a slow machine.
PER_KILL = 50


class Publisher:
    """Publishes 0..n-1 at QoS 1, paced, from its own thread, riding out broker restarts.

    paho keeps what it could not send, and what was sent but not acknowledged, and sends it
    again after reconnecting; `acked()` is what the broker has PUBACKed so far.
    """

    def __init__(self, broker: Broker, prefix: str, n: int, rate: float) -> None:
        self.n = n
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=f"pub-{prefix}-{next(_ids)}", clean_session=False
        )
        self.client.max_inflight_messages_set(100)
        self.client.reconnect_delay_set(0.05, 0.2)  # type: ignore[arg-type]
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        self.mids: dict[int, int] = {}  # packet id -> value (n < 65535: ids are not reused)
        self._pubacked: set[int] = set()
        self._prefix, self._pause = prefix, 1.0 / rate
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _on_publish(self, client: mqtt.Client, userdata: object, mid: int, *_: object) -> None:
        self._pubacked.add(mid)  # paho's thread; set.add is atomic

    def _run(self) -> None:
        for i in range(self.n):
            # Published while the broker is down too: paho sends it after reconnecting.
            info = self.client.publish(f"{self._prefix}/s{i % 3}", str(i), qos=1)
            self.mids[info.mid] = i
            time.sleep(self._pause)  # the publisher's pace, not a wait for anything

    def published(self) -> int:
        return len(self.mids)

    def acked(self) -> set[int]:
        return {i for mid, i in list(self.mids.items()) if mid in self._pubacked}

    def done(self) -> bool:
        return not self._thread.is_alive() and len(self.acked()) == self.n

    def stop(self) -> None:
        self._thread.join(30)
        self.client.disconnect()
        self.client.loop_stop()


def open_sockets() -> int:
    """Sockets this process holds (files come and go with SQLite and logs; sockets must not)."""
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def readings(db: Path) -> list[int]:
    """The values in the log's readings stream, read as another process would."""
    if not db.exists():
        return []
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        return [int(v) for (v,) in conn.execute("SELECT value FROM events WHERE stream=1")]
    except sqlite3.OperationalError:  # the agent has not created its tables yet
        return []
    finally:
        conn.close()


def check_duplicates(values: list[int], n: int, bound: int) -> int:
    """Every value is there; copies beyond the first are few (at most `bound`), one each."""
    counts = Counter(values)
    assert set(counts) == set(range(n)), f"missing {sorted(set(range(n)) - set(counts))[:20]}"
    extra = Counter({v: c - 1 for v, c in counts.items() if c > 1})
    assert all(c == 1 for c in extra.values()), f"more than one extra copy: {extra}"
    assert extra.total() <= bound, extra
    return extra.total()


@pytest.fixture
def procs() -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for p in started:
        if p.poll() is None:
            p.kill()
            p.wait(10)


@pytest.mark.timeout(90)
def test_sigkilled_agent_loses_no_mqtt_reading(
    tmp_path: Path,
    broker: Broker,
    procs: list[subprocess.Popen[bytes]],
    request: pytest.FixtureRequest,
) -> None:
    n, kills = 2000, 4
    prefix = f"kill{next(_ids)}-{os.getpid()}"
    data = tmp_path / "data"
    config = tmp_path / "agent.yaml"
    config.write_text(f"""
agent: {{name: kill, data_dir: {data}, status_interval: 100ms}}
log: {{commit_interval: 20ms}}
inputs:
  - {{type: mqtt, name: lan, url: "{broker.url}", client_id: {prefix}-agent, qos: 1,
      topics: ["{prefix}/#"], topic_template: "{prefix}/{{sensor}}", format: number,
      reconnect_initial: 50ms, reconnect_max: 200ms}}
""")
    db, status = data / "events.db", data / "status.json"
    logs = (tmp_path / "agent.log").open("ab")
    request.addfinalizer(logs.close)

    def spawn() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", str(config)], stderr=logs)
        procs.append(proc)
        return proc

    def connected(pid: int) -> bool:
        try:
            doc = json.loads(status.read_text())
            return bool(doc["pid"] == pid and doc["inputs"]["lan"]["connected"])
        except (OSError, ValueError, KeyError):
            return False

    agent = spawn()
    wait_until(lambda: connected(agent.pid), 20, "the first subscription (the session starts)")
    publisher = Publisher(broker, prefix, n, rate=250)
    try:
        for round_ in range(kills):
            if round_:
                agent = spawn()
                wait_until(lambda p=agent.pid: connected(p), 20, "the agent to reconnect")  # type: ignore[misc]
            # Killed in the live flow, once the backlog of the restart is in (the redelivered
            # ones and what was published meanwhile, which come in one burst), at a random
            # instant relative to commits and acknowledgements.
            target = min(publisher.published() + 100, n)
            wait_until(lambda t=target: len(set(readings(db))) >= t, 30, "the live flow")  # type: ignore[misc]
            agent.send_signal(signal.SIGKILL)
            assert agent.wait(10) == -signal.SIGKILL
        agent = spawn()
        wait_until(publisher.done, 30, "the broker to acknowledge every publish")
        wait_until(lambda: set(readings(db)) >= set(range(n)), 30, "every value in the log")
    finally:
        publisher.stop()
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(20) == 0
    extra = check_duplicates(readings(db), n, bound=kills * PER_KILL)
    print(f"\n{n} readings, {kills} kills, {extra} logged twice (redelivered)")


@pytest.mark.timeout(60)
async def test_broker_restarts_lose_no_acknowledged_reading(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    """The broker stops cleanly and starts again on its port, twice, while the publisher goes
    on: the agent reconnects with backoff and resumes its session; one client, no new threads,
    no leaked sockets."""
    broker = make_broker(persistence=True)
    n, prefix = 1500, "restart"
    cfg = AgentConfig.model_validate(
        {
            "agent": {"name": "restart", "data_dir": str(tmp_path / "data"), "status_interval": 1},
            "log": {"commit_interval": 0.02},
            "inputs": [
                {
                    "type": "mqtt",
                    "name": "lan",
                    "url": broker.url,
                    "client_id": "restart-agent",
                    "topics": [f"{prefix}/#"],
                    "topic_template": f"{prefix}/{{sensor}}",
                    "format": "number",
                    "keepalive": 2,
                    "reconnect_initial": 0.05,
                    "reconnect_max": 0.2,
                }
            ],
        }
    )
    agent = Agent(cfg)
    ready = asyncio.Event()
    task = asyncio.create_task(agent.run(ready))
    status = agent.inputs["lan"]
    publisher: Publisher | None = None
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await eventually(lambda: status.connected, what="the first connection")
        assert agent.log is not None
        log = agent.log
        publisher = Publisher(broker, prefix, n, rate=600)
        await eventually(lambda: log.head("readings") >= 100, what="readings to flow")
        threads, sockets = threading.active_count(), open_sockets()
        for _ in range(2):
            before = log.head("readings")
            broker.stop()
            await eventually(lambda: not status.connected, what="the agent to notice")
            await asyncio.to_thread(broker.start)
            await eventually(lambda: status.connected, what="the agent to reconnect")
            await eventually(lambda b=before: log.head("readings") > b + 100, what="more readings")  # type: ignore[misc]
        await eventually(publisher.done, within=30, what="every publish acknowledged")
        acked = publisher.acked()
        # Every distinct value, not a row count: redelivered copies also count as rows.
        await eventually(
            lambda: set(readings(cfg.log_path)) >= set(range(n)),
            within=30,
            what="every value in the log",
        )
        assert threading.active_count() <= threads, threading.enumerate()
        assert open_sockets() <= sockets, "no socket left behind"
    finally:
        if publisher is not None:
            await asyncio.to_thread(publisher.stop)
        agent.stop()
        await asyncio.wait_for(task, 20)
    values = readings(cfg.log_path)
    assert acked == set(range(n))
    driver = agent.drivers[0]
    assert isinstance(driver, MqttDriver)
    # A message committed whose PUBACK the broker never read comes back with the DUP flag.
    extra = check_duplicates(values, n, bound=driver.counters["redelivered"])
    assert driver.counters["sessions_new"] == 1, "the session survived both restarts"
    print(
        f"\n{n} readings, 2 broker restarts, {extra} logged twice, "
        f"{driver.counters['redelivered']} redelivered"
    )
