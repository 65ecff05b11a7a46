"""Batching as Nagle's algorithm does it: an idle upstream sends what is committed at once, and
a batch behind messages in flight gathers until it is full, an acknowledgement arrives, or it
has waited `linger`. Low rates get low latency; high rates still get big batches."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path

from agent.config import HttpUpstreamConfig, LogConfig
from agent.events import Stream
from agent.log import EventLog
from agent.upstream import Batch, Feed, UpstreamStatus
from simulator.cloud import CloudServer, CloudStore
from tests.conftest import Broker, eventually
from tests.test_upstream_http import Running, alert, fill, upstream
from tests.test_upstream_mqtt import Collector, mqtt_upstream


def feed(linger: float, batch_size: int = 100) -> Feed:
    cfg = HttpUpstreamConfig(
        type="http", name="f", url="http://127.0.0.1:9/x", linger=linger, batch_size=batch_size
    )
    return Feed(cfg, "upstream:f", UpstreamStatus())


async def take(f: Feed, stop: asyncio.Event, wake: asyncio.Event | None = None) -> Batch:
    """The next batch, asking again after each None (as the upstreams do), within 10 s."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        batch = await f.next(stop, wake=wake)
        if batch is not None:
            return batch
    raise AssertionError("no batch within 10s")


# --------------------------------------------------------------------------- the feed alone


async def test_an_idle_upstream_sends_at_once_however_long_linger_is(tmp_path: Path) -> None:
    f, stop = feed(linger=5.0), asyncio.Event()
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        await f.open(log)
        await fill(log, 3)
        t0 = time.monotonic()
        batch = await take(f, stop)
        assert len(batch.events) == 3
        assert time.monotonic() - t0 < 1.0, "nothing in flight: no reason to wait"


async def test_behind_messages_in_flight_a_batch_gathers_until_linger(tmp_path: Path) -> None:
    f, stop = feed(linger=0.4), asyncio.Event()
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        await f.open(log)
        f.status.inflight = 1  # a message is out and not acknowledged
        await fill(log, 1)
        t0 = time.monotonic()
        batch = await take(f, stop)
        assert len(batch.events) == 1
        assert 0.35 <= time.monotonic() - t0 < 2.0, "waited linger, and only linger"


async def test_a_full_batch_goes_at_once_even_with_messages_in_flight(tmp_path: Path) -> None:
    f, stop = feed(linger=5.0, batch_size=10), asyncio.Event()
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        await f.open(log)
        f.status.inflight = 1
        await fill(log, 25)
        t0 = time.monotonic()
        for _ in range(2):
            batch = await take(f, stop)
            assert len(batch.events) == 10
            f.sent(batch)
        assert time.monotonic() - t0 < 1.0, "full batches never wait"
        # The last 5 gather; an acknowledgement wakes the caller, who settles it: now idle.
        wake = asyncio.Event()
        wake.set()
        assert await f.next(stop, wake=wake) is None
        f.status.inflight = 0
        batch = await take(f, stop, wake=asyncio.Event())
        assert len(batch.events) == 5
        assert time.monotonic() - t0 < 1.0, "idle again: the rest went at once"


async def test_the_linger_deadline_holds_across_wake_ups(tmp_path: Path) -> None:
    f, stop = feed(linger=1.0), asyncio.Event()
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        await f.open(log)
        f.status.inflight = 2
        await fill(log, 1)
        t0 = time.monotonic()
        # Woken (one of two messages acknowledged) after half the linger: still busy.
        assert await f.next(stop, wake=asyncio.Event(), within=0.5) is None
        batch = await take(f, stop, wake=asyncio.Event())
        assert len(batch.events) == 1
        assert 0.9 <= time.monotonic() - t0 < 1.4, "the deadline kept, not started again"


async def test_alerts_never_wait_behind_messages_in_flight(tmp_path: Path) -> None:
    f, stop = feed(linger=5.0), asyncio.Event()
    async with EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0)) as log:
        await f.open(log)
        f.status.inflight = 1
        await fill(log, 1)
        pending: asyncio.Task[Batch] = asyncio.create_task(take(f, stop))
        await alert(log, "t", "critical")
        batch = await asyncio.wait_for(pending, 1.0)
        assert batch.stream == Stream.ALERTS


# --------------------------------------------------------------------------- real upstreams


async def test_http_a_lone_reading_does_not_wait_for_linger(tmp_path: Path) -> None:
    async with CloudServer(tmp_path / "cloud.db") as cloud:
        up = upstream(cloud.url + "/ingest", linger=5.0)
        async with (
            EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0.01)) as log,
            Running(log, up),
        ):
            await fill(log, 1)
            with CloudStore(cloud.db_path) as store:
                await eventually(lambda: store.count("readings") == 1, within=2.0)


async def test_http_a_steady_flow_becomes_a_few_requests_a_second(tmp_path: Path) -> None:
    """One request at a time is never in flight when the next batch is asked for: within
    `linger` of the last request the next one gathers, so readings committed 50 times a
    second go out in about 1/linger requests a second, not 50, and none is left behind."""
    linger = 0.3
    async with CloudServer(tmp_path / "cloud.db") as cloud:
        up = upstream(cloud.url + "/ingest", linger=linger, batch_size=10_000)
        async with (
            EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0.0)) as log,
            Running(log, up),
        ):
            start = time.monotonic()
            sent = 0
            while time.monotonic() - start < 1.5:
                await fill(log, 1, start=sent)
                sent += 1
                await asyncio.sleep(0.02)  # a pace, not a wait for a result
            elapsed = time.monotonic() - start
            await eventually(lambda: up.status.sent == sent, within=3.0)
    assert sent >= 40
    assert up.status.batches <= elapsed / linger + 2, (up.status.batches, sent)


async def test_http_a_steady_flow_goes_in_full_batches(tmp_path: Path) -> None:
    """Behind a steady flow each request takes a full batch: what was read ahead after the
    last one (the rest of the commit that filled it) is not sent on its own first."""
    async with CloudServer(tmp_path / "cloud.db") as cloud:
        up = upstream(cloud.url + "/ingest", linger=1.0, batch_size=20)
        async with (
            EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0.0)) as log,
            Running(log, up),
        ):
            sent = 0
            while sent < 210:
                await fill(log, 7, start=sent)  # commits that overshoot a full batch
                sent += 7
                await asyncio.sleep(0.02)  # a pace, not a wait for a result
            await eventually(lambda: up.status.sent >= 210, within=10.0)
    # The first commit goes at once (the upstream was idle), then batches of 20; at most one
    # part-full batch more, at the end.
    assert up.status.batches <= 2 + 210 // 20, up.status.batches


def batch_sizes(messages: list[tuple[str, bytes]]) -> list[int]:
    return [len(json.loads(payload)["events"]) for _, payload in messages]


async def test_mqtt_batches_gather_behind_unacknowledged_messages(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    """A lone reading goes at once; while the broker does not acknowledge (frozen), readings
    committed one by one gather into full batches; the PUBACKs send the rest at once, long
    before the 30 s linger."""
    broker = make_broker()
    collector = Collector(broker, "edge/#")
    up = mqtt_upstream(broker.url, streams=["readings"], batch_size=20, linger=30, timeout=60)
    try:
        async with (
            EventLog.open(tmp_path / "e.db", LogConfig(commit_interval=0.01)) as log,
            Running(log, up),
        ):
            await eventually(lambda: up.status.connected is True)
            await fill(log, 1)
            await eventually(lambda: len(collector.take()) == 1, within=2.0, what="a lone reading")
            broker.freeze()
            try:
                for i in range(50):
                    await fill(log, 1, start=i + 1)  # 50 commits, one reading each
                await eventually(lambda: up.status.inflight >= 3, what="full batches sent")
            finally:
                broker.thaw()
            t0 = time.monotonic()
            await eventually(lambda: up.status.sent == 51, within=10.0)
            assert time.monotonic() - t0 < 5.0, "the PUBACKs, not linger, sent the rest"
            await eventually(lambda: sum(batch_sizes(collector.take())) >= 51)
    finally:
        collector.close()
    sizes = batch_sizes(collector.take())
    assert sizes[0] == 1
    assert sum(sizes) == 51
    assert sizes.count(20) == 2, sizes
    assert len(sizes) <= 6, f"51 readings in {len(sizes)} messages: {sizes}"
