"""The HTTP upstream against the simulator's real endpoint: lanes, starvation, retries."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from agent.config import HttpUpstreamConfig, LogConfig
from agent.events import NewEvent, Reading, Rejected, Stream
from agent.log import EventLog
from agent.upstream_http import HttpUpstream
from simulator.cloud import CloudServer, CloudStore
from tests.conftest import eventually


def upstream(url: str, **kw: object) -> HttpUpstream:
    cfg = HttpUpstreamConfig.model_validate(
        {
            "type": "http",
            "name": "c",
            "url": url,
            "batch_size": 100,
            "linger": 0,
            "backoff_initial": 0.02,
            "backoff_max": 0.1,
            **kw,
        }
    )
    return HttpUpstream(cfg, "test")


async def fill(log: EventLog, readings: int) -> None:
    now, mono = time.time(), time.monotonic()
    await log.append([Reading("t", float(i), None, now, now, mono, "x") for i in range(readings)])


async def test_alerts_first_and_deadletter_not_starved_by_a_steady_flow(tmp_path: Path) -> None:
    async with (
        CloudServer(tmp_path / "cloud.db") as cloud,
        EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log,
    ):
        await fill(log, 3000)
        now = time.time()
        await log.append([Rejected(b"junk", "invalid_json", "x", "x", now, 0.0)])
        await log.append(
            events={Stream.ALERTS: [NewEvent("alert.raised", now, now, 0.0, "t", 99.0)]}
        )
        up = upstream(cloud.url + "/ingest")
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(log, stop))
        await eventually(lambda: log.cursor(up.consumer, Stream.READINGS) == 3000, what="delivery")
        stop.set()
        await asyncio.wait_for(task, 10)
    with CloudStore(tmp_path / "cloud.db") as store:
        order = [e["stream"] for e in store.events()]
    assert order[0] == "alerts"
    # The dead-letter lane is last in priority, yet it went out while readings were waiting.
    assert order.index("deadletter") < order.index("readings") + 100 * 5
    assert order.count("readings") == 3000


async def test_retries_until_acknowledged_and_dedupes(tmp_path: Path) -> None:
    async with CloudServer(tmp_path / "cloud.db", fail_rate=0.3, lose_ack_rate=0.3, seed=3) as cloud, \
            EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:  # fmt: skip
        await fill(log, 1000)
        up = upstream(cloud.url + "/ingest", gzip=False)
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(log, stop))
        await eventually(lambda: log.cursor(up.consumer, Stream.READINGS) == 1000, what="delivery")
        stop.set()
        await asyncio.wait_for(task, 10)
        assert up.status.failures > 0 and "HTTP 500" in (up.status.last_error or "")
        log_id = log.log_id
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids("readings") == {f"{log_id}:readings:{i}" for i in range(1, 1001)}
        assert store.duplicates() > 0


async def test_unreachable_endpoint_keeps_everything(tmp_path: Path) -> None:
    from tests.conftest import free_port

    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        await fill(log, 10)
        up = upstream(f"http://127.0.0.1:{free_port()}/ingest")
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(log, stop))
        await eventually(lambda: up.status.failures >= 3, what="retries")
        stop.set()
        await asyncio.wait_for(task, 10)
        assert log.cursor(up.consumer, Stream.READINGS) == 0
        assert "Connect" in (up.status.last_error or "")
