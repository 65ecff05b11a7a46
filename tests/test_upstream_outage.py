"""Offline days, shortened: the whole agent in-process (simulated input, the log, upstreams)
while its cloud is down, then back; and the same with a disk quota too small for the outage.

Alerts are appended by the test while the cloud is down (in the log's `alerts` stream, as the
processor does), so what is compared at the end is quiet: nothing appends after the upstream
caught up."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

from agent.config import AgentConfig, HttpUpstreamConfig
from agent.events import NewEvent, Stream
from agent.log import CODE_STREAMS, EventLog
from agent.runtime import Agent
from simulator.cloud import CloudServer, CloudStore
from tests.conftest import eventually


def config(tmp_path: Path, url: str, *, count: int, rate: float, **log: Any) -> AgentConfig:
    return AgentConfig.model_validate(
        {
            "agent": {"name": "outage-pi", "data_dir": str(tmp_path / "data")},
            "log": {"commit_interval": 0.02, **log},
            "inputs": [
                {
                    "type": "simulated",
                    "name": "sim",
                    "rate": rate,
                    "count": count,
                    "seed": 1,
                    "sensors": [{"name": "board.temp1"}, {"name": "board.hum1"}],
                }
            ],
            "upstreams": [
                {
                    "type": "http",
                    "name": "cloud",
                    "url": url,
                    "batch_size": 200,
                    "linger": 0.02,
                    "backoff_initial": 0.05,
                    "backoff_max": 0.2,
                }
            ],
        }
    )


async def raise_alert(log: EventLog, n: int) -> None:
    now = time.time()
    data = {"alert_id": f"hot:board.temp1:{n}", "rule": "hot", "severity": "critical"}
    event = NewEvent("alert.raised", now, now, time.monotonic(), "board.temp1", 40.0, "C", data)
    await log.append(events={Stream.ALERTS: [event]})


def log_ids(path: Path) -> tuple[str, set[str]]:
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        log_id = db.execute("SELECT value FROM meta WHERE key='log_id'").fetchone()[0]
        ids = {f"{log_id}:{CODE_STREAMS[c].value}:{s}" for c, s in db.execute(
            "SELECT stream, seq FROM events")}  # fmt: skip
    finally:
        db.close()
    return log_id, ids


def caught_up(agent: Agent) -> bool:
    log = agent.log
    return log is not None and all(log.cursor("upstream:cloud", s) == log.head(s) for s in Stream)


async def run_agent(agent: Agent) -> asyncio.Task[None]:
    ready = asyncio.Event()
    task = asyncio.create_task(agent.run(ready))
    await asyncio.wait_for(ready.wait(), 10)
    return task


async def test_an_outage_loses_nothing_repeats_nothing_and_alerts_go_first(
    tmp_path: Path,
) -> None:
    async with CloudServer(tmp_path / "cloud.db", down=True, seed=2) as cloud:
        cfg = config(tmp_path, cloud.url + "/ingest", count=3000, rate=1000)
        agent = Agent(cfg)
        task = await run_agent(agent)
        try:
            assert agent.log is not None
            log = agent.log
            # Readings arrive for 1.5 s while the cloud is down; alerts are raised meanwhile.
            for n, at in enumerate((500, 1500, 2500), 1):
                await eventually(lambda at=at: log.head(Stream.READINGS) >= at, what=f"{at}")
                await raise_alert(log, n)
            await eventually(lambda: log.head(Stream.READINGS) == 3000, what="every reading")
            assert agent.upstreams[0].status.failures >= 3
            assert log.cursor("upstream:cloud", Stream.READINGS) == 0
            back = time.time()
            # It comes back, losing some acknowledgements (stored, answered 500).
            cloud.set_faults(down=False, lose_ack_rate=0.2)
            await eventually(lambda: caught_up(agent), within=20, what="the backlog")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
        injected = cloud.injected.as_dict()
    _, ids = log_ids(cfg.log_path)
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids() == ids, "nothing lost, nothing extra"
        assert store.count() == len(ids)
        arrived = store.events()
        duplicates = store.duplicates()
    assert injected["lose_ack"] > 0 and duplicates > 0, "some batches were sent twice"
    streams = [e["stream"] for e in arrived]
    last_alert = max(i for i, s in enumerate(streams) if s == "alerts")
    first_reading = streams.index("readings")
    assert last_alert < first_reading, "alerts raised during the outage overtook the backlog"
    assert all(e["received_at"] >= back for e in arrived)
    # Oldest first, give or take the requests in flight at once (each on its connection).
    up = cfg.upstreams[0]
    assert isinstance(up, HttpUpstreamConfig)
    reorder = up.max_inflight * up.batch_size
    highest = 0
    for seq in (e["seq"] for e in arrived if e["stream"] == "readings"):
        assert seq > highest - reorder, "the backlog drained oldest first"
        highest = max(highest, seq)


async def test_a_full_disk_drops_the_oldest_readings_and_the_gap_reaches_the_cloud(
    tmp_path: Path,
) -> None:
    async with CloudServer(tmp_path / "cloud.db", down=True) as cloud:
        cfg = config(
            tmp_path,
            cloud.url + "/ingest",
            count=20_000,
            rate=0,
            quota="256KiB",
            retention_interval=0.05,
            max_batch=2000,
        )
        agent = Agent(cfg)
        task = await run_agent(agent)
        try:
            assert agent.log is not None
            log = agent.log
            await eventually(lambda: log.head(Stream.READINGS) == 20_000, what="every reading")
            await raise_alert(log, 1)
            await log.enforce_retention()
            assert log.stats.dropped.get("readings", 0) > 0, "the quota was hit"
            cloud.set_faults(down=False)
            await eventually(lambda: caught_up(agent), within=20, what="what is left")
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    _, ids = log_ids(cfg.log_path)
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids() == ids
        gaps = [e["data"] for e in store.events("agent") if e["kind"] == "gap"]
        delivered = {e["seq"] for e in store.events("readings")}
        alerts = store.count("alerts")
    dropped: set[int] = set()
    for gap in gaps:
        assert gap["stream"] == "readings" and gap["reason"] == "quota"
        span = set(range(gap["first_seq"], gap["last_seq"] + 1))
        assert not span & dropped and len(span) == gap["count"] == gap["unconsumed"]
        dropped |= span
    # Every reading is accounted for exactly once: delivered, or inside a gap the cloud got.
    assert not dropped & delivered
    assert dropped | delivered == set(range(1, 20_001))
    assert min(delivered) > max(dropped), "the oldest went first"
    assert alerts == 1, "alerts are never dropped"
