"""Local actions: consumers of the `alerts` stream with their own cursors. A command gets the
alert on stdin and in its environment, a webhook and an MQTT broker get it as JSON; failures are
retried and counted; a crash performs an alert again rather than skip it; a failing action
holds up nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from aiohttp import web
from paho.mqtt.enums import CallbackAPIVersion

from agent.actions import Action, build_action
from agent.config import AgentConfig, ProcessingConfig
from agent.events import NewEvent, Stream
from agent.log import EventLog
from agent.runtime import Agent
from tests.conftest import Broker, eventually, free_port

SCRIPT = """
import json, os, sys, time
out, mode = sys.argv[1], sys.argv[2]
alert = json.load(sys.stdin)
env = {k: v for k, v in os.environ.items() if k.startswith("EDGE_") and k != "EDGE_ALERT_JSON"}
with open(out, "a") as f:
    f.write(json.dumps({"argv": sys.argv[3:], "alert": alert, "env": env, "pid": os.getpid()}) + "\\n")
if mode == "fail":
    print("relay stuck", file=sys.stderr)
    sys.exit(3)
if mode.startswith("fail-first-"):
    runs = sum(1 for _ in open(out))
    sys.exit(0 if runs > int(mode.removeprefix("fail-first-")) else 1)
if mode == "hang" or (mode == "hang-on-t2" and sys.argv[3] == "t2"):
    time.sleep(60)
"""


def alert(
    kind: str = "raised",
    n: int = 1,
    *,
    rule: str = "hot",
    severity: str = "warning",
    sensor: str = "t1",
    value: float | None = 31.5,
) -> NewEvent:
    data = {"alert_id": f"{rule}:{sensor}:{n}", "rule": rule, "severity": severity, "above": 30}
    return NewEvent(f"alert.{kind}", 1.7e9, 1.7e9, 1.0, sensor, value, "C", data)


@pytest.fixture
async def event_log(tmp_path: Path) -> AsyncIterator[EventLog]:
    async with EventLog.open(tmp_path / "events.db") as log:
        yield log


def command(tmp_path: Path, mode: str = "ok", **cfg: Any) -> tuple[Action, Path]:
    script = tmp_path / "act.py"
    script.write_text(SCRIPT)
    out = tmp_path / "calls.jsonl"
    doc = {
        "type": "command",
        "name": "relay",
        "argv": [sys.executable, str(script), str(out), mode, "{sensor}", "{kind}"],
        "backoff_initial": "10ms",
        "backoff_max": "50ms",
        **cfg,
    }
    action = build_action(ProcessingConfig.model_validate({"actions": [doc]}).actions[0])
    return action, out


def calls(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


@contextlib.asynccontextmanager
async def running(action: Action, event_log: EventLog) -> AsyncIterator[asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(action.run(event_log, stop))
    try:
        yield task
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


def cursor(event_log: EventLog, action: Action) -> int:
    return event_log.cursor(action.consumer, Stream.ALERTS)


async def test_command_gets_the_alert_on_stdin_and_in_its_environment(
    tmp_path: Path, event_log: EventLog
) -> None:
    action, out = command(tmp_path, severities=["warning", "critical"], kinds=["raised"])
    await event_log.append(
        events={
            Stream.ALERTS: [
                alert(),
                alert(severity="info", n=2),  # filtered out: severity
                alert("cleared"),  # filtered out: kind
                alert(sensor="t2", severity="critical", value=40.25),
            ]
        }
    )
    async with running(action, event_log):
        await eventually(lambda: cursor(event_log, action) == 4, what="the cursor past all four")
    first, second = calls(out)
    assert first["argv"] == ["t1", "raised"]
    assert first["alert"]["id"] == f"{event_log.log_id}:alerts:1"
    assert first["alert"]["data"]["alert_id"] == "hot:t1:1"
    assert first["env"] == {
        "EDGE_ALERT_ID": "hot:t1:1",
        "EDGE_ALERT_KIND": "raised",
        "EDGE_RULE": "hot",
        "EDGE_SEVERITY": "warning",
        "EDGE_SENSOR": "t1",
        "EDGE_VALUE": "31.5",
        "EDGE_UNIT": "C",
        "EDGE_TIME": "1700000000.0",
        "EDGE_EVENT_ID": f"{event_log.log_id}:alerts:1",
    }
    assert second["env"]["EDGE_SENSOR"] == "t2" and second["env"]["EDGE_VALUE"] == "40.25"
    assert action.status.done == 2 and action.status.failures == 0


async def test_failures_are_retried_with_backoff_and_counted(
    tmp_path: Path, event_log: EventLog
) -> None:
    action, out = command(tmp_path, "fail-first-2")
    await event_log.append(events={Stream.ALERTS: [alert()]})
    async with running(action, event_log):
        await eventually(lambda: cursor(event_log, action) == 1, what="success on the third try")
    assert len(calls(out)) == 3
    assert action.status.failures == 2 and action.status.done == 1
    assert "exited with status 1" in (action.status.last_error or "")


async def test_an_action_gives_up_after_max_attempts_and_says_so(
    tmp_path: Path, event_log: EventLog
) -> None:
    action, out = command(tmp_path, "fail", max_attempts=3)
    await event_log.append(events={Stream.ALERTS: [alert(), alert("cleared")]})
    async with running(action, event_log):
        await eventually(lambda: cursor(event_log, action) == 2, what="the cursor past both")
    assert len(calls(out)) == 6 and action.status.gave_up == 2
    failed = [e for e in await event_log.read(Stream.AGENT, 0) if e.kind == "action.failed"]
    assert [e.data["alert_id"] for e in failed if e.data] == ["hot:t1:1", "hot:t1:1"]
    assert failed[0].data is not None and failed[0].data["attempts"] == 3
    assert failed[0].data["error"] == f"{sys.executable} exited with status 3: relay stuck"


async def test_a_command_past_its_timeout_is_killed(tmp_path: Path, event_log: EventLog) -> None:
    action, out = command(tmp_path, "hang", timeout="300ms", max_attempts=1)
    await event_log.append(events={Stream.ALERTS: [alert()]})
    async with running(action, event_log):
        await eventually(lambda: cursor(event_log, action) == 1, what="the timeout")
    (call,) = calls(out)
    assert "did not finish within 0.3s" in (action.status.last_error or "")
    with pytest.raises(ProcessLookupError):
        os.kill(call["pid"], 0)


async def test_a_crash_performs_the_alert_again_never_skips_it(
    tmp_path: Path, event_log: EventLog
) -> None:
    await event_log.append(events={Stream.ALERTS: [alert(n=1), alert(n=2, sensor="t2")]})
    # The first alert is done; the second one's command hangs, and the agent dies meanwhile.
    hanging, out = command(tmp_path, "hang-on-t2")
    stop = asyncio.Event()
    task = asyncio.create_task(hanging.run(event_log, stop))
    await eventually(lambda: len(calls(out)) == 2, what="the second alert's command to start")
    assert cursor(event_log, hanging) == 1
    task.cancel()  # a crash: nothing more is committed
    with contextlib.suppress(asyncio.CancelledError):
        await task
    os.kill(calls(out)[1]["pid"], 9)
    again, _ = command(tmp_path, "ok")
    async with running(again, event_log):
        await eventually(lambda: cursor(event_log, again) == 2, what="the second alert, again")
    assert [c["argv"][0] for c in calls(out)] == ["t1", "t2", "t2"]


@pytest.fixture
async def hook() -> AsyncIterator[tuple[str, list[dict[str, Any]], list[int]]]:
    """A local webhook answering with the statuses queued in `answers` (then 200)."""
    seen: list[dict[str, Any]] = []
    answers: list[int] = []

    async def receive(request: web.Request) -> web.Response:
        seen.append({"body": await request.json(), "token": request.headers.get("X-Token")})
        return web.Response(status=answers.pop(0) if answers else 200, text="stored")

    app = web.Application()
    app.router.add_post("/hook", receive)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/hook", seen, answers
    await runner.cleanup()


async def test_webhook_posts_the_alert_and_retries_until_a_2xx(
    event_log: EventLog, hook: tuple[str, list[dict[str, Any]], list[int]]
) -> None:
    url, seen, answers = hook
    answers.extend([500, 503])
    cfg = {
        "type": "webhook",
        "name": "siren",
        "url": url,
        "headers": {"X-Token": "s3cret"},
        "rules": ["ho*"],
        "backoff_initial": "10ms",
    }
    action = build_action(ProcessingConfig.model_validate({"actions": [cfg]}).actions[0])
    await event_log.append(events={Stream.ALERTS: [alert(), alert(rule="cold")]})
    async with running(action, event_log):
        await eventually(lambda: cursor(event_log, action) == 2, what="delivery")
    assert len(seen) == 3 and action.status.failures == 2
    assert action.status.last_error == "HTTP 503: stored"
    body = seen[-1]["body"]
    assert body["log_id"] == event_log.log_id and seen[-1]["token"] == "s3cret"
    assert body["alert"]["kind"] == "alert.raised" and body["alert"]["data"]["rule"] == "hot"


class Subscriber:
    """A plain paho client on its own thread, collecting what arrives on `topic`."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, bytes, int]] = []
        self.ready = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{time.time()}")
        self.client.on_connect = lambda c, *_: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *_: self.ready.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload, m.qos))
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert self.ready.wait(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


async def test_mqtt_publishes_each_alert_and_moves_after_the_puback(
    event_log: EventLog, broker: Broker
) -> None:
    sub = Subscriber(broker, "relays/#")
    try:
        cfg = {
            "type": "mqtt",
            "name": "fan",
            "url": broker.url,
            "topic": "relays/{sensor}/set",
            "payload_raised": "ON {alert_id}",
            "payload_cleared": "OFF",
        }
        action = build_action(ProcessingConfig.model_validate({"actions": [cfg]}).actions[0])
        json_cfg = {"type": "mqtt", "name": "log", "url": broker.url, "topic": "relays/all"}
        as_json = build_action(ProcessingConfig.model_validate({"actions": [json_cfg]}).actions[0])
        await event_log.append(events={Stream.ALERTS: [alert(), alert("cleared")]})
        async with running(action, event_log), running(as_json, event_log):
            await eventually(lambda: cursor(event_log, action) == 2, what="both published")
            await eventually(lambda: cursor(event_log, as_json) == 2, what="both as JSON")
            await eventually(lambda: len(sub.messages) == 4, what="the subscriber")
        relay = [(t, p) for t, p, _ in sub.messages if t == "relays/t1/set"]
        assert relay == [("relays/t1/set", b"ON hot:t1:1"), ("relays/t1/set", b"OFF")]
        docs = [json.loads(p) for t, p, _ in sub.messages if t == "relays/all"]
        assert [d["kind"] for d in docs] == ["alert.raised", "alert.cleared"]
        assert all(q == 1 for _, _, q in sub.messages)
    finally:
        sub.close()


async def test_mqtt_broker_away_is_a_counted_failure_and_the_cursor_waits(
    event_log: EventLog,
) -> None:
    cfg = {
        "type": "mqtt",
        "name": "fan",
        "url": f"mqtt://127.0.0.1:{free_port()}",
        "topic": "relays/x",
        "backoff_initial": "10ms",
        "backoff_max": "20ms",
        "timeout": "1s",
    }
    action = build_action(ProcessingConfig.model_validate({"actions": [cfg]}).actions[0])
    await event_log.append(events={Stream.ALERTS: [alert()]})
    async with running(action, event_log):
        await eventually(lambda: action.status.failures >= 3, what="failed attempts")
        assert cursor(event_log, action) == 0
    assert "cannot connect" in (action.status.last_error or "")


async def test_actions_run_in_the_agent_and_a_failing_one_holds_up_nothing(
    tmp_path: Path,
) -> None:
    """Readings raise an alert in a running agent; a webhook that cannot be reached keeps
    failing while the command action and the processor go on."""
    script = tmp_path / "act.py"
    script.write_text(SCRIPT)
    out = tmp_path / "calls.jsonl"
    cfg = AgentConfig.model_validate(
        {
            "agent": {"name": "a", "data_dir": str(tmp_path / "data"), "status_interval": 0.2},
            "log": {"commit_interval": 0.02},
            "inputs": [
                {
                    "type": "simulated",
                    "name": "sim",
                    "rate": 0,
                    "count": 400,
                    "sensors": [{"name": "temp1", "base": 40, "amplitude": 0, "noise": 0}],
                }
            ],
            "processing": {
                "rules": [{"name": "hot", "sensors": "temp*", "above": 30}],
                "actions": [
                    {
                        "type": "webhook",
                        "name": "down",
                        "url": f"http://127.0.0.1:{free_port()}/hook",
                        "backoff_initial": "10ms",
                        "backoff_max": "20ms",
                    },
                    {
                        "type": "command",
                        "name": "relay",
                        "argv": [sys.executable, str(script), str(out), "ok", "{sensor}"],
                    },
                ],
            },
        }
    )
    agent = Agent(cfg)
    ready = asyncio.Event()
    task = asyncio.create_task(agent.run(ready))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        assert agent.log is not None
        log = agent.log
        await eventually(lambda: len(calls(out)) == 1, what="the command action")
        await eventually(lambda: agent.actions[0].status.failures >= 3, what="webhook failures")
        await eventually(
            lambda: log.cursor("processor", Stream.READINGS) == 400, what="the processor"
        )
        await eventually(lambda: log.cursor("action:relay", Stream.ALERTS) == 1, what="done")
        assert log.cursor("action:down", Stream.ALERTS) == 0
    finally:
        agent.stop()
        await asyncio.wait_for(task, 15)
    (call,) = calls(out)
    assert call["argv"] == ["temp1"] and call["env"]["EDGE_ALERT_ID"] == "hot:temp1:1"
