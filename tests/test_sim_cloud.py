"""The local cloud ingestion endpoint, started for real on a free port and spoken to over HTTP."""

from __future__ import annotations

import asyncio
import gzip
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from simulator.cloud import CloudServer, CloudStore

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 5.0
LOG = "log-a"


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
    assert await post(session, control, {"down": True}) == (
        200,
        {"down": True, "fail_rate": 0.0, "lose_ack_rate": 0.0},
    )
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
    for bad in ({"down": "yes"}, {"fail_rate": 2}, {"explode": True}, [1]):
        status, reply = await post(session, control, bad)
        assert status == 400 and reply["error"]
    async with session.get(control) as resp:
        assert await resp.json() == {"down": False, "fail_rate": 0.0, "lose_ack_rate": 0.0}


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
    assert s["faults"] == {"down": False, "fail_rate": 0.0, "lose_ack_rate": 0.0}


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
