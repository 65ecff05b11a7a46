"""The whole pipeline in one process with real parts: a pty serial port, the log, the
processor, and the simulator's HTTP ingestion endpoint."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
import tty
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.config import AgentConfig
from agent.events import Stream
from agent.runtime import Agent
from simulator.cloud import CloudServer, CloudStore
from tests.conftest import eventually


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[CloudServer]:
    server = CloudServer(tmp_path / "cloud.db", token="tok")
    await server.start()
    yield server
    await server.stop()


@pytest.fixture
def pty_pair() -> tuple[int, str]:
    master, slave = os.openpty()
    tty.setraw(slave)
    path = os.ttyname(slave)
    yield master, path  # type: ignore[misc]
    os.close(master)
    os.close(slave)


def agent_config(
    tmp_path: Path, url: str, inputs: list[dict[str, Any]], **over: Any
) -> AgentConfig:
    doc: dict[str, Any] = {
        "agent": {"name": "test-pi", "data_dir": str(tmp_path / "data"), "status_interval": 0.2},
        "log": {"commit_interval": 0.02},
        "inputs": inputs,
        "processing": {
            "windows": [{"name": "w", "size": 0.5}],
            "rules": [
                {"name": "hot", "window": "w", "sensors": "temp*", "above": 30, "clear_below": 28}
            ],
        },
        "upstreams": [
            {
                "type": "http",
                "name": "cloud",
                "url": url,
                "token": "tok",
                "linger": 0.05,
                "backoff_initial": 0.05,
                "backoff_max": 0.2,
                "batch_size": 100,
            }
        ],
    }
    doc.update(over)
    return AgentConfig.model_validate(doc)


async def start(agent: Agent) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(agent.run(ready))
    await asyncio.wait_for(ready.wait(), 10)
    return task


async def stop(agent: Agent, task: asyncio.Task[None]) -> None:
    agent.stop()
    await asyncio.wait_for(task, 15)


def log_rows(path: Path, stream: int) -> list[tuple[Any, ...]]:
    db = sqlite3.connect(path)
    try:
        return db.execute(
            "SELECT seq, kind, sensor, value, data, raw FROM events WHERE stream=? ORDER BY seq",
            (stream,),
        ).fetchall()
    finally:
        db.close()


async def test_serial_to_cloud_with_bad_input_aggregates_and_alerts(
    tmp_path: Path, cloud: CloudServer, pty_pair: tuple[int, str]
) -> None:
    master, port = pty_pair
    cfg = agent_config(
        tmp_path,
        cloud.url + "/ingest",
        [{"type": "serial", "name": "board", "port": port, "max_line": 64}],
    )
    agent = Agent(cfg)
    task = await start(agent)
    try:
        await eventually(lambda: agent.inputs["board"].connected, what="the port to open")
        lines = [b'{"sensor":"temp1","value":%d,"unit":"C"}\n' % v for v in (20, 35, 36)]
        lines += [
            b"#$%^garbage\n",
            b'{"sensor":"temp1","value":NaN}\n',
            b"\xff\xfe\n",
            b"x" * 100 + b"\n",
        ]
        os.write(master, b"".join(lines))
        await eventually(lambda: agent.inputs["board"].readings == 3, what="3 readings")
        # The window closes on time (no more readings), the mean 30.33 > 30 raises an alert.
        store = CloudStore(tmp_path / "cloud.db")
        await eventually(
            lambda: store.count("alerts") >= 1, within=15, what="an alert at the cloud"
        )
        await eventually(lambda: store.count("readings") == 3, what="3 readings at the cloud")
        await eventually(lambda: store.count("deadletter") == 4, what="deadletter at the cloud")
        await eventually(
            lambda: sum(a["data"]["count"] for a in store.events("aggregates")) == 3,
            what="aggregates covering the 3 readings",
        )
    finally:
        await stop(agent, task)
    log_id = agent.log.log_id if agent.log else ""
    assert store.event_ids("readings") == {f"{log_id}:readings:{i}" for i in (1, 2, 3)}
    dead = log_rows(cfg.log_path, 5)
    reasons = sorted(__import__("json").loads(r[4])["reason"] for r in dead)
    assert reasons == ["invalid_json", "invalid_utf8", "nan", "oversized"]
    assert {bytes(r[5]) for r in dead} >= {b"#$%^garbage", b"\xff\xfe"}
    assert agent.inputs["board"].rejected == {
        "invalid_json": 1,
        "nan": 1,
        "invalid_utf8": 1,
        "oversized": 1,
    }
    (alert,) = store.events("alerts")
    assert alert["kind"] == "alert.raised" and alert["sensor"] == "temp1"
    assert alert["data"]["alert_id"] == "hot:temp1:1"
    aggs = store.events("aggregates")
    # However the readings fell into windows, the windows account for each exactly once.
    assert sum(a["data"]["count"] for a in aggs) == 3
    assert abs(sum(a["value"] * a["data"]["count"] for a in aggs) - 91) < 1e-9
    store.close()


async def test_cursor_moves_only_after_the_upstream_acknowledged(
    tmp_path: Path, cloud: CloudServer
) -> None:
    cloud.set_faults(down=True)
    cfg = agent_config(
        tmp_path,
        cloud.url + "/ingest",
        [
            {
                "type": "simulated",
                "name": "sim",
                "rate": 200,
                "sensors": [{"name": "hum1"}],
                "count": 300,
            }
        ],
        processing={},
    )
    agent = Agent(cfg)
    task = await start(agent)
    try:
        assert agent.log is not None
        log = agent.log
        await eventually(lambda: log.head(Stream.READINGS) == 300, what="300 readings in the log")
        await eventually(lambda: agent.upstreams[0].status.failures >= 3, what="failed attempts")
        assert log.cursor("upstream:cloud", Stream.READINGS) == 0
        assert "503" in (agent.upstreams[0].status.last_error or "")
        cloud.set_faults(down=False)
        await eventually(
            lambda: log.cursor("upstream:cloud", Stream.READINGS) == 300, what="delivery"
        )
    finally:
        await stop(agent, task)
    store = CloudStore(tmp_path / "cloud.db")
    assert store.count("readings") == 300
    store.close()


async def test_alerts_go_before_the_backlog(tmp_path: Path, cloud: CloudServer) -> None:
    cloud.set_faults(down=True)
    cfg = agent_config(
        tmp_path,
        cloud.url + "/ingest",
        [
            {
                "type": "simulated",
                "name": "sim",
                "rate": 0,
                "count": 2000,
                "seed": 1,
                "sensors": [{"name": "temp1", "base": 40, "amplitude": 0, "noise": 0}],
            }
        ],
    )
    # Without the agent lane, the batch that fails during the outage is a backlog batch.
    cfg = cfg.model_copy(
        update={
            "upstreams": [cfg.upstreams[0].model_copy(update={"streams": ["alerts", "readings"]})]
        }
    )
    agent = Agent(cfg)
    task = await start(agent)
    try:
        assert agent.log is not None
        log = agent.log
        await eventually(lambda: log.head(Stream.READINGS) == 2000, what="the backlog")
        await eventually(lambda: log.head(Stream.ALERTS) >= 1, within=15, what="an alert")
        cloud.set_faults(down=False)
        await eventually(
            lambda: log.cursor("upstream:cloud", Stream.READINGS) == 2000,
            within=20,
            what="the backlog delivered",
        )
    finally:
        await stop(agent, task)
    store = CloudStore(tmp_path / "cloud.db")
    order = [e["stream"] for e in store.events()]
    store.close()
    assert order.index("alerts") < order.index("readings"), "alerts must overtake the backlog"
    assert order.count("readings") == 2000


async def test_shutdown_drains_commits_and_resumes(tmp_path: Path, cloud: CloudServer) -> None:
    inputs = [
        {
            "type": "simulated",
            "name": "sim",
            "rate": 500,
            "sensors": [{"name": "t1"}, {"name": "t2"}],
        }
    ]
    cfg = agent_config(tmp_path, cloud.url + "/ingest", inputs)
    agent = Agent(cfg)
    task = await start(agent)
    await eventually(lambda: agent.inputs["sim"].readings > 200, what="readings")
    t0 = time.monotonic()
    await stop(agent, task)
    assert time.monotonic() - t0 < cfg.agent.shutdown_timeout
    read = agent.inputs["sim"].readings
    rows = log_rows(cfg.log_path, 1)
    assert len(rows) == read, "every reading read before SIGTERM is in the log"
    assert [r[0] for r in rows] == list(range(1, read + 1))
    # A second run continues the seqs and the cursors where the first left them.
    agent2 = Agent(cfg)
    task2 = await start(agent2)
    try:
        assert agent2.log is not None
        log2 = agent2.log
        assert log2.head(Stream.READINGS) >= read
        await eventually(
            lambda: log2.cursor("upstream:cloud", Stream.READINGS) > read, what="resume"
        )
    finally:
        await stop(agent2, task2)
    store = CloudStore(tmp_path / "cloud.db")
    ids = store.event_ids("readings")
    store.close()
    log_id = log2.log_id
    assert {f"{log_id}:readings:{i}" for i in range(1, read + 1)} <= ids


async def test_mqtt_input_through_the_runtime(
    tmp_path: Path, cloud: CloudServer, broker: Any
) -> None:
    from tests.test_driver_mqtt import publish

    inputs = [
        {
            "type": "mqtt",
            "name": "lan",
            "url": broker.url,
            "client_id": "runtime-test",
            "topics": ["rt/#"],
            "topic_template": "rt/{sensor}",
            "format": "number",
        }
    ]
    cfg = agent_config(tmp_path, cloud.url + "/ingest", inputs, processing={})
    agent = Agent(cfg)
    task = await start(agent)
    try:
        await eventually(lambda: agent.inputs["lan"].connected, what="the broker connection")
        publish(
            broker, [(f"rt/s{i % 3}", str(i).encode()) for i in range(200)] + [("rt/x", b"hot")]
        )
        assert agent.log is not None
        log = agent.log
        await eventually(lambda: log.head(Stream.READINGS) == 200, what="200 readings")
        await eventually(
            lambda: log.cursor("upstream:cloud", Stream.READINGS) == 200, what="delivery"
        )
    finally:
        await stop(agent, task)
    values = sorted(r[3] for r in log_rows(cfg.log_path, 1))
    assert values == [float(i) for i in range(200)]
    assert agent.inputs["lan"].rejected == {"not_a_number": 1}


async def test_unplugged_port_records_a_gap_and_resumes(tmp_path: Path, cloud: CloudServer) -> None:
    link = tmp_path / "ttyUSB-by-id"
    master, slave = os.openpty()
    tty.setraw(slave)
    link.symlink_to(os.ttyname(slave))
    cfg = agent_config(
        tmp_path,
        cloud.url + "/ingest",
        [
            {
                "type": "serial",
                "name": "board",
                "port": str(link),
                "reconnect_initial": 0.05,
                "reconnect_max": 0.2,
            }
        ],
        processing={},
    )
    agent = Agent(cfg)
    task = await start(agent)
    master2 = slave2 = -1
    try:
        await eventually(lambda: agent.inputs["board"].connected, what="the port to open")
        os.write(master, b'{"sensor":"t1","value":1}\n')
        await eventually(lambda: agent.inputs["board"].readings == 1, what="the first reading")
        # Unplug: the device node goes away and its link with it.
        link.unlink()
        os.close(master)
        os.close(slave)
        await eventually(lambda: not agent.inputs["board"].connected, what="the loss to be noticed")
        # Plug back in: a new device node behind the same by-id name.
        master2, slave2 = os.openpty()
        tty.setraw(slave2)
        link.symlink_to(os.ttyname(slave2))
        await eventually(lambda: agent.inputs["board"].connected, what="the reconnect")
        os.write(master2, b'{"sensor":"t1","value":2}\n')
        await eventually(lambda: agent.inputs["board"].readings == 2, what="a reading after replug")
        assert agent.log is not None
        log = agent.log
        await eventually(
            lambda: log.cursor("upstream:cloud", Stream.AGENT) >= 3, what="agent events sent"
        )
    finally:
        await stop(agent, task)
        for fd in (master2, slave2):
            if fd >= 0:
                os.close(fd)
    kinds = [(r[1], __import__("json").loads(r[4])) for r in log_rows(cfg.log_path, 4)]
    assert [k for k, _ in kinds] == ["agent.started", "input.disconnected", "gap"]
    gap = kinds[2][1]
    assert gap["input"] == "board" and gap["reason"] == "disconnected"
    assert gap["from"] < gap["to"]
    with CloudStore(tmp_path / "cloud.db") as store:
        assert [e["kind"] for e in store.events("agent")] == [
            "agent.started",
            "input.disconnected",
            "gap",
        ]
