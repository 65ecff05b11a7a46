"""/healthz and /metrics against a running agent (aiohttp client), the progress judgement
behind the watchdog, and the clock watch."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.clock import ClockWatch, boot_id
from agent.config import AgentConfig
from agent.events import Stream
from agent.health import Progress
from agent.runtime import Agent
from simulator.cloud import CloudServer
from tests.conftest import eventually, free_port


@pytest.fixture
async def cloud(tmp_path: Path) -> AsyncIterator[CloudServer]:
    server = CloudServer(tmp_path / "cloud.db")
    await server.start()
    yield server
    await server.stop()


def config(tmp_path: Path, port: int, **over: Any) -> AgentConfig:
    doc: dict[str, Any] = {
        "agent": {"name": "health", "data_dir": str(tmp_path / "data"), "status_interval": 0.1},
        "log": {"commit_interval": 0.01},
        "inputs": [
            {
                "type": "simulated",
                "name": "sim",
                "rate": 0,
                "count": 500,
                "sensors": [{"name": "t"}],
            }
        ],
        "health": {"listen": f"127.0.0.1:{port}"},
    }
    doc.update(over)
    return AgentConfig.model_validate(doc)


async def started(agent: Agent) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(agent.run(ready))
    await asyncio.wait_for(ready.wait(), 10)
    return task


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        return response.status, await response.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_healthz_and_metrics_match_status(tmp_path: Path, cloud: CloudServer) -> None:
    port = free_port()
    upstream = {"type": "http", "name": "cloud", "url": cloud.url + "/ingest", "linger": 0.01}
    cfg = config(tmp_path, port, upstreams=[upstream])
    agent = Agent(cfg)
    task = await started(agent)
    base = f"http://127.0.0.1:{port}"
    try:
        event_log = agent.log
        assert event_log is not None
        await eventually(
            lambda: event_log.cursor("upstream:cloud", Stream.READINGS) == 500, what="delivery"
        )
        await eventually(lambda: agent.monitor.disk_bytes > 0, what="a monitor sample")
        status, body = await get(base + "/healthz")
        assert status == 200 and json.loads(body) == {"ok": True, "reasons": []}
        status, text = await get(base + "/metrics")
        assert status == 200
        m = samples(text)
        snap = agent.snapshot()
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)

    def one(name: str, **labels: str) -> float:
        return m[(f"edge_agent_{name}", tuple(sorted(labels.items())))]

    assert one("input_readings_total", input="sim") == snap["inputs"]["sim"]["readings"] == 500
    assert one("upstream_sent_total", upstream="cloud") == snap["upstreams"]["cloud"]["sent"]
    assert one("upstream_failures_total", upstream="cloud") == 0
    assert one("log_head_seq", stream="readings") == 500
    assert one("consumer_lag", consumer="upstream:cloud", stream="readings") == 0
    assert one("log_quota_bytes") == cfg.log.quota
    assert 0 < one("log_disk_bytes") <= (tmp_path / "data" / "events.db").stat().st_size + 2**22
    assert one("healthy") == 1.0
    assert one("log_dropped_total", stream="readings") == 0
    info = [k for k in m if k[0] == "edge_agent_info"]
    assert info and ("name", "health") in info[0][1]
    assert ("process_resident_memory_bytes", ()) in m


async def test_healthz_says_why_it_is_unhealthy(tmp_path: Path) -> None:
    port = free_port()
    cfg = config(
        tmp_path,
        port,
        inputs=[
            {"type": "simulated", "name": "sim", "rate": 100, "sensors": [{"name": "t"}]},
            {
                "type": "serial",
                "name": "board",
                "port": str(tmp_path / "ttyUSB-unplugged"),
                "reconnect_initial": 0.05,
                "reconnect_max": 0.1,
            },
        ],
        upstreams=[
            {
                "type": "http",
                "name": "cloud",
                "url": f"http://127.0.0.1:{free_port()}/ingest",
                "backoff_initial": 0.05,
                "backoff_max": 0.1,
            }
        ],
        health={
            "listen": f"127.0.0.1:{port}",
            "input_down_after": 0.3,
            "upstream_failing_after": 0.3,
        },
    )
    agent = Agent(cfg)
    task = await started(agent)
    url = f"http://127.0.0.1:{port}/healthz"
    try:
        event_log = agent.log
        assert event_log is not None

        async def unhealthy_for(*words: str) -> bool:
            try:
                status, body = await get(url)
            except aiohttp.ClientConnectionError:  # not bound yet
                return False
            reasons = " | ".join(json.loads(body)["reasons"])
            return status == 503 and all(w in reasons for w in words)

        await eventually(
            lambda: unhealthy_for("input board down", "upstream cloud failing"),
            what="503 for the input and the upstream",
        )
        # The card fills up: commits fail, readings wait in the queue.
        db = event_log._writer_db
        assert db is not None
        async with db.execute("PRAGMA page_count") as cur:
            row = await cur.fetchone()
        assert row is not None
        await db.execute(f"PRAGMA max_page_count={row[0]}")
        await eventually(lambda: unhealthy_for("log writer failing"), what="503 for the log")
        assert "disk is full" in " ".join(agent.monitor.health().reasons)
        assert not agent.monitor.stalled, "retrying is not stuck: the watchdog keeps pinging"
        await db.execute("PRAGMA max_page_count=1073741823")
        await eventually(
            lambda: not any("log writer" in r for r in agent.monitor.health().reasons),
            what="the log to recover",
        )
        _, text = await get(f"http://127.0.0.1:{port}/metrics")
        assert samples(text)[("edge_agent_healthy", ())] == 0.0
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)


async def test_a_busy_health_port_does_not_stop_the_agent(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        agent = Agent(config(tmp_path, taken.getsockname()[1]))
        task = await started(agent)
        try:
            await eventually(lambda: agent.inputs["sim"].readings == 500, what="readings")
            await eventually(
                lambda: "health endpoint 127.0.0.1:" in caplog.text, what="the bind error"
            )
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)


# --------------------------------------------------------------------------- progress


def test_a_part_is_stuck_only_with_work_and_no_movement() -> None:
    progress = Progress()
    assert progress.update({"writer": (True, (1, 0), 10.0)}, now=0.0) == []
    assert progress.update({"writer": (True, (1, 0), 10.0)}, now=9.0) == []
    (stuck,) = progress.update({"writer": (True, (1, 0), 10.0)}, now=11.0)
    assert stuck.startswith("writer has work and made no progress for 11s")
    assert progress.update({"writer": (True, (1, 1), 10.0)}, now=12.0) == []  # an attempt
    assert progress.update({"writer": (False, (1, 1), 10.0)}, now=30.0) == []  # idle is fine
    assert progress.update({"writer": (True, (1, 1), 10.0)}, now=35.0) == []
    assert progress.update({}, now=50.0) == [] and progress.parts == {}


# --------------------------------------------------------------------------- clock


def test_a_clock_step_is_seen_and_slewing_is_not() -> None:
    watch = ClockWatch(threshold=2.0, offset=1000.0)
    assert watch.observe(wall=1010.0, mono=10.0) is None
    assert watch.observe(wall=1020.5, mono=20.0) is None  # 0.5 s of slewing
    step = watch.observe(wall=1_700_000_000.0, mono=30.0)  # NTP after a boot in 1970
    assert step is not None and step.old_offset == 1000.5
    assert step.step == pytest.approx(1_700_000_000.0 - 30.0 - 1000.5)
    assert watch.observe(wall=1_699_999_990.0, mono=40.0) is not None  # backwards, too
    assert watch.steps == 2


async def test_the_agent_records_boot_id_and_clock_steps(tmp_path: Path) -> None:
    agent = Agent(config(tmp_path, free_port()))
    task = await started(agent)
    try:
        # As if NTP had just set the clock 100 s forward.
        agent.monitor.clock.offset -= 100.0
        event_log = agent.log
        assert event_log is not None
        await eventually(lambda: event_log.head(Stream.AGENT) >= 2, what="a clock_step event")
        assert agent.snapshot()["clock"]["steps"] == 1
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)
    conn = sqlite3.connect(agent.cfg.log_path)
    rows = conn.execute("SELECT kind, data FROM events WHERE stream=4 ORDER BY seq").fetchall()
    conn.close()
    events = {kind: json.loads(data) for kind, data in rows}
    assert events["agent.started"]["boot_id"] == boot_id()
    step = events["clock_step"]
    assert step["step"] == pytest.approx(100.0, abs=0.5)
    assert step["new_offset"] - step["old_offset"] == pytest.approx(step["step"])


async def test_status_shows_health_disk_capacity_and_clock(tmp_path: Path) -> None:
    cfg = config(
        tmp_path,
        free_port(),
        inputs=[{"type": "simulated", "name": "sim", "rate": 200, "sensors": [{"name": "t"}]}],
    )
    path = tmp_path / "agent.yaml"
    path.write_text(json.dumps(cfg.model_dump(mode="json")))  # JSON is YAML
    agent = Agent(cfg)
    task = await started(agent)
    try:
        await eventually(
            lambda: agent.snapshot()["disk"]["capacity_hours"] is not None, what="a rate"
        )
        await asyncio.sleep(0.3)  # a status.json written with it
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "status", str(path),
            stdout=asyncio.subprocess.PIPE, env=os.environ | {"COLUMNS": "200"},
        )  # fmt: skip
        out = (await proc.communicate())[0].decode()
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)
    assert "health: ok (running)" in out
    assert "h of offline capacity left at the current rate" in out
    assert "bytes written per reading" in out and "deadletter 0" in out
    assert "clock: NTP synchronised" in out and "steps 0" in out
