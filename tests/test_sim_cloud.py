"""The local cloud ingestion endpoint, started for real on a free port and spoken to over HTTP."""

from __future__ import annotations

import asyncio
import gzip
import json
import math
import signal
import sqlite3
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import hypothesis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from simulator.cloud import (
    CloudError,
    CloudServer,
    CloudStore,
    MqttSubscription,
    ReadingBatch,
    _plain_readings,
    connect,
    parse_batch,
    parse_body,
    parse_message,
    store,
    store_batch,
)
from tests.conftest import Broker, eventually, free_port

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 5.0
LOG = "log-a"
FAULTS_OFF = {
    "down": False, "down_for": None, "fail_rate": 0.0, "lose_ack_rate": 0.0,
    "throttle_rate": 0.0, "retry_after": 1.0, "latency": 0.0, "jitter": 0.0, "drop_rate": 0.0,
}  # fmt: skip


def event(stream: str, seq: int, kind: str = "reading", **extra: Any) -> dict[str, Any]:
    now = time.time()
    ev: dict[str, Any] = {
        "id": f"{LOG}:{stream}:{seq}",
        "stream": stream,
        "seq": seq,
        "kind": kind,
        "time": now,
        "recv_time": now,
    }
    ev.update(extra)
    return ev


def batch(*events: dict[str, Any]) -> dict[str, Any]:
    return {"log_id": LOG, "agent": "pi-1", "events": list(events)}


def readings(seqs: range) -> dict[str, Any]:
    return batch(*(event("readings", s, sensor="temp1", value=20.0 + s, unit="C") for s in seqs))


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as s:
        yield s


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    async with CloudServer(tmp_path / "cloud.db") as srv:
        yield srv


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    async with session.post(url, data=data, headers=hdrs) as resp:
        return resp.status, await resp.json()


async def test_batch_is_stored_and_a_resend_counts_duplicates(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    url = f"{server.url}/ingest"
    assert await post(session, url, readings(range(1, 6))) == (
        200,
        {"accepted": 5, "duplicates": 0},
    )
    with CloudStore(server.db_path) as store:
        # Committed before the 200: a separate connection sees it at once.
        assert store.event_ids() == {f"{LOG}:readings:{s}" for s in range(1, 6)}
        assert await post(session, url, readings(range(1, 6))) == (
            200,
            {"accepted": 0, "duplicates": 5},
        )
        assert await post(session, url, readings(range(4, 8))) == (
            200,
            {"accepted": 2, "duplicates": 2},
        )
        assert store.count() == store.count("readings") == 7
        assert store.count("alerts") == 0
        assert store.duplicates() == 7
        first = store.events("readings")[0]
        assert (first["sensor"], first["value"], first["unit"], first["agent"]) == (
            "temp1",
            21.0,
            "C",
            "pi-1",
        )


async def test_store_and_counters_survive_a_restart(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    db = tmp_path / "cloud.db"
    async with CloudServer(db) as srv:
        await post(session, f"{srv.url}/ingest", readings(range(1, 4)))
        await post(session, f"{srv.url}/ingest", readings(range(1, 3)))
    async with CloudServer(db) as srv:
        status, body = await post(session, f"{srv.url}/ingest", readings(range(1, 5)))
        assert (status, body) == (200, {"accepted": 1, "duplicates": 3})
    with CloudStore(db) as store:
        assert store.count() == 4 and store.duplicates() == 5


async def test_gzip_body(server: CloudServer, session: aiohttp.ClientSession) -> None:
    body = gzip.compress(json.dumps(readings(range(1, 51))).encode())
    status, reply = await post(
        session, f"{server.url}/ingest", body, headers={"Content-Encoding": "gzip"}
    )
    assert (status, reply) == (200, {"accepted": 50, "duplicates": 0})
    status, reply = await post(
        session, f"{server.url}/ingest", b"not gzip", headers={"Content-Encoding": "gzip"}
    )
    assert status == 400 and "error" in reply


async def test_bearer_token(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    async with CloudServer(tmp_path / "cloud.db", token="s3cret") as srv:
        url = f"{srv.url}/ingest"
        assert (await post(session, url, readings(range(1, 2))))[0] == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await post(session, url, readings(range(1, 2)), wrong))[0] == 401
        assert (await post(session, f"{srv.url}/control", {"down": True}, wrong))[0] == 401
        right = {"Authorization": "Bearer s3cret"}
        assert await post(session, url, readings(range(1, 2)), right) == (
            200,
            {"accepted": 1, "duplicates": 0},
        )
        with CloudStore(srv.db_path) as store:
            assert store.count() == 1


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "not JSON"),
        (b"\xff\xfe", "not JSON"),
        ([1, 2], "JSON object"),
        ({"log_id": LOG, "agent": "pi-1"}, "missing events"),
        ({"events": {"a": 1}}, "events must be a list"),
        ({"log_id": 5, "events": []}, "log_id must be a string"),
        ({"log_id": LOG, "events": [7]}, "events[0] must be an object"),
        (batch({k: v for k, v in event("readings", 1).items() if k != "id"}), "missing id"),
        (batch({k: v for k, v in event("readings", 1).items() if k != "stream"}), "missing stream"),
        (batch(event("readings", 1), {"id": "x"}), "events[1]: missing stream"),
        (batch({k: v for k, v in event("readings", 1).items() if k != "seq"}), "missing seq"),
        (batch({**event("readings", 1), "seq": "1"}), "seq must be an integer"),
        (batch({**event("readings", 1), "seq": True}), "seq must be an integer"),
        (batch({**event("readings", 1), "time": "now"}), "time must be a finite number"),
        (batch({**event("readings", 1), "id": "other:readings:1"}), "is not <log_id>"),
        (batch(event("readings", 1, value="21.5")), "value must be a finite number"),
        (batch(event("readings", 1, sensor=3)), "sensor must be a string"),
        (b'{"log_id":"log-a","events":[{"id":"log-a:r:1","stream":"r","seq":1,"kind":"reading",'
         b'"time":1,"recv_time":1,"value":NaN}]}', "value must be a finite number"),
    ],
)  # fmt: skip
async def test_bad_bodies_get_400_with_a_reason(
    server: CloudServer, session: aiohttp.ClientSession, body: Any, reason: str
) -> None:
    status, reply = await post(session, f"{server.url}/ingest", body)
    assert status == 400
    assert reason in reply["error"]
    with CloudStore(server.db_path) as store:
        assert store.count() == 0


async def test_a_bad_event_rejects_the_whole_batch(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    body = batch(event("readings", 1), {**event("readings", 2), "seq": -1})
    status, _ = await post(session, f"{server.url}/ingest", body)
    assert status == 400
    with CloudStore(server.db_path) as store:
        assert store.count() == 0


async def test_control_down_and_failures(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    ingest, control = f"{server.url}/ingest", f"{server.url}/control"
    assert await post(session, control, {"down": True}) == (200, {**FAULTS_OFF, "down": True})
    status, reply = await post(session, ingest, readings(range(1, 3)))
    assert status == 503 and "down" in reply["error"]
    assert (await post(session, control, {"down": False, "fail_rate": 1.0}))[0] == 200
    assert (await post(session, ingest, readings(range(1, 3))))[0] == 500
    with CloudStore(server.db_path) as store:
        assert store.count() == 0
        # A lost ack: stored and committed, then answered 500; the resend is a duplicate.
        assert (await post(session, control, {"fail_rate": 0, "lose_ack_rate": 1}))[0] == 200
        assert (await post(session, ingest, readings(range(1, 3))))[0] == 500
        assert store.count() == 2
        assert (await post(session, control, {"lose_ack_rate": 0}))[0] == 200
        assert await post(session, ingest, readings(range(1, 3))) == (
            200,
            {"accepted": 0, "duplicates": 2},
        )
    for bad in (
        {"down": "yes"}, {"fail_rate": 2}, {"explode": True}, [1], {"drop_rate": -0.1},
        {"throttle_rate": True}, {"latency": -1}, {"retry_after": "soon"}, {"down_for": -5},
        {"jitter": 1, "fail_rate": 7},
    ):  # fmt: skip
        status, reply = await post(session, control, bad)
        assert status == 400 and reply["error"], bad
    async with session.get(control) as resp:
        # A refused change changes nothing, not even its valid part.
        assert await resp.json() == FAULTS_OFF


async def test_fail_rate_is_seeded(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    patterns = []
    for run in range(2):
        async with CloudServer(tmp_path / f"c{run}.db", fail_rate=0.5, seed=42) as srv:
            statuses = [
                (await post(session, f"{srv.url}/ingest", readings(range(1, 2))))[0]
                for _ in range(16)
            ]
        patterns.append(statuses)
    assert patterns[0] == patterns[1]
    assert set(patterns[0]) == {200, 500}


async def test_summary(server: CloudServer, session: aiohttp.ClientSession) -> None:
    now = time.time()
    ingest = f"{server.url}/ingest"

    def reading(seq: int, sensor: str, value: float, t: float) -> dict[str, Any]:
        return event("readings", seq, sensor=sensor, value=value, unit="C", time=t, recv_time=t)

    # Out of order on purpose: the newest event time wins "last", whatever arrives last.
    await post(
        session,
        ingest,
        batch(reading(2, "temp1", 22.0, now - 20), reading(3, "hum1", 40, now - 20)),
    )
    await post(session, ingest, batch(reading(1, "temp1", 21.0, now - 30)))
    await post(session, ingest, batch(reading(2, "temp1", 22.0, now - 20)))  # duplicate
    agg = {"min": 21.0, "max": 22.0, "count": 2, "window": 10}
    await post(
        session,
        ingest,
        batch(
            event(
                "aggregates", 1, "aggregate", sensor="temp1", value=21.5, time=now - 15, data=agg
            ),
            event("aggregates", 2, "aggregate", sensor="temp1", value=99.0, time=now - 25, data={}),
        ),
    )
    alerts = [
        event(
            "alerts",
            seq,
            "alert.raised" if seq % 2 else "alert.cleared",
            sensor="temp1",
            value=30.0 + seq,
            time=now - 100 + seq,
            data={"rule": "hot", "threshold": 30},
        )
        for seq in range(1, 26)
    ]
    await post(session, ingest, batch(*alerts))
    # The newest batch carries events the agent received 5 s ago: that is the upstream lag.
    await post(session, ingest, batch(event("agent", 1, "gap", time=now - 6, recv_time=now - 5)))
    async with session.get(f"{server.url}/api/summary") as resp:
        assert resp.status == 200
        s = await resp.json()
    assert s["streams"] == {"agent": 1, "aggregates": 2, "alerts": 25, "readings": 3}
    assert s["total"] == 31 and s["duplicates"] == 1 and s["recent"] == 31
    assert s["last_received_at"] == pytest.approx(time.time(), abs=DEADLINE)
    assert s["upstream_lag"] == pytest.approx(5.0, abs=2.0)
    assert s["sensors"]["temp1"]["count"] == 2
    assert s["sensors"]["temp1"]["last_value"] == 22.0
    assert s["sensors"]["temp1"]["last_time"] == pytest.approx(now - 20)
    assert s["sensors"]["temp1"]["aggregate"] == {
        "kind": "aggregate", "value": 21.5, "time": pytest.approx(now - 15), "data": agg,
    }  # fmt: skip
    assert s["sensors"]["hum1"]["last_value"] == 40 and s["sensors"]["hum1"]["aggregate"] is None
    assert [a["id"] for a in s["alerts"]] == [f"{LOG}:alerts:{q}" for q in range(25, 5, -1)]
    assert s["alerts"][0]["kind"] == "alert.raised" and s["alerts"][1]["kind"] == "alert.cleared"
    assert s["alerts"][0]["data"] == {"rule": "hot", "threshold": 30}
    assert s["alerts"][0]["sensor"] == "temp1" and s["alerts"][0]["value"] == 55.0
    assert s["faults"] == FAULTS_OFF
    assert s["mqtt"] is None


async def test_empty_summary(server: CloudServer, session: aiohttp.ClientSession) -> None:
    async with session.get(f"{server.url}/api/summary") as resp:
        s = await resp.json()
    assert (s["total"], s["streams"], s["sensors"], s["alerts"]) == (0, {}, {}, [])
    assert s["upstream_lag"] is None and s["last_received_at"] is None


async def test_cli_cloud_subprocess(tmp_path: Path, session: aiohttp.ClientSession) -> None:
    db = tmp_path / "cli.db"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulator.cli", "cloud", "--port", "0", "--db", str(db),
        "--token", "t0k",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode()
        assert first.startswith("LISTENING http://127.0.0.1:"), first
        url = first.split()[1]
        assert int(url.rsplit(":", 1)[1]) > 0
        status, reply = await post(
            session, f"{url}/ingest", readings(range(1, 4)), {"Authorization": "Bearer t0k"}
        )
        assert (status, reply) == (200, {"accepted": 3, "duplicates": 0})
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    with CloudStore(db) as store:
        assert store.count("readings") == 3


# --- faults ----------------------------------------------------------------------------------


async def control(
    session: aiohttp.ClientSession, server: CloudServer, **switches: Any
) -> dict[str, Any]:
    status, reply = await post(session, f"{server.url}/control", switches)
    assert status == 200, reply
    return dict(reply)


async def injected(session: aiohttp.ClientSession, server: CloudServer) -> dict[str, int]:
    async with session.get(f"{server.url}/api/summary") as resp:
        return dict((await resp.json())["injected"])


async def test_throttle_answers_429_with_retry_after(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    ingest = f"{server.url}/ingest"
    reply = await control(session, server, throttle_rate=1, retry_after=7)
    assert reply == {**FAULTS_OFF, "throttle_rate": 1.0, "retry_after": 7.0}
    for retry_after, header in ((7, "7"), (0.25, "0.25")):
        await control(session, server, retry_after=retry_after)
        async with session.post(ingest, json=readings(range(1, 3))) as resp:
            assert resp.status == 429
            assert resp.headers["Retry-After"] == header
            assert "throttle_rate" in (await resp.json())["error"]
    with CloudStore(server.db_path) as store:
        assert store.count() == 0
    await control(session, server, throttle_rate=0)
    assert (await post(session, ingest, readings(range(1, 3))))[0] == 200
    assert (await injected(session, server))["throttle"] == 2


async def test_latency_and_jitter_delay_every_answer(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with CloudServer(tmp_path / "cloud.db", latency=0.2, jitter=0.1, seed=1) as srv:
        elapsed = []
        for seq in range(1, 4):
            started = time.monotonic()
            # The session's timeout is the deadline; the delay is measured, not waited for.
            status, _ = await post(session, f"{srv.url}/ingest", readings(range(seq, seq + 1)))
            assert status == 200
            elapsed.append(time.monotonic() - started)
        assert all(0.2 <= e < 0.3 + 1.0 for e in elapsed), elapsed
        assert len({round(e, 3) for e in elapsed}) > 1  # jitter: not all alike
        await control(session, srv, latency=0, jitter=0)
        started = time.monotonic()
        assert (await post(session, f"{srv.url}/ingest", readings(range(9, 10))))[0] == 200
        assert time.monotonic() - started < 0.2
        assert (await injected(session, srv))["delayed"] == 3


async def test_dropped_connection_after_the_body_is_stored(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    ingest = f"{server.url}/ingest"
    await control(session, server, drop_rate=1)
    with pytest.raises((aiohttp.ServerDisconnectedError, aiohttp.ClientOSError)):
        await post(session, ingest, readings(range(1, 4)))
    with CloudStore(server.db_path) as store:
        # No answer went out, but the batch was committed: the resend is all duplicates.
        assert store.count() == 3
        await control(session, server, drop_rate=0)
        assert await post(session, ingest, readings(range(1, 4))) == (
            200,
            {"accepted": 0, "duplicates": 3},
        )
        assert store.count() == 3 and store.duplicates() == 3
    assert (await injected(session, server))["drop"] == 1


async def test_down_for_comes_back_by_itself(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    ingest = f"{server.url}/ingest"
    reply = await control(session, server, down_for=0.4)
    assert reply["down"] is True and 0 < reply["down_for"] <= 0.4
    assert (await post(session, ingest, readings(range(1, 2))))[0] == 503

    async def up() -> bool:
        return (await post(session, ingest, readings(range(1, 2))))[0] == 200

    await eventually(up, within=DEADLINE, interval=0.05, what="the endpoint to come back")
    async with session.get(f"{server.url}/control") as resp:
        assert await resp.json() == FAULTS_OFF
    # `down` ends a schedule; `down_for: 0` is "up now".
    await control(session, server, down_for=60)
    assert (await control(session, server, down=True))["down_for"] is None
    await control(session, server, down_for=60)
    assert (await control(session, server, down_for=0))["down"] is False


async def test_faults_given_at_start_are_reported(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with CloudServer(
        tmp_path / "cloud.db", fail_rate=0.1, lose_ack_rate=0.2, throttle_rate=0.3,
        retry_after=2, latency=0.01, jitter=0.02, drop_rate=0.4, down_for=30,
    ) as srv:  # fmt: skip
        async with session.get(f"{srv.url}/api/summary") as resp:
            faults = (await resp.json())["faults"]
        assert faults == {
            "down": True, "down_for": pytest.approx(30, abs=DEADLINE), "fail_rate": 0.1,
            "lose_ack_rate": 0.2, "throttle_rate": 0.3, "retry_after": 2.0, "latency": 0.01,
            "jitter": 0.02, "drop_rate": 0.4,
        }  # fmt: skip
    for bad in (
        {"drop_rate": 2},
        {"throttle_rate": -1},
        {"latency": -1},
        {"retry_after": math.inf},
    ):
        with pytest.raises(ValueError):
            CloudServer(tmp_path / "x.db", **bad)


@pytest.mark.parametrize("inflight", [1, 4])
async def test_the_agent_gets_everything_through_every_fault_exactly_once(
    tmp_path: Path, inflight: int
) -> None:
    from agent.config import HttpUpstreamConfig, LogConfig
    from agent.events import Reading, Stream
    from agent.log import EventLog
    from agent.upstream_http import HttpUpstream

    cfg = HttpUpstreamConfig.model_validate({
        "type": "http", "name": "c", "url": "http://unset", "batch_size": 50, "linger": 0,
        "timeout": DEADLINE, "backoff_initial": 0.01, "backoff_max": 0.1,
        "max_inflight": inflight,
    })  # fmt: skip
    async with (
        CloudServer(
            tmp_path / "cloud.db", fail_rate=0.1, throttle_rate=0.15, retry_after=0.05,
            drop_rate=0.2, lose_ack_rate=0.1, latency=0.002, jitter=0.005, seed=7,
        ) as cloud,
        EventLog.open(tmp_path / "events.db", LogConfig(commit_interval=0)) as event_log,
    ):  # fmt: skip
        now, mono = time.time(), time.monotonic()
        await event_log.append(
            [Reading("t", float(i), None, now, now, mono, "x") for i in range(600)]
        )
        up = HttpUpstream(cfg.model_copy(update={"url": f"{cloud.url}/ingest"}), "test")
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(event_log, stop))
        await eventually(
            lambda: event_log.cursor(up.consumer, Stream.READINGS) == 600,
            within=20, what="delivery",
        )  # fmt: skip
        stop.set()
        await asyncio.wait_for(task, DEADLINE)
        log_id = event_log.log_id
        counts = cloud.injected.as_dict()
    # One request at a time, the seeded draws fall on the same requests every run: each fault
    # comes. Several in flight, which request takes which draw depends on timing.
    kinds = ("fail", "throttle", "drop", "lose_ack")
    assert all(counts[k] > 0 for k in kinds) if inflight == 1 else sum(counts.values()) > 0, counts
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids("readings") == {f"{log_id}:readings:{i}" for i in range(1, 601)}
        assert store.count() == 600
        # Every batch stored and then left unanswered came again and was dropped by id.
        assert store.duplicates() >= 50 * (counts["drop"] + counts["lose_ack"]) - 50


# --- MQTT ------------------------------------------------------------------------------------


def publish(port: int, topic: str, *payloads: bytes) -> None:
    """Publish with QoS 1 and return once the broker has each message (blocking: a thread)."""
    import paho.mqtt.publish

    paho.mqtt.publish.multiple(
        [{"topic": topic, "payload": p, "qos": 1} for p in payloads],
        hostname="127.0.0.1",
        port=port,
    )


async def test_mqtt_ingest_stores_and_dedupes(
    tmp_path: Path, broker: Broker, session: aiohttp.ClientSession
) -> None:
    prefix = f"edge-{tmp_path.name}"
    sub = MqttSubscription(broker.url, (f"{prefix}/#",))
    async with CloudServer(tmp_path / "cloud.db", mqtt=sub) as srv:
        body = json.dumps(readings(range(1, 6))).encode()
        await asyncio.to_thread(publish, broker.port, f"{prefix}/pi-1/readings", body)
        with CloudStore(srv.db_path) as store:
            await eventually(lambda: store.count() == 5, within=DEADLINE, what="5 stored")
            alert = event(
                "alerts", 1, "alert.raised", sensor="temp1", value=36.0, data={"rule": "hot"}
            )
            await asyncio.to_thread(
                publish, broker.port, f"{prefix}/pi-1/alerts",
                body,  # the same batch again: every event a duplicate
                json.dumps(alert).encode(),  # one event alone
                b"{not json",
                json.dumps({"log_id": LOG, "events": 3}).encode(),
                json.dumps({**alert, "id": f"{LOG}:alerts:2"}).encode(),  # seq says 1
            )  # fmt: skip

            async def all_seen() -> bool:
                return (await srv.summary())["mqtt"]["messages"] == 6

            await eventually(all_seen, within=DEADLINE, what="6 messages handled")
            assert store.count() == 6 and store.count("alerts") == 1
            assert store.duplicates() == 5
            stored = store.events("alerts")[0]
            assert (stored["id"], stored["log_id"], stored["value"]) == (
                f"{LOG}:alerts:1",
                LOG,
                36.0,
            )
            # One path for both: what came over MQTT is a duplicate over HTTP.
            assert await post(session, f"{srv.url}/ingest", readings(range(1, 6))) == (
                200,
                {"accepted": 0, "duplicates": 5},
            )
        mqtt = (await srv.summary())["mqtt"]
    assert mqtt == {
        "url": broker.url, "topics": [f"{prefix}/#"], "connected": True, "messages": 6,
        "accepted": 6, "duplicates": 5, "rejected": 3, "last_error": mqtt["last_error"],
    }  # fmt: skip
    assert "is not <log_id>" in mqtt["last_error"]


async def test_mqtt_messages_sent_while_the_cloud_is_stopped_arrive_when_it_is_back(
    tmp_path: Path, broker: Broker
) -> None:
    prefix = f"edge-{tmp_path.name}"
    db = tmp_path / "cloud.db"
    sub = MqttSubscription(broker.url, (f"{prefix}/#",))
    async with CloudServer(db, mqtt=sub):
        pass  # the broker now keeps a session for this database's client id
    await asyncio.to_thread(
        publish, broker.port, f"{prefix}/r", json.dumps(readings(range(1, 4))).encode()
    )
    async with CloudServer(db, mqtt=sub):
        with CloudStore(db) as store:
            await eventually(lambda: store.count() == 3, within=DEADLINE, what="the backlog")


async def test_mqtt_reconnects_after_the_broker_restarts(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    own = make_broker()
    sub = MqttSubscription(own.url, ("edge/#",))
    async with CloudServer(tmp_path / "cloud.db", mqtt=sub) as srv:

        async def connected(state: bool) -> bool:
            return bool((await srv.summary())["mqtt"]["connected"]) is state

        await asyncio.to_thread(own.stop)
        await eventually(lambda: connected(False), within=DEADLINE, what="the disconnect")
        await asyncio.to_thread(own.start)  # the same port, no session kept: subscribe again
        await eventually(lambda: connected(True), within=DEADLINE, what="the reconnect")
        await asyncio.to_thread(
            publish, own.port, "edge/x", json.dumps(readings(range(1, 3))).encode()
        )
        with CloudStore(srv.db_path) as store:
            await eventually(lambda: store.count() == 2, within=DEADLINE, what="stored")


async def test_unreachable_broker_fails_the_start(tmp_path: Path) -> None:
    sub = MqttSubscription(f"mqtt://127.0.0.1:{free_port()}", ("edge/#",))
    server = CloudServer(tmp_path / "cloud.db", mqtt=sub, mqtt_timeout=0.5)
    with pytest.raises(CloudError, match="cannot connect"):
        await server.start()
    with pytest.raises(RuntimeError):
        server.url  # noqa: B018 (not listening)
    for url in ("http://127.0.0.1:1883", "mqtt://", "mqtt://h:99999"):
        with pytest.raises(ValueError):
            MqttSubscription(url)


async def test_cli_cloud_faults_and_mqtt(
    tmp_path: Path, broker: Broker, session: aiohttp.ClientSession
) -> None:
    db = tmp_path / "cli.db"
    prefix = f"edge-{tmp_path.name}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "simulator.cli", "cloud", "--port", "0", "--db", str(db),
        "--throttle-rate", "1", "--retry-after", "3", "--latency", "0.01", "--jitter", "0.01",
        "--drop-rate", "0.5", "--mqtt-url", broker.url, "--mqtt-topic", f"{prefix}/#",
        "--mqtt-topic", "other/#",
        cwd=REPO, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 10.0)).decode()
        assert first.startswith("LISTENING http://127.0.0.1:"), first
        url = first.split()[1]
        async with session.post(f"{url}/ingest", json=readings(range(1, 2))) as resp:
            assert resp.status == 429 and resp.headers["Retry-After"] == "3"
        async with session.get(f"{url}/control") as resp:
            assert await resp.json() == {
                **FAULTS_OFF, "throttle_rate": 1.0, "retry_after": 3.0, "latency": 0.01,
                "jitter": 0.01, "drop_rate": 0.5,
            }  # fmt: skip
        await asyncio.to_thread(
            publish, broker.port, f"{prefix}/r", json.dumps(readings(range(1, 4))).encode()
        )
        with CloudStore(db) as store:
            await eventually(lambda: store.count() == 3, within=DEADLINE, what="mqtt ingest")
        async with session.get(f"{url}/") as resp:
            assert resp.status == 200 and "sensor-plot" in await resp.text()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), DEADLINE) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--drop-rate", "2"], "drop_rate must be within [0, 1]"),
        (["--latency", "-1"], "latency must be >= 0"),
        (["--mqtt-url", "http://x"], "mqtt://host:port"),
        (["--mqtt-topic", "a/#"], "--mqtt-topic needs --mqtt-url"),
        (["--sync", "sometimes"], "use one of full, normal, off"),
    ],
)
def test_cli_cloud_bad_options(args: list[str], message: str) -> None:
    from typer.testing import CliRunner

    from simulator.cli import app

    result = CliRunner().invoke(app, ["cloud", "--port", "0", *args])
    assert result.exit_code == 2
    assert message in result.output


@pytest.mark.parametrize(("sync", "pragma"), [("full", 2), ("normal", 1), ("off", 0)])
async def test_sync_sets_how_durable_a_200_is(
    tmp_path: Path, session: aiohttp.ClientSession, sync: str, pragma: int
) -> None:
    """`--sync` (benchmarks) only changes the fsync: the batch is stored and deduped as ever."""
    async with CloudServer(tmp_path / "cloud.db", sync=sync) as srv:
        conn = srv._conn
        assert conn is not None  # the pragma is the connection's, read on its own thread
        assert await srv._db(lambda: conn.execute("PRAGMA synchronous").fetchone()[0]) == pragma
        assert await post(session, f"{srv.url}/ingest", readings(range(1, 4))) == (
            200, {"accepted": 3, "duplicates": 0}
        )  # fmt: skip
        assert await post(session, f"{srv.url}/ingest", readings(range(3, 5))) == (
            200, {"accepted": 1, "duplicates": 1}
        )  # fmt: skip
    with pytest.raises(ValueError, match="sync must be one of"):
        CloudServer(tmp_path / "other.db", sync="sometimes")


async def test_a_batch_is_stored_as_if_event_by_event(
    server: CloudServer, session: aiohttp.ClientSession
) -> None:
    """Ids twice in one batch, readings out of event-time order, aggregates and readings of
    one sensor in one batch: the tallies are those of storing each event in turn."""
    t = 1_764_170_000.0
    body = batch(
        event("readings", 1, sensor="s", value=1.0, unit="C", time=t + 5),
        event("readings", 2, sensor="s", value=2.0, unit="F", time=t + 1),  # older: not "last"
        event("readings", 1, sensor="s", value=1.0, unit="C", time=t + 5),  # the same id again
        event("readings", 3, sensor="s", value=3.0, unit="K", time=t + 5),  # a tie: the later
        event("aggregates", 1, "aggregate", sensor="s", value=9.0, time=t + 2, data={"w": 1}),
        event("aggregates", 2, "aggregate", sensor="s", value=8.0, time=t + 1, data={"w": 2}),
        event("agent", 1, "agent.started"),
    )
    assert await post(session, f"{server.url}/ingest", body) == (
        200, {"accepted": 6, "duplicates": 1}
    )  # fmt: skip
    with CloudStore(server.db_path) as store:
        summary = store.summary()
        assert summary["streams"] == {"agent": 1, "aggregates": 2, "readings": 3}
        assert summary["duplicates"] == 1
        sensor = summary["sensors"]["s"]
        assert (sensor["count"], sensor["last_value"], sensor["unit"]) == (3, 3.0, "K")
        assert sensor["last_time"] == t + 5
        assert sensor["aggregate"]["value"] == 9.0 and sensor["aggregate"]["data"] == {"w": 1}
    # An older reading arriving later (a backlog) counts but does not become "last".
    late = batch(event("readings", 4, sensor="s", value=4.0, unit="C", time=t))
    assert (await post(session, f"{server.url}/ingest", late))[0] == 200
    with CloudStore(server.db_path) as store:
        sensor = store.summary()["sensors"]["s"]
        assert (sensor["count"], sensor["last_value"]) == (4, 3.0)


async def test_requests_in_flight_at_once_are_each_answered_as_alone(tmp_path: Path) -> None:
    """The agent keeps several requests in flight, each on a keep-alive connection of its own:
    each body is parsed and stored whole, its duplicates counted against what came before it
    (whichever that was), and a bad body among them is answered 400 with the reason."""
    bodies = [
        wire(body_of([plain(s, sensor=f"s{s % 3}") for s in range(100 * k + 1, 100 * k + 151)]))
        for k in range(8)
    ]  # each overlaps the next by 50 readings
    bad = b'{"log_id":"4f1c:log","agent":"pi-1","sent_at":1,"events":[{"id"'
    with pytest.raises(ValueError) as not_json:
        json.loads(bad)
    connector = aiohttp.TCPConnector(limit=4)
    async with (
        CloudServer(tmp_path / "cloud.db") as srv,
        aiohttp.ClientSession(connector=connector) as session,
    ):
        url = f"{srv.url}/ingest"
        replies = await asyncio.gather(
            *(post(session, url, gzip.compress(b), {"Content-Encoding": "gzip"}) for b in bodies),
            post(session, url, bad),
        )
    assert replies[-1] == (400, {"error": f"body is not JSON: {not_json.value}"})
    assert {status for status, _ in replies[:-1]} == {200}
    assert all(r["accepted"] + r["duplicates"] == 150 for _, r in replies[:-1])
    assert sum(r["accepted"] for _, r in replies[:-1]) == 850
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids() == {f"{FAST_LOG}:readings:{s}" for s in range(1, 851)}
        assert store.duplicates() == 8 * 150 - 850
        summary = store.summary()
        assert summary["batches"] == 8
        assert sum(s["count"] for s in summary["sensors"].values()) == 850


# --- the fast path for plain readings ------------------------------------------------------
#
# `parse_body` takes a body of plain readings (the agent's wire form) apart with one regular
# expression, and `store` inserts it with multi-row statements. Both exist only to be cheaper:
# for any body, what is stored, every tally, the answer and any error must be those of the
# general path, `parse_batch(json.loads(body))` and `store_batch`.

FAST_LOG = "4f1c:log"  # a colon in the log id: the id's `<log_id>:readings:<seq>` still parses
T0 = 1_764_170_000.25


def wire(doc: Any, *, compact: bool = True, ascii_only: bool = True) -> bytes:
    """A body as the agent writes it (compact, keys in order) or as any other client might."""
    seps = (",", ":") if compact else (", ", ": ")
    return json.dumps(doc, separators=seps, ensure_ascii=ascii_only).encode()


def plain(seq: int, sensor: str = "temp1", unit: str | None = "C", **extra: Any) -> dict[str, Any]:
    """A plain reading in the agent's key order (`Event.to_wire`)."""
    ev: dict[str, Any] = {
        "id": f"{FAST_LOG}:readings:{seq}", "stream": "readings", "seq": seq, "kind": "reading",
        "time": T0 + seq / 8, "recv_time": T0 + 1.5, "sensor": sensor, "value": 20.0 + seq / 4,
    }  # fmt: skip
    if unit is not None:
        ev["unit"] = unit
    ev.update(extra)
    return ev


def body_of(events: list[dict[str, Any]], **head: Any) -> dict[str, Any]:
    return {"log_id": FAST_LOG, "agent": "pi-1", "sent_at": T0 + 2, "events": events, **head}


def dump(conn: sqlite3.Connection) -> str:
    """Every table, with each value's storage class: the repr tells 1 from 1.0 and 0.0 from -0.0."""
    tables = {}
    for table in ("events", "counters", "streams", "sensors", "deliveries"):
        cur = conn.execute(f"SELECT * FROM {table} ORDER BY rowid")
        tables[table] = [tuple((v, type(v).__name__) for v in row) for row in cur]
    return repr(tables)


def outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return "ok", fn()
    except Exception as e:  # a 400 (BatchError, not JSON), or what the store raises
        return type(e).__name__, str(e)


class Twins:
    """Two fresh endpoint databases: one fed through `parse_body` and `store` (the fast path
    where it applies), one through the general path only."""

    def __init__(self, root: Path | None = None) -> None:
        self.fast = connect(root / "fast.db" if root else ":memory:", create=True, sync="off")
        self.general = connect(root / "general.db" if root else ":memory:", create=True, sync="off")
        self.received_at = T0 + 10

    def send(self, body: bytes) -> tuple[str, Any]:
        """Store one body both ways; both must end alike. Returns the outcome."""
        self.received_at += 1
        at = self.received_at
        fast = outcome(lambda: store(self.fast, parse_body(body), at))
        general = outcome(lambda: store_batch(self.general, parse_batch(json.loads(body)), at))
        assert fast == general, body
        return fast

    def same(self) -> None:
        assert dump(self.fast) == dump(self.general)

    def close(self) -> None:
        self.fast.close()
        self.general.close()


@pytest.fixture
def twins(tmp_path: Path) -> Iterator[Twins]:
    t = Twins(tmp_path)
    yield t
    t.close()


def test_the_agents_bodies_take_the_fast_path() -> None:
    from agent.events import Event
    from agent.upstream import WireEncoder, batch_body

    events = [
        Event("readings", seq, "reading", T0 + seq, T0 + 1, 0.0, sensor, 20.5 + seq, unit)
        for seq, sensor, unit in ((1, "temp1", "C"), (2, "count", None), (3, "hum1", "%"))
    ]
    text = "[" + ",".join(WireEncoder(FAST_LOG).events(events)) + "]"
    batch = parse_body(batch_body(FAST_LOG, "pi-1", text))
    assert isinstance(batch, ReadingBatch)
    assert batch.as_batch() == parse_batch(json.loads(batch_body(FAST_LOG, "pi-1", text)))
    assert list(batch.units) == ["C", None, "%"]


@pytest.mark.parametrize(
    "events",
    [
        [plain(1)],
        [plain(s) for s in range(1, 130)],  # one full statement and one row more
        [plain(s, sensor=f"s{s % 3}", unit=None if s % 2 else "C") for s in range(1, 300)],
        [plain(3), plain(1), plain(2, time=T0 + 3 / 8)],  # out of time order, with a tie
        [plain(1, sensor=""), plain(2, value=-0.0, time=0.0, recv_time=-1e-7)],
        [plain(1, value=1e16), plain(2, value=1.7976931348623157e99), plain(3, value=5e-324)],
        [plain(1, value=21, time=1764170000), plain(2, recv_time=-0)],  # json's ints: floats
    ],
    ids=["one", "129", "mixed-units", "unordered", "edges", "magnitudes", "ints"],
)
@pytest.mark.parametrize("ascii_only", [True, False])
def test_plain_readings_are_parsed_fast_and_stored_as_the_general_path_stores_them(
    twins: Twins, events: list[dict[str, Any]], ascii_only: bool
) -> None:
    events = [{**e, "sensor": f"{e['sensor']}-ü"} for e in events] if not ascii_only else events
    body = wire(body_of(events), ascii_only=ascii_only)
    assert isinstance(parse_body(body), ReadingBatch)
    assert parse_message(body) == parse_body(body)  # MQTT messages take it too
    assert twins.send(body) == ("ok", (len(events), 0))
    twins.same()


@pytest.mark.parametrize("log_id", ["a.b+c(d)[e]$^{1}|", "x:readings:1", "", "a\\"])
def test_any_log_id_is_matched_as_text(twins: Twins, log_id: str) -> None:
    events = [plain(s) | {"id": f"{log_id}:readings:{s}"} for s in (1, 2)]
    body = wire(body_of(events, log_id=log_id))
    assert isinstance(parse_body(body), ReadingBatch) is ("\\" not in log_id)  # json escapes it
    assert twins.send(body) == ("ok", (2, 0))
    twins.same()


def test_duplicates_take_the_general_path_with_the_same_result(twins: Twins) -> None:
    first = wire(body_of([plain(s) for s in range(1, 11)]))
    assert twins.send(first) == ("ok", (10, 0))
    again = [
        ([plain(s) for s in range(1, 11)], (0, 10)),  # a resend: the first id is known
        ([plain(s) for s in range(8, 15)], (4, 3)),  # the first id is known, the last is not
        ([plain(s) for s in range(20, 26)] + [plain(5)], (6, 1)),  # only the last is known
        ([plain(30), plain(31), plain(31), plain(32)], (3, 1)),  # an id twice in the body
        ([plain(40), plain(9), plain(41)], (2, 1)),  # a known id in the middle
    ]
    for events, result in again:
        body = wire(body_of(events))
        assert isinstance(parse_body(body), ReadingBatch)
        assert twins.send(body) == ("ok", result)
    twins.same()


# Bodies the fast path must leave to the general path: each ends there as it always did.
ODD_BODIES: dict[str, bytes] = {
    "spaced": wire(body_of([plain(1)]), compact=False),
    "null unit": wire(body_of([plain(1, unit=None) | {"unit": None}])),
    "null value": wire(body_of([plain(1, value=None)])),
    "no sensor": wire(body_of([{k: v for k, v in plain(1).items() if k != "sensor"}])),
    "data": wire(body_of([plain(1, data={"x": 1})])),
    "raw": wire(body_of([plain(1, raw="t=1")])),
    "escaped sensor": wire(body_of([plain(1, sensor='te"mp\\1')])),
    "escaped unicode": wire(body_of([plain(1, sensor="température")])),
    "control char": wire(body_of([plain(1, sensor="a\tb")])),
    "aggregate": wire(body_of([plain(1), plain(2, kind="aggregate")])),
    "other stream": wire(body_of([plain(1) | {"stream": "alerts"}])),
    "keys reordered": wire(body_of([dict(reversed(list(plain(1).items())))])),
    "extra key": wire(body_of([plain(1, note="x")])),
    "no agent": wire({k: v for k, v in body_of([plain(1)]).items() if k != "agent"}),
    "null agent": wire(body_of([plain(1)], agent=None)),
    "head reordered": wire({"agent": "pi-1", **body_of([plain(1)])}),
    "more keys": wire(body_of([plain(1)], z=1)),
    "empty": wire(body_of([])),
    "trailing space": wire(body_of([plain(1)])) + b" ",
    "huge exponent": wire(body_of([plain(1)])).replace(b'"value":20.25', b'"value":1e400'),
    "long mantissa": wire(body_of([plain(1)])).replace(b"20.25", b"1" + b"0" * 320),
    "NaN": wire(body_of([plain(1)])).replace(b'"value":20.25', b'"value":NaN'),
    "Infinity": wire(body_of([plain(1)])).replace(b'"time":', b'"time":-Infinity,"x":'),
    "leading zero": wire(body_of([plain(1)])).replace(b'"value":20.25', b'"value":020.25'),
    # The times are matched loosely (any run of number characters) and checked afterwards.
    "huge exponent time": wire(body_of([plain(1)])).replace(b":1764170000.375,", b":1e400,"),
    "leading zero time": wire(body_of([plain(1)])).replace(
        b":1764170000.375,", b":01764170000.375,"
    ),
    "plus time": wire(body_of([plain(1)])).replace(b":1764170000.375,", b":+1764170000.375,"),
    "dot-ended recv_time": wire(body_of([plain(1)])).replace(b":1764170001.75,", b":1764170001.,"),
    "odd time later": wire(body_of([plain(1), plain(2)])).replace(b":1764170000.5,", b":1-5,"),
    "trailing comma": wire(body_of([plain(1), plain(2)])).replace(b"}]}", b"},]}"),
    "two arrays": wire(body_of([plain(1)])).replace(b"}]}", b'}],"events":[]}'),
    "negative zero seq": wire(body_of([plain(0)])).replace(b'"seq":0', b'"seq":-0'),
    "seq as float": wire(body_of([plain(1)])).replace(b'"seq":1,', b'"seq":1.0,'),
    "bool seq": wire(body_of([plain(1) | {"seq": True}])),
    "negative seq": wire(body_of([plain(-1)])),
    "huge seq": wire(body_of([plain(10**19)])),
    "other log id": wire(body_of([plain(1)], log_id="other")),
    "log id as a pattern": wire(body_of([plain(1)], log_id="4f1c.log")),  # `.` is no wildcard
    "id with another seq": wire(body_of([plain(1) | {"seq": 2}])),
    "leading-zero id": wire(body_of([plain(1, id=f"{FAST_LOG}:readings:01")])),
    "not an object": wire(body_of([plain(1), 7])),
    "not json": b'{"log_id":"4f1c:log","agent":"pi-1","sent_at":1,"events":[{"id"',
    "bad utf-8": wire(body_of([plain(1)])).replace(b"temp1", b"temp\xff"),
    "utf-8 bom": b"\xef\xbb\xbf" + wire(body_of([plain(1)])),
}


@pytest.mark.parametrize("name", list(ODD_BODIES))
def test_odd_and_invalid_bodies_end_as_on_the_general_path(twins: Twins, name: str) -> None:
    body = ODD_BODIES[name]
    assert _plain_readings(body) is None
    twins.send(body)
    twins.send(body)  # again: all duplicates, or the same error
    twins.send(wire(body_of([plain(s) for s in range(1, 6)])))  # plain readings after it
    twins.same()


# Hypothesis: bodies of readings, most plain, some with one field made odd, rendered as the
# agent does or otherwise; sent in turn (overlapping seqs: duplicates) to both databases.
_texts = st.text(
    st.characters(max_codepoint=0x2FF) | st.sampled_from("\u2028\ud7ff\U0001f600"), max_size=6
)
_floats = st.floats(allow_nan=False, allow_infinity=False) | st.sampled_from(
    [0.0, -0.0, 1e-7, 5e-324, 1e16, 1.5e300, T0, T0 + 0.1]
)
_ODD_VALUES = st.sampled_from(
    [None, 7, -3, True, "21.5", math.nan, math.inf, -math.inf, 10**20, [1], {"a": 1}, ""]
)


@st.composite
def _reading_events(draw: st.DrawFn, seq: int) -> dict[str, Any]:
    def pick(usual: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> Any:
        return draw(other if draw(st.integers(0, 4)) == 0 else usual)

    ev = plain(
        seq,
        sensor=pick(st.sampled_from(["temp1", "hum1", "a:b", "", "ü"]), _texts),
        unit=pick(st.sampled_from(["C", None, "%"]), _texts),
        time=pick(st.sampled_from([T0, T0 + 1]) | st.floats(T0 - 5, T0 + 5), _floats),
        recv_time=pick(st.just(T0 + 2), _floats),
        value=pick(st.floats(-1e6, 1e6), _floats),
    )
    if draw(st.integers(0, 30)) == 0:  # one field made odd: a missing, extra or wrong value
        key = draw(st.sampled_from([*ev, "data", "raw", "extra"]))
        if draw(st.booleans()):
            ev.pop(key, None)
        else:
            ev[key] = draw(_ODD_VALUES | _texts | _floats)
    return ev


@st.composite
def _bodies(draw: st.DrawFn) -> list[bytes]:
    out = []
    for _ in range(draw(st.integers(1, 4))):
        first = draw(st.integers(0, 12))
        seqs = range(first, first + draw(st.integers(1, 12)))
        events = [draw(_reading_events(seq)) for seq in seqs]
        if draw(st.integers(0, 3)) == 0:
            events = draw(st.permutations(events))
        body = body_of(events)
        if draw(st.integers(0, 20)) == 0:
            body[draw(st.sampled_from(["log_id", "agent", "sent_at"]))] = draw(_ODD_VALUES)
        compact = draw(st.integers(0, 9)) > 0
        out.append(wire(body, compact=compact, ascii_only=draw(st.booleans())))
    return out


@settings(max_examples=200, deadline=None)
@given(bodies=_bodies())
def test_any_body_ends_alike_on_both_paths(bodies: list[bytes]) -> None:
    twins = Twins()
    try:
        for body in bodies:
            hypothesis.event("fast" if _plain_readings(body) is not None else "general")
            twins.send(body)
        twins.same()
    finally:
        twins.close()


async def test_compact_and_spaced_bodies_end_alike_over_http(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    """The agent's compact bodies take the fast path, the same with spaces the general one;
    gzipped or not, the endpoints answer and store alike, and show the same summary."""
    bodies = [
        body_of([plain(s, sensor=f"s{s % 3}", unit=None if s % 4 else "C") for s in range(1, 200)]),
        body_of([plain(s, sensor=f"s{s % 3}") for s in range(150, 260)]),  # duplicates
        body_of([plain(s) for s in range(300, 310)][::-1]),  # out of time order
        body_of([plain(400), plain(401, kind="aggregate")]),
    ]
    replies, summaries, stored = [], [], []
    for compact in (True, False):
        async with CloudServer(tmp_path / f"{compact}.db", clock=lambda: T0 + 60) as srv:
            sent = []
            for i, body in enumerate(bodies):
                data = wire(body, compact=compact)
                if i % 2:
                    data = gzip.compress(data)
                headers = {"Content-Encoding": "gzip"} if i % 2 else {}
                sent.append(await post(session, f"{srv.url}/ingest", data, headers))
            replies.append(sent)
            with CloudStore(srv.db_path) as db:
                summaries.append(db.summary(now=T0 + 61))
                stored.append(db.events())
    expected = [
        (200, {"accepted": 199, "duplicates": 0}),
        (200, {"accepted": 60, "duplicates": 50}),
        (200, {"accepted": 10, "duplicates": 0}),
        (200, {"accepted": 2, "duplicates": 0}),
    ]
    assert replies == [expected, expected]
    assert repr(summaries[0]) == repr(summaries[1])
    assert repr(stored[0]) == repr(stored[1])
