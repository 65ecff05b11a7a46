"""`edge-agent plan` (hours offline the quota holds) and `edge-agent replay` (an upstream's
cursors moved back, by the CLI for a stopped agent, by the running agent on request)."""

from __future__ import annotations

import asyncio
import datetime
import json
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from agent.cli import app, parse_since
from agent.config import load_config
from agent.events import Reading, Stream
from agent.log import CursorUpdate, EventLog
from agent.runtime import Agent
from agent.upstream_http import HttpUpstream
from simulator.cloud import CloudServer, CloudStore
from tests.conftest import eventually

runner = CliRunner()


def write_config(tmp_path: Path, url: str = "http://127.0.0.1:9/ingest", **over: Any) -> Path:
    doc: dict[str, Any] = {
        "agent": {"name": "plan-pi", "data_dir": str(tmp_path / "data"), "status_interval": 0.1},
        "log": {"quota": "64MiB", "commit_interval": 0.01},
        "inputs": [],
        "upstreams": [
            {"type": "http", "name": "cloud", "url": url, "linger": 0, "backoff_initial": 0.05}
        ],
    }
    doc.update(over)
    path = tmp_path / "agent.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


async def fill_log(path: Path, n: int, start: float, every: float) -> str:
    """`n` readings received `every` seconds apart from `start`; returns the log id."""
    cfg = load_config(path)
    async with EventLog.open(cfg.log_path, cfg.log) as log:
        readings = [
            Reading("board.t1", float(i), "C", start + i * every, start + i * every, 0.0, "x")
            for i in range(n)
        ]
        await log.append(readings)
        return log.log_id


def test_since_reads_durations_ago_iso_8601_and_epoch_seconds() -> None:
    now = 1_800_000_000.0
    assert parse_since("2h ago", now) == now - 7200
    assert parse_since("90m", now) == now - 5400
    assert parse_since("1d ago", now) == now - 86400
    assert parse_since("1764170000", now) == 1764170000.0
    assert (
        parse_since("2026-11-26T13:00:00Z", now)
        == datetime.datetime(2026, 11, 26, 13, tzinfo=datetime.UTC).timestamp()
    )
    local = datetime.datetime(2026, 11, 26, 13, 0)
    assert parse_since("2026-11-26T13:00", now) == local.timestamp()
    with pytest.raises(ValueError, match="is not a time"):
        parse_since("yesterday-ish", now)


async def test_plan_measures_the_rate_and_the_bytes_in_the_log(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    await fill_log(config, 5000, time.time() - 60, 0.01)  # 100 readings/s
    cfg = load_config(config)
    async with EventLog.open(cfg.log_path, cfg.log) as log:
        await log.append(cursors=[CursorUpdate("upstream:cloud", Stream.READINGS, 1000)])
    result = runner.invoke(app, ["plan", str(config), "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["rate"] == pytest.approx(100, rel=0.01)
    assert plan["rate_source"].startswith("measured in the log")
    assert plan["bytes_source"] == "measured in the log"
    assert 30 < plan["bytes_per_event"] < 200
    hours = 64 * 2**20 / (plan["bytes_per_event"] * 100) / 3600
    assert plan["offline_hours"] == pytest.approx(hours, rel=0.01)
    (up,) = plan["upstreams"]
    assert up["backlog_events"] == 4000 and up["hours_left"] < plan["offline_hours"]
    text = runner.invoke(app, ["plan", str(config)]).output
    assert "offline: " in text and "bounded by the quota" in text


def test_plan_without_a_log_takes_the_configured_rate(tmp_path: Path) -> None:
    sensors = [{"name": f"s{i}"} for i in range(3)]
    config = write_config(
        tmp_path, inputs=[{"type": "simulated", "name": "sim", "rate": 10, "sensors": sensors}]
    )
    plan = json.loads(runner.invoke(app, ["plan", str(config), "--json"]).output)
    assert plan["rate"] == 30 and plan["rate_source"].startswith("configured")
    assert plan["bytes_source"].startswith("estimated")
    assert plan["offline_hours"] == pytest.approx(64 * 2**20 / (80 * 30) / 3600, rel=0.01)
    # A serial input has no rate to read from the config: plan asks for one.
    serial = [{"type": "serial", "name": "board", "port": "/dev/null"}]
    config = write_config(tmp_path, inputs=serial)
    result = runner.invoke(app, ["plan", str(config)])
    assert result.exit_code == 1 and "give --rate" in result.output
    plan = json.loads(runner.invoke(app, ["plan", str(config), "--rate", "50", "--json"]).output)
    assert plan["rate"] == 50 and plan["holds_hours"] > 0


async def test_replay_moves_a_stopped_agents_cursor_back_and_the_range_is_sent_again(
    tmp_path: Path,
) -> None:
    async with CloudServer(tmp_path / "cloud.db") as cloud:
        config = write_config(tmp_path, url=cloud.url + "/ingest")
        start = time.time() - 1000
        await fill_log(config, 100, start, 1.0)
        cfg = load_config(config)

        async def deliver() -> None:
            async with EventLog.open(cfg.log_path, cfg.log) as log:
                up = HttpUpstream(cfg.upstreams[0], "plan-pi")  # type: ignore[arg-type]
                stop = asyncio.Event()
                task = asyncio.create_task(up.run(log, stop))
                await eventually(lambda: log.cursor(up.consumer, Stream.READINGS) == 100)
                stop.set()
                await task

        await deliver()
        result = await asyncio.to_thread(
            runner.invoke,
            app,
            ["replay", str(config), "--upstream", "cloud", "--since", str(start + 40), "-s",
             "readings"],
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "readings: cursor 100 -> 40 (60 events sent again)" in result.output
        assert "rewound; cloud sends them when the agent runs next" in result.output
        await deliver()
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.count("readings") == 100 and store.duplicates() == 60


def test_replay_says_what_is_wrong(tmp_path: Path) -> None:
    config = write_config(tmp_path)
    asyncio.run(fill_log(config, 10, time.time(), 0.1))
    result = runner.invoke(app, ["replay", str(config), "-u", "nope", "--since", "1h ago"])
    assert result.exit_code == 1 and "no upstream named 'nope'" in result.output
    result = runner.invoke(app, ["replay", str(config), "-u", "cloud", "--since", "whenever"])
    assert result.exit_code == 1 and "is not a time" in result.output
    result = runner.invoke(app, ["replay", str(config), "-u", "cloud", "--since", "1h ago"])
    assert result.exit_code == 0 and "nothing sent since" in result.output


async def test_replay_asks_the_running_agent_and_shows_its_progress(tmp_path: Path) -> None:
    async with CloudServer(tmp_path / "cloud.db") as cloud:
        inputs = [{"type": "simulated", "name": "sim", "rate": 0, "count": 600,
                   "sensors": [{"name": "t1"}, {"name": "t2"}]}]  # fmt: skip
        config = write_config(tmp_path, url=cloud.url + "/ingest", inputs=inputs)
        agent = Agent(load_config(config))
        ready = asyncio.Event()
        task = asyncio.create_task(agent.run(ready))
        await asyncio.wait_for(ready.wait(), 10)
        try:
            assert agent.log is not None
            log = agent.log
            await eventually(
                lambda: log.cursor("upstream:cloud", Stream.READINGS) == 600, what="delivery"
            )
            await eventually(
                lambda: (tmp_path / "data" / "status.json").exists(), what="status.json"
            )
            result = await asyncio.to_thread(
                runner.invoke,
                app,
                ["replay", str(config), "-u", "cloud", "--since", "1h ago", "--wait",
                 "--timeout", "20"],
            )  # fmt: skip
            assert result.exit_code == 0, result.output
            assert "readings: cursor 600 -> 0 (600 events sent again)" in result.output
            assert "the running agent rewound cloud" in result.output
            assert "replaying to cloud" in result.output
            assert agent.upstreams[0].status.replays == 1
        finally:
            agent.stop()
            await asyncio.wait_for(task, 15)
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.count("readings") == 600 and store.duplicates() >= 600
