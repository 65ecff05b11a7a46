"""The HTTP upstream against real servers: the simulator's endpoint (with its faults), small
aiohttp apps for what it does not do (refusals, TLS), and a socket that never answers."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.config import ConfigError, HttpUpstreamConfig, LogConfig, parse_config
from agent.events import Event, NewEvent, Reading, Rejected, Stream
from agent.log import EventLog
from agent.upstream import Upstream, WireEncoder
from agent.upstream_http import HttpUpstream, parse_retry_after
from simulator.cloud import CloudServer, CloudStore
from tests.conftest import eventually, free_port, make_pki
from tests.test_httpclient import Conn, RawServer


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


async def fill(log: EventLog, readings: int, sensor: str = "t", start: float = 0.0) -> None:
    now, mono = time.time(), time.monotonic()
    await log.append(
        [Reading(sensor, start + i, None, now, now, mono, "x") for i in range(readings)]
    )


async def alert(log: EventLog, sensor: str, severity: str, kind: str = "alert.raised") -> None:
    now = time.time()
    data = {"alert_id": f"r:{sensor}:1", "rule": "r", "severity": severity}
    await log.append(
        events={Stream.ALERTS: [NewEvent(kind, now, now, 0.0, sensor, 1.0, None, data)]}
    )


class Running:
    """Upstreams running on a log until the block ends (then stopped, within a deadline)."""

    def __init__(self, log: EventLog, *ups: Upstream) -> None:
        self.log, self.ups = log, ups
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> Running:
        self.tasks = [asyncio.create_task(u.run(self.log, self.stop)) for u in self.ups]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop.set()
        await asyncio.wait_for(asyncio.gather(*self.tasks), 10)


def caught_up(log: EventLog, up: Any) -> Callable[[], bool]:
    return lambda: all(log.cursor(up.consumer, s) == log.head(s) for s in up.streams)


@dataclass
class Endpoint:
    """A small ingestion app of the test's own: `answer(batch)` gives the status for a batch;
    what it stores (on 2xx) is kept by id, with every request's time and body size."""

    answer: Callable[[dict[str, Any]], int | tuple[int, dict[str, str]]] = lambda b: 200
    ssl_context: ssl.SSLContext | None = None
    ids: set[str] = field(default_factory=set)
    requests: list[tuple[float, int, int]] = field(default_factory=list)  # (time, status, bytes)
    url: str = ""
    _runner: web.AppRunner | None = None

    async def __aenter__(self) -> Endpoint:
        app = web.Application()
        app.router.add_post("/ingest", self._ingest)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", port, ssl_context=self.ssl_context).start()
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://127.0.0.1:{port}/ingest"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _ingest(self, request: web.Request) -> web.Response:
        raw = await request.read()
        body = json.loads(raw)
        answer = self.answer(body)
        status, headers = answer if isinstance(answer, tuple) else (answer, {})
        self.requests.append((time.monotonic(), status, len(raw)))
        if 200 <= status < 300:
            self.ids.update(e["id"] for e in body["events"])
        return web.json_response({"status": status}, status=status, headers=headers)


@contextlib.asynccontextmanager
async def serving(
    ingest: Callable[[web.Request], Awaitable[web.Response]], release: asyncio.Event
) -> AsyncIterator[str]:
    """An app of the test's own answering POST /ingest with `ingest`, holding requests as the
    test says; its url. `release` is set on the way out: a handler still held would hold the
    cleanup for its shutdown timeout."""
    app = web.Application()
    app.router.add_post("/ingest", ingest)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}/ingest"
    finally:
        release.set()
        await runner.cleanup()


async def hanging_server() -> tuple[asyncio.Server, str]:
    """Accepts connections, reads, and never answers: a hung endpoint."""

    async def hang(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            pass
        writer.close()

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}/ingest"


def log_cfg() -> LogConfig:
    return LogConfig(commit_interval=0)


# --------------------------------------------------------------------------- lanes, retries


async def test_alerts_first_and_deadletter_not_starved_by_a_steady_flow(tmp_path: Path) -> None:
    async with (
        CloudServer(tmp_path / "cloud.db") as cloud,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 3000)
        now = time.time()
        await log.append([Rejected(b"junk", "invalid_json", "x", "x", now, 0.0)])
        await log.append(
            events={Stream.ALERTS: [NewEvent("alert.raised", now, now, 0.0, "t", 99.0)]}
        )
        up = upstream(cloud.url + "/ingest")
        async with Running(log, up):
            await eventually(
                lambda: log.cursor(up.consumer, Stream.READINGS) == 3000, what="delivery"
            )
    with CloudStore(tmp_path / "cloud.db") as store:
        order = [e["stream"] for e in store.events()]
    assert order[0] == "alerts"
    # The dead-letter lane is last in priority, yet it went out while readings were waiting.
    assert order.index("deadletter") < order.index("readings") + 100 * 5
    assert order.count("readings") == 3000


async def test_retries_until_acknowledged_and_dedupes(tmp_path: Path) -> None:
    async with CloudServer(tmp_path / "cloud.db", fail_rate=0.3, lose_ack_rate=0.3, seed=3) as cloud, \
            EventLog.open(tmp_path / "e.db", log_cfg()) as log:  # fmt: skip
        await fill(log, 1000)
        up = upstream(cloud.url + "/ingest", gzip=False)
        async with Running(log, up):
            await eventually(
                lambda: log.cursor(up.consumer, Stream.READINGS) == 1000, what="delivery"
            )
        assert up.status.failures > 0 and "HTTP 500" in (up.status.last_error or "")
        log_id = log.log_id
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids("readings") == {f"{log_id}:readings:{i}" for i in range(1, 1001)}
        assert store.duplicates() > 0


async def test_unreachable_endpoint_keeps_everything(tmp_path: Path) -> None:
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 10)
        up = upstream(f"http://127.0.0.1:{free_port()}/ingest")
        async with Running(log, up):
            await eventually(lambda: up.status.failures >= 3, what="retries")
        assert log.cursor(up.consumer, Stream.READINGS) == 0
        assert "Connect" in (up.status.last_error or "")


async def test_dropped_connections_and_latency_lose_nothing(tmp_path: Path) -> None:
    """The endpoint stores a batch, then drops the connection without answering (or answers
    slower than the timeout): the batch comes again and the endpoint drops it by id."""
    async with CloudServer(tmp_path / "cloud.db", drop_rate=0.3, latency=0.01, jitter=0.2,
                           seed=5) as cloud, \
            EventLog.open(tmp_path / "e.db", log_cfg()) as log:  # fmt: skip
        await fill(log, 300)
        up = upstream(cloud.url + "/ingest", batch_size=50, timeout=0.15)
        async with Running(log, up):
            await eventually(caught_up(log, up), within=20, what="delivery")
        log_id, injected = log.log_id, cloud.injected.as_dict()
    assert injected["drop"] > 0 and injected["delayed"] > 0
    errors = up.status.last_error or ""
    assert up.status.failures >= injected["drop"]
    assert "closed the connection" in errors or "no answer within 0.15s" in errors
    with CloudStore(tmp_path / "cloud.db") as store:
        assert store.event_ids("readings") == {f"{log_id}:readings:{i}" for i in range(1, 301)}
        assert store.duplicates() > 0


async def test_a_hanging_connection_is_timed_out_not_waited_on(tmp_path: Path) -> None:
    server, url = await hanging_server()
    async with server, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 10)
        up = upstream(url, timeout=0.2)
        t0 = time.monotonic()
        async with Running(log, up):
            await eventually(lambda: up.status.failures >= 3, within=5, what="timeouts")
        assert time.monotonic() - t0 < 3
        assert up.status.last_error == "no answer within 0.2s (timeout)"
        assert log.cursor(up.consumer, Stream.READINGS) == 0


async def test_429_and_503_wait_as_long_as_retry_after_asks(tmp_path: Path) -> None:
    answers = iter([(429, {"Retry-After": "0.5"}), (503, {"Retry-After": "0.3"})])
    async with (
        Endpoint(lambda b: next(answers, 200)) as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 5)
        up = upstream(endpoint.url, backoff_max=1.0)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery")
    (t1, s1, _), (t2, s2, _), (t3, s3, _) = endpoint.requests
    assert (s1, s2, s3) == (429, 503, 200)
    # The backoff alone (20 ms, doubling) would have come back far sooner.
    assert t2 - t1 >= 0.49 and t3 - t2 >= 0.29
    assert up.status.deadlettered == 0


def test_retry_after_as_seconds_or_an_http_date() -> None:
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("0.25") == 0.25
    assert parse_retry_after(None) is None
    assert parse_retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 28 <= (parse_retry_after(later) or 0) <= 31


async def test_a_wrong_token_is_retried_not_deadlettered(tmp_path: Path) -> None:
    async with (
        CloudServer(tmp_path / "cloud.db", token="right") as cloud,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 10)
        up = upstream(cloud.url + "/ingest", token="wrong")
        async with Running(log, up):
            await eventually(lambda: up.status.failures >= 3, what="retries")
        assert log.cursor(up.consumer, Stream.READINGS) == 0
        assert log.head(Stream.DEADLETTER) == 0
        assert (up.status.last_error or "").startswith("HTTP 401 (check the token)")


async def test_events_dropped_before_they_were_sent_are_passed_over(tmp_path: Path) -> None:
    """Every reading aged out before the upstream got to them: the cursor moves past the
    hole (the gap event that says so goes up) instead of waiting for events that are gone."""
    async with (
        Endpoint() as endpoint,
        EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0, max_age=60)) as log,
    ):
        old = time.time() - 3600
        await log.append([Reading("t", float(i), None, old, old, 0.0, "x") for i in range(50)])
        up = upstream(endpoint.url, name="late")
        await log.register(up.consumer, up.streams)
        await log.enforce_retention()
        assert log.tail(Stream.READINGS) == 51
        async with Running(log, up):
            await eventually(caught_up(log, up), what="the hole passed over")
        log_id = log.log_id
    assert endpoint.ids == {f"{log_id}:agent:1"}


# --------------------------------------------------------------------------- refusals


async def test_a_poisoned_event_is_isolated_and_deadlettered(tmp_path: Path) -> None:
    def answer(batch: dict[str, Any]) -> int:
        return 400 if any(e.get("value") == 13.0 for e in batch["events"]) else 200

    async with (
        Endpoint(answer) as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 100)
        up = upstream(endpoint.url, streams=["readings", "deadletter"])
        async with Running(log, up):
            await eventually(caught_up(log, up), what="every batch handled")
        (record,) = await log.read(Stream.DEADLETTER, 0)
        log_id = log.log_id
    poisoned = f"{log_id}:readings:14"
    sent = {i for i in endpoint.ids if ":readings:" in i}
    assert sent == {f"{log_id}:readings:{i}" for i in range(1, 101)} - {poisoned}
    assert record.kind == "deadletter"
    assert record.data is not None
    assert {k: record.data[k] for k in ("reason", "upstream", "status", "stream")} == {
        "reason": "upstream_rejected",
        "upstream": "c",
        "status": 400,
        "stream": "readings",
    }
    assert (record.data["first_seq"], record.data["last_seq"], record.data["count"]) == (14, 14, 1)
    assert "400" in record.data["response"]
    assert up.status.deadlettered == 1
    # The record itself went upstream, in the deadletter lane.
    assert f"{log_id}:deadletter:1" in endpoint.ids


async def test_other_4xx_deadletter_the_batch_once_and_move_on(tmp_path: Path) -> None:
    async with (
        Endpoint(lambda b: 404) as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 30)
        up = upstream(endpoint.url, batch_size=10)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="every batch handled")
            await eventually(lambda: log.head(Stream.DEADLETTER) == 3, what="3 records")
            await eventually(caught_up(log, up), what="the records handled")
        records = await log.read(Stream.DEADLETTER, 0)
    # The refused dead-letter records themselves are not dead-lettered again (no loop).
    assert [(r.data or {}).get("count") for r in records] == [10, 10, 10]
    assert [(r.data or {}).get("first_seq") for r in records] == [1, 11, 21]
    assert up.status.deadlettered == 33
    assert not endpoint.ids


async def test_max_bytes_bounds_every_body(tmp_path: Path) -> None:
    async with (
        Endpoint() as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 200)
        up = upstream(endpoint.url, max_bytes="4KiB", gzip=False, batch_size=1000)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery")
        log_id = log.log_id
    assert endpoint.ids == {f"{log_id}:readings:{i}" for i in range(1, 201)}
    sizes = [size for _, _, size in endpoint.requests]
    assert len(sizes) > 5 and max(sizes) <= 4096
    assert min(sizes[:-1]) > 4096 * 0.8, "batches are filled up to the bound"


# --------------------------------------------------------------------------- routing


async def test_routing_by_sensor_and_severity_moves_the_cursor_past_what_it_leaves(
    tmp_path: Path,
) -> None:
    async with (
        Endpoint() as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        for i in range(5):
            await fill(log, 10, sensor="board.t1", start=i * 10)
            await fill(log, 10, sensor="lan.h1", start=i * 10)
        await alert(log, "board.t1", "warning")
        await alert(log, "board.t1", "critical")
        await alert(log, "lan.h1", "critical")
        await log.append(events={Stream.AGENT: [NewEvent("gap", 1.0, 1.0, 0.0)]})
        up = upstream(endpoint.url, sensors=["board.*"], severities=["critical"], batch_size=7)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="every event handled")
        log_id = log.log_id
        readings = await log.read(Stream.READINGS, 0, 1000)
    wanted = {f"{log_id}:readings:{e.seq}" for e in readings if e.sensor == "board.t1"}
    assert {i for i in endpoint.ids if ":readings:" in i} == wanted
    assert {i for i in endpoint.ids if ":alerts:" in i} == {f"{log_id}:alerts:2"}
    # Events without a sensor (a gap) always pass the sensor globs.
    assert f"{log_id}:agent:1" in endpoint.ids
    assert up.status.filtered == 50 + 2
    assert log.cursor(up.consumer, Stream.ALERTS) == 3


async def test_requests_overlap_up_to_max_inflight_and_cursors_wait_for_the_oldest(
    tmp_path: Path,
) -> None:
    """Three requests go at once; the first is held while the two after it are answered:
    the cursor stays before the first, no fourth request goes while the oldest is
    unanswered, and once it is answered the rest follows, each batch sent once."""
    release = asyncio.Event()
    three_in = asyncio.Event()
    inside = most = 0
    firsts: list[int] = []
    stored: set[str] = set()

    async def ingest(request: web.Request) -> web.Response:
        nonlocal inside, most
        body = json.loads(await request.read())
        first = body["events"][0]["seq"]
        firsts.append(first)
        inside += 1
        most = max(most, inside)
        if inside == 3:
            three_in.set()
        try:
            await (release if first == 1 else three_in).wait()
        finally:
            inside -= 1
        stored.update(e["id"] for e in body["events"])
        return web.json_response({})

    async with serving(ingest, release) as url, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 100)
        up = upstream(url, batch_size=10, max_inflight=3)
        async with Running(log, up):
            await eventually(lambda: len(stored) == 20, what="the 2nd and 3rd answered")
            assert sorted(firsts) == [1, 11, 21]
            assert log.cursor(up.consumer, Stream.READINGS) == 0
            # Nothing to await for an absence: watch a moment for a 4th request.
            await asyncio.sleep(0.2)
            assert len(firsts) == 3 and up.status.inflight == 3
            assert log.cursor(up.consumer, Stream.READINGS) == 0
            release.set()
            await eventually(caught_up(log, up), what="delivery")
        log_id = log.log_id
    assert stored == {f"{log_id}:readings:{i}" for i in range(1, 101)}
    assert sorted(firsts) == list(range(1, 101, 10)), "each batch once"
    assert most == 3 and up.status.max_inflight == 3
    assert up.status.sent == 100 and up.status.failures == 0


async def test_nothing_goes_while_alerts_are_in_flight(tmp_path: Path) -> None:
    """Requests may be answered in any order, so an alert could be stored after readings sent
    behind it: while an alert's request is unanswered, no other goes."""
    release = asyncio.Event()
    arrived: list[str] = []

    async def ingest(request: web.Request) -> web.Response:
        body = json.loads(await request.read())
        stream = body["events"][0]["stream"]
        arrived.append(stream)
        if stream == "alerts":
            await release.wait()
        return web.json_response({})

    async with serving(ingest, release) as url, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 100)
        await alert(log, "t", "critical")
        up = upstream(url, batch_size=10, max_inflight=4)
        async with Running(log, up):
            await eventually(lambda: arrived == ["alerts"], what="the alert first")
            # Nothing to await for an absence: watch a moment for a reading's request.
            await asyncio.sleep(0.2)
            assert arrived == ["alerts"] and up.status.inflight == 1
            release.set()
            await eventually(caught_up(log, up), what="delivery")
    assert arrived == ["alerts"] + ["readings"] * 10
    assert up.status.max_inflight > 1, "the readings did go several at once"


async def test_a_failure_amid_requests_in_flight_resends_from_the_oldest_unanswered(
    tmp_path: Path,
) -> None:
    """The second of several requests in flight fails once: the ones answered around it are
    kept, everything from the failed batch on is sent again, and nothing is lost."""
    failed: list[int] = []

    def answer(batch: dict[str, Any]) -> int:
        first = batch["events"][0]["seq"]
        if first == 11 and not failed:
            failed.append(first)
            return 503
        return 200

    async with Endpoint(answer) as ep, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 100)
        up = upstream(ep.url, batch_size=10, max_inflight=4)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery")
        log_id = log.log_id
    assert failed == [11]
    assert ep.ids == {f"{log_id}:readings:{i}" for i in range(1, 101)}
    assert up.status.failures == 1 and up.status.sent == 100
    statuses = [status for _, status, _ in ep.requests]
    assert statuses.count(503) == 1 and statuses.count(200) >= 10


async def test_one_upstream_hanging_never_delays_another(tmp_path: Path) -> None:
    """Three upstreams on one log: a hung one (timeout far longer than the test), one for
    everything and one for alerts only. The two that work deliver as if alone."""
    server, hung_url = await hanging_server()
    async with (
        server,
        CloudServer(tmp_path / "all.db") as everything,
        CloudServer(tmp_path / "alerts.db") as alerts_only,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        hung = upstream(hung_url, name="hung", timeout=60)
        full = upstream(everything.url + "/ingest", name="full")
        alerting = upstream(alerts_only.url + "/ingest", name="alerting", streams=["alerts"])
        async with Running(log, hung, full, alerting):
            t0 = time.monotonic()
            for _ in range(4):
                await fill(log, 500)
                await alert(log, "t", "critical")
            await eventually(caught_up(log, full), within=10, what="the full upstream")
            await eventually(caught_up(log, alerting), within=10, what="the alerts upstream")
            took = time.monotonic() - t0
            assert log.cursor(hung.consumer, Stream.READINGS) == 0
            assert log.cursor(hung.consumer, Stream.ALERTS) == 0
    assert took < 5, f"the working upstreams took {took:.1f}s"
    with CloudStore(tmp_path / "all.db") as store:
        assert store.count("readings") == 2000 and store.count("alerts") == 4
    with CloudStore(tmp_path / "alerts.db") as store:
        assert store.count() == store.count("alerts") == 4


# --------------------------------------------------------------------------- the connection

NO_CONTENT = b"HTTP/1.1 204 No Content\r\n\r\n"


async def test_batches_share_a_connection_and_an_idle_close_costs_no_failure(
    tmp_path: Path,
) -> None:
    """The endpoint (a load balancer with a short idle timeout, say) closes each connection
    after two answers, just as the third request arrives: the upstream sends it again on a
    new connection, without counting a failure or waiting out a backoff."""
    stored: set[str] = set()

    async def script(conn: Conn) -> None:
        for _ in range(2):
            request = await conn.request()
            if request is None:
                return
            stored.update(e["id"] for e in json.loads(request.body)["events"])
            await conn.send(NO_CONTENT)
        await conn.request()
        conn.writer.close()

    async with RawServer(script) as server, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 100)
        up = upstream(
            server.url,
            batch_size=10,
            gzip=False,
            backoff_initial=5,
            backoff_max=5,
            max_inflight=1,  # one connection at a time, so the closes are the server's
        )
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery")
        log_id = log.log_id
    assert stored == {f"{log_id}:readings:{i}" for i in range(1, 101)}
    assert up.status.failures == 0 and up.status.batches == 10
    assert server.accepts == 5
    assert len(server.requests) == 10 + 4, "each request the closing connections took, again"


async def test_a_malformed_answer_is_retried_and_says_what_was_wrong(tmp_path: Path) -> None:
    answers = iter([b"HTTP/1.1 200 OK\r\nContent-Length: lots\r\n\r\n"])

    async def script(conn: Conn) -> None:
        while await conn.request() is not None:
            await conn.send(next(answers, NO_CONTENT))

    async with RawServer(script) as server, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 10)
        up = upstream(server.url)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery")
    assert up.status.failures == 1
    assert up.status.last_error == "a malformed answer: an invalid Content-Length 'lots'"


async def test_a_header_that_would_inject_fields_is_an_error_not_a_request(
    tmp_path: Path,
) -> None:
    async with Endpoint() as endpoint, EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 10)
        up = upstream(endpoint.url)
        # The config refuses such a header at load (test_config.py); the client is the last
        # line of defence for a config that was built without validation.
        up.cfg = up.cfg.model_copy(update={"headers": {"X-Device": "pi-1\r\nX-Admin: yes"}})
        async with Running(log, up):
            await eventually(lambda: up.status.failures >= 2, what="retries")
        assert log.cursor(up.consumer, Stream.READINGS) == 0
    assert (up.status.last_error or "").startswith("upstream c: header X-Device: the value")
    assert not endpoint.requests


# --------------------------------------------------------------------------- HTTPS


@dataclass
class Pki:
    ca_file: Path
    other_ca_file: Path
    client_cert: Path
    client_key: Path
    contexts: dict[str, ssl.SSLContext]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA and server certificates made by the test (trustme): good, for another host, and
    expired; the good server wants a client certificate from the same CA."""
    certs = make_pki(tmp_path_factory.mktemp("https-pki"))
    contexts = {
        "good": certs.server_context("127.0.0.1", "localhost", client_cert=True),
        "wrong-name": certs.server_context("other.example"),
        "expired": certs.server_context("127.0.0.1", "localhost", expired=True),
    }
    return Pki(certs.ca_file, certs.other_ca_file, certs.cert_file, certs.key_file, contexts)


async def test_https_with_a_private_ca_and_a_client_certificate(tmp_path: Path, pki: Pki) -> None:
    async with (
        Endpoint(ssl_context=pki.contexts["good"]) as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 50)
        up = upstream(
            endpoint.url,
            ca_file=str(pki.ca_file),
            cert_file=str(pki.client_cert),
            key_file=str(pki.client_key),
            headers={"X-Device": "pi-1"},
            token="secret",
        )
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery over TLS")
        assert len(endpoint.ids) == 50


@pytest.mark.parametrize(
    ("server", "ca", "client_cert", "expected"),
    [
        ("good", "other", True, "server certificate refused: self-signed certificate in "),
        ("wrong-name", "ca", True, "does not name the host of the url"),
        ("expired", "ca", True, "certificate has expired (the server's certificate is out of"),
        ("good", "ca", False, "does the server require a client certificate? set cert_file"),
    ],
)
async def test_https_refuses_what_it_cannot_trust_and_keeps_everything(
    tmp_path: Path, pki: Pki, server: str, ca: str, client_cert: bool, expected: str
) -> None:
    async with (
        Endpoint(ssl_context=pki.contexts[server]) as endpoint,
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 10)
        tls: dict[str, object] = {"ca_file": str(pki.ca_file if ca == "ca" else pki.other_ca_file)}
        if client_cert:
            tls |= {"cert_file": str(pki.client_cert), "key_file": str(pki.client_key)}
        up = upstream(endpoint.url.replace("127.0.0.1", "localhost"), **tls)
        async with Running(log, up):
            await eventually(lambda: up.status.failures >= 2, what="refusals")
        assert log.cursor(up.consumer, Stream.READINGS) == 0
        assert len(await log.read(Stream.READINGS, 0)) == 10
    assert expected in (up.status.last_error or ""), up.status.last_error
    assert not endpoint.ids


# --------------------------------------------------------------------------- the wire


@settings(max_examples=300, deadline=None)
@given(
    seq=st.integers(min_value=1, max_value=2**62),
    sensor=st.text(max_size=12),
    unit=st.none() | st.text(max_size=4),
    value=st.floats(allow_nan=False, allow_infinity=False),
    times=st.tuples(st.floats(allow_nan=False), st.floats(allow_nan=False)),
)
# Numbers below 1e-4, which orjson writes otherwise than repr, and one that only looks so.
@example(seq=7, sensor="a", unit=None, value=1.5e-05, times=(1.0, 2.0))
@example(seq=7, sensor="a", unit=None, value=-3e-07, times=(1.0, 2.0))
@example(seq=7, sensor="a", unit=None, value=10.00001, times=(1.0, 2.0))
def test_the_fast_encoder_writes_what_json_dumps_writes(
    seq: int, sensor: str, unit: str | None, value: float, times: tuple[float, float]
) -> None:
    encoder = WireEncoder("3e1a48afd96a")
    for time_, recv in (times, (times[1], times[1]), (-0.0, 0.0), (0.0, -0.0)):
        event = Event("readings", seq, "reading", time_, recv, 0.0, sensor, value, unit)
        expected = json.dumps(event.to_wire("3e1a48afd96a"), separators=(",", ":"))
        assert encoder.event(event) == expected
        assert encoder.event(event).isascii()


def test_values_orjson_cannot_format_are_written_as_json_dumps_writes_them() -> None:
    """A value orjson refuses (an integer beyond 64 bits; readings are floats, but an event
    may come from elsewhere) sends the whole batch the repr way, still exact."""
    events = [
        Event("readings", 1, "reading", 1.0, 1.0, 0.0, "t", 1.5),
        Event("readings", 2, "reading", 1.0, 1.0, 0.0, "t", 2**70),  # type: ignore[arg-type]
    ]
    expected = [json.dumps(e.to_wire("L"), separators=(",", ":")) for e in events]
    assert WireEncoder("L").events(events) == expected


_few_floats = st.sampled_from([0.0, -0.0, 1.5, 1764212345.123456, float("inf")])


@settings(max_examples=150, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["readings", "aggregates"]),
            st.sampled_from(["reading", "aggregate"]),
            st.sampled_from(["t", "h", 'q"1', "é"]),
            st.sampled_from([None, "C", "%"]),
            st.floats(allow_nan=False) | _few_floats,
            _few_floats,
            _few_floats,
            st.none() | st.just({"window": "1m"}),
        ),
        max_size=40,
    )
)
# A device time that changes while the receive time stays, then the other way round.
@example(
    [
        ("readings", "reading", "t", "C", 2.5, 1.5, 1764212345.123456, None),
        ("readings", "reading", "t", "C", 2.5, 1764212345.123456, 1764212345.123456, None),
        ("readings", "reading", "t", "C", 2.5, 1764212345.123456, 1.5, None),
    ]
)
def test_a_run_of_events_encodes_as_each_alone_would(
    rows: list[tuple[str, str, str, str | None, float, float, float, dict[str, str] | None]],
) -> None:
    """Within one call the times and each sensor's parts are reused while they hold: events
    of several sensors, shared and changing times, and some the slow way, in any order."""
    events = [
        Event(stream, seq, kind, t, recv, 0.0, sensor, value, unit, data)
        for seq, (stream, kind, sensor, unit, value, t, recv, data) in enumerate(rows, 1)
    ]
    expected = [json.dumps(e.to_wire("3e1a"), separators=(",", ":")) for e in events]
    assert WireEncoder("3e1a").events(events) == expected


def test_config_errors_of_upstreams_name_the_field() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(
            "inputs:\n"
            "  - {type: mqtt, name: lan, client_id: pi-out}\n"
            "upstreams:\n"
            "  - {type: http, name: a, url: 'http://x/i', ca_file: /ca.pem}\n"
            "  - {type: mqtt, name: b, url: 'mqtt://h', topic: 'x/{sensor}'}\n"
            "  - {type: mqtt, name: c, url: 'mqtt://h', token: t, username: u}\n"
            "  - {type: http, name: 'd e', url: 'https://x/i', sensors: [], retry_status: [503]}\n"
            "  - {type: http, name: f, url: 'https://x/i', keepalive: 30}\n"
        )
    messages = [f"{i.path}: {i.message}" for i in err.value.issues]
    assert messages[:6] == [
        "upstreams[0]: ca_file is a TLS option: the url must start with https://",
        "upstreams[1]: topic: format batch has no {sensor} (it has {agent}, {log_id}, {stream})",
        "upstreams[2]: token is sent as the username: give token or username/password",
        "upstreams[3].name: name may use letters, digits, '_', '.' and '-' (not first)",
        'upstreams[3].sensors: cannot be empty (leave it out, or write "*", for all sensors)',
        "upstreams[3].retry_status: 503 is not a 4xx status (5xx are always retried)",
    ]
    assert messages[6].startswith("upstreams[4].keepalive: unknown key (known keys: name,")
    with pytest.raises(ConfigError) as err:
        parse_config(
            "inputs:\n"
            "  - {type: mqtt, name: lan, client_id: pi-out}\n"
            "upstreams:\n"
            "  - {type: mqtt, name: out, url: 'mqtt://h', client_id: pi-out}\n"
        )
    (issue,) = err.value.issues
    assert issue.path == "upstreams[0].client_id" and "also used by input 'lan'" in issue.message
