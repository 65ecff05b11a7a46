"""The simulator's feed and outputs: pacing, bursts, outages, device clocks, the record, stdout,
a real pty that vanishes and comes back, and MQTT against a real mosquitto."""

from __future__ import annotations

import asyncio
import errno
import itertools
import json
import os
import select
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from typer.testing import CliRunner

from simulator.cli import app
from simulator.outputs import Feed, MqttOutput
from simulator.profiles import MqttOutputConfig
from simulator.record import Recorder
from simulator.serial_port import SerialOutput, VirtualSerialPort
from simulator.signals import (
    ClockStep,
    DeviceClock,
    Line,
    LineFault,
    LineFaults,
    LineGenerator,
    Recurring,
    parse_sensors,
)
from tests.conftest import Broker, eventually

REPO = Path(__file__).resolve().parent.parent
DEADLINE = 10.0
START = 1_764_170_000.0


class ListOutput:
    """An output that keeps what it is given, with the monotonic time of each write."""

    name = "list"

    def __init__(self) -> None:
        self.writes: list[tuple[float, list[Line]]] = []
        self.events: list[tuple[str, float]] = []

    @property
    def lines(self) -> list[Line]:
        return [line for _, lines in self.writes for line in lines]

    async def open(self) -> None:
        pass

    async def write(self, lines: Sequence[Line], data: bytes) -> Sequence[Line]:
        assert data == b"".join(line.data for line in lines)
        self.writes.append((time.monotonic(), list(lines)))
        return lines

    async def interrupt(self) -> int:
        self.events.append(("interrupt", time.monotonic()))
        return 0

    async def resume(self) -> None:
        self.events.append(("resume", time.monotonic()))

    async def finish(self, within: float) -> None:
        pass

    async def close(self) -> None:
        pass


def generator(rate: float = 100.0, **kw: Any) -> LineGenerator:
    return LineGenerator(parse_sensors("temp1,hum1"), rate=rate, seed=1, **kw)


async def test_real_time_feed_paces_lines_and_stamps_them_with_their_due_time() -> None:
    out = ListOutput()
    t0, wall0 = time.monotonic(), time.time()
    stats = await asyncio.wait_for(Feed(out, generator(200.0), count=100).run(), DEADLINE)
    elapsed = time.monotonic() - t0
    assert stats.lines == 100 and len(out.lines) == 100
    assert 0.45 < elapsed < 2.0  # 100 lines at 200/s
    ts = [line.ts for line in out.lines]
    assert all(b - a == pytest.approx(0.005, abs=1e-6) for a, b in itertools.pairwise(ts))
    assert abs(ts[0] - wall0) < 0.1
    # Each line went out once it was due, not before.
    for written_at, lines in out.writes:
        for line in lines:
            assert written_at - t0 >= line.index / 200.0 - 0.002


async def test_fast_feed_runs_a_duration_of_signal_time_from_start_time() -> None:
    out = ListOutput()
    feed = Feed(out, generator(100.0), duration=30.0, realtime=False, start_time=START)
    stats = await asyncio.wait_for(feed.run(), DEADLINE)
    assert stats.lines == 3000
    assert [line.ts for line in out.lines] == [START + i / 100 for i in range(3000)]


async def test_burst_holds_lines_back_and_sends_them_at_once() -> None:
    out = ListOutput()
    t0 = time.monotonic()
    feed = Feed(out, generator(100.0), count=60, bursts=[Recurring(0.2, 0.25)])
    stats = await asyncio.wait_for(feed.run(), DEADLINE)
    assert stats.lines == 60 and stats.bursts == 1
    held = [(at, lines) for at, lines in out.writes if any(20 <= ln.index < 45 for ln in lines)]
    assert len(held) == 1, "the burst's lines went out in one write"
    at, lines = held[0]
    assert [ln.index for ln in lines] == list(range(20, 45))
    assert at - t0 >= 0.45
    # Stamped when they were sampled, 10 ms apart, not when they were sent.
    assert lines[-1].ts - lines[0].ts == pytest.approx(0.24, abs=1e-6)


async def test_outage_interrupts_the_output_and_skips_what_falls_due() -> None:
    out = ListOutput()
    feed = Feed(
        out,
        generator(100.0),
        duration=2.0,
        realtime=False,
        start_time=START,
        outages=[Recurring(1.0, 0.2)],
    )
    stats = await asyncio.wait_for(feed.run(), DEADLINE)
    assert [e for e, _ in out.events] == ["interrupt", "resume"]
    assert out.events[1][1] - out.events[0][1] >= 0.19  # the outage lasts in wall time too
    indexes = [line.index for line in out.lines]
    assert indexes == [*range(100), *range(120, 200)]
    assert (stats.outages, stats.skipped, stats.lines) == (1, 20, 180)


async def test_device_clock_skew_drift_and_step_change_the_stamped_times() -> None:
    out = ListOutput()
    clock = DeviceClock(offset=-30.0, drift_ppm=1000.0, steps=(ClockStep(5.0, 3600.0),))
    feed = Feed(out, generator(10.0), count=100, realtime=False, start_time=START, clock=clock)
    await asyncio.wait_for(feed.run(), DEADLINE)
    for line in out.lines:
        t = line.index / 10
        expected = START + t - 30.0 + t * 1e-3 + (3600.0 if t >= 5.0 else 0.0)
        assert line.ts == pytest.approx(expected, abs=1e-6)
    jump = [b.ts - a.ts for a, b in itertools.pairwise(out.lines)]
    assert max(jump) == pytest.approx(3600.1, abs=0.01)


async def test_record_holds_every_line_sent_with_its_identity(tmp_path: Path) -> None:
    faults = LineFaults(garble=LineFault(every=10), nan=LineFault(every=7))
    gen = LineGenerator(parse_sensors("temp1,hum1"), rate=50.0, seed=2, faults=faults)
    out = ListOutput()
    db = tmp_path / "sent.db"
    with Recorder(
        db, output="list", fmt="json", seed=2, rate=50.0, sensors=["temp1", "hum1"]
    ) as rec:
        feed = Feed(out, gen, count=500, realtime=False, start_time=START, recorder=rec)
        await asyncio.wait_for(feed.run(), DEADLINE)
    conn = sqlite3.connect(db)
    rows = conn.execute(
        "SELECT seq, sensor, value, ts, fault, output, discarded, run FROM sent ORDER BY seq"
    ).fetchall()
    assert len(rows) == 500
    for row, line in zip(rows, out.lines, strict=True):
        seq, sensor, value, ts, fault, output, discarded, run = row
        assert (seq, sensor, ts, fault, output, discarded, run) == (
            line.index + 1, line.sensor, round(line.ts, 3), line.fault, "list", 0, 1,
        )  # fmt: skip
        if fault is None:
            assert value == line.value
        else:
            assert value is None  # garbage carries none; NaN is stored as NULL
    assert sum(r[4] == "garble" for r in rows) == 50
    (meta,) = conn.execute("SELECT output, format, seed, rate, sensors FROM runs").fetchall()
    assert meta == ("list", "json", 2, 50.0, '["temp1", "hum1"]')


def test_stdout_command_writes_lines_and_records_them(tmp_path: Path) -> None:
    db = tmp_path / "sent.db"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "stdout",
            "--fast",
            "--count",
            "2000",
            "--format",
            "csv",
            "--sensors",
            "temp1,hum1",
            "--record",
            str(db),
            "--fault",
            "nan:every=100",
            "--fault",
            "oversize:every=500,length=2KiB",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines(keepends=True)
    assert len(lines) == 2000
    assert sum(line.split(b",")[1] == b"nan" for line in lines) == 16  # 4 lines are over-long
    assert sum(len(line) == 2048 for line in lines) == 4
    assert b"sent 2000 lines" in proc.stderr
    conn = sqlite3.connect(db)
    assert conn.execute("SELECT count(*), count(fault) FROM sent").fetchone() == (2000, 20)


def test_cli_rejects_a_bad_profile_with_its_position(tmp_path: Path) -> None:
    profile = tmp_path / "sim.yaml"
    profile.write_text("rate: 10\nsensors:\n  - {name: t1, nosie: 1}\n")
    result = CliRunner().invoke(app, ["run", str(profile)])
    assert result.exit_code == 2
    assert f"{profile}:3:16: sensors[0].nosie: unknown key (did you mean 'noise'?)" in result.output


# --------------------------------------------------------------------------- the pty


def read_available(fd: int, until: float) -> tuple[bytes, bool]:
    """Read what comes from `fd` until `until` (monotonic); (bytes, hung up)."""
    buf = b""
    while time.monotonic() < until:
        ready, _, _ = select.select([fd], [], [], 0.02)
        if not ready:
            continue
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            continue
        except OSError as e:
            if e.errno == errno.EIO:
                return buf, True
            raise
        if not chunk:
            return buf, True
        buf += chunk
    return buf, False


async def test_serial_port_vanishes_and_comes_back_behind_the_same_link(tmp_path: Path) -> None:
    link = tmp_path / "ttySIM0"
    port = VirtualSerialPort(link)
    output = SerialOutput(port, outage_drain=0.5)
    await output.open()
    gen = generator(200.0)
    feed = Feed(output, gen, count=200, outages=[Recurring(0.3, 0.4)])
    task = asyncio.create_task(feed.run())
    try:
        fd = os.open(link, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            before, hung_up = await asyncio.to_thread(read_available, fd, time.monotonic() + 5)
        finally:
            os.close(fd)
        assert hung_up, "the reader saw the port vanish"
        await eventually(link.exists, DEADLINE, what="the link to come back")
        fd = os.open(link, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
        try:
            after = b""
            while after.count(b"\n") < 200 - 60 - 80:
                more, _ = await asyncio.to_thread(read_available, fd, time.monotonic() + 0.2)
                after += more
                assert not task.done() or after.count(b"\n") >= 60, "lines after the outage"
        finally:
            os.close(fd)
        stats = await asyncio.wait_for(task, DEADLINE)
    finally:
        task.cancel()
        await output.close()
    sent_before = [json.loads(line) for line in before.splitlines()]
    sent_after = [json.loads(line) for line in after.splitlines()]
    assert len(sent_before) == 60  # t < 0.3 s at 200/s
    assert (stats.outages, stats.skipped, stats.discarded, stats.lines) == (1, 80, 0, 200)
    assert sent_after[0]["ts"] - sent_before[-1]["ts"] == pytest.approx(0.405, abs=0.01)
    assert not link.exists()


async def test_lines_nobody_read_before_an_outage_are_recorded_as_discarded(
    tmp_path: Path,
) -> None:
    port = VirtualSerialPort()
    output = SerialOutput(port, outage_drain=0.1)
    await output.open()
    db = tmp_path / "sent.db"
    with Recorder(db, output="serial", fmt="json", seed=1, rate=100, sensors=["a"]) as rec:
        feed = Feed(output, generator(100.0), count=30, outages=[Recurring(0.2, 0.1)], recorder=rec)
        stats = await asyncio.wait_for(feed.run(), DEADLINE)
        await output.close()
    assert stats.outages == 1 and stats.discarded == 20  # nobody read the first 0.2 s
    conn = sqlite3.connect(db)
    discarded = [s for (s,) in conn.execute("SELECT seq FROM sent WHERE discarded = 1")]
    assert sorted(discarded) == list(range(1, 21))


# --------------------------------------------------------------------------- MQTT


class Subscriber:
    """A paho client on its own thread, keeping every message it gets."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[mqtt.MQTTMessage] = []
        self.lock = threading.Lock()
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{time.time_ns()}")
        self.client.on_message = lambda c, u, m: self._keep(m)
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(DEADLINE)

    def _keep(self, msg: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)

    def got(self) -> list[tuple[str, bytes, bool]]:
        with self.lock:
            return [(m.topic, bytes(m.payload), bool(m.retain)) for m in self.messages]

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def subscriber(broker: Broker, request: pytest.FixtureRequest) -> Iterator[Subscriber]:
    sub = Subscriber(broker, f"sim{request.node.name.__hash__() & 0xFFFF}/#")
    yield sub
    sub.stop()


def topic_root(request: pytest.FixtureRequest) -> str:
    return f"sim{request.node.name.__hash__() & 0xFFFF}"


async def test_mqtt_output_publishes_every_line_on_its_topic(
    broker: Broker, subscriber: Subscriber, request: pytest.FixtureRequest
) -> None:
    root = topic_root(request)
    cfg = MqttOutputConfig(
        type="mqtt", url=broker.url, topic=root + "/{device}/{sensor}", device="d1"
    )
    output = MqttOutput(cfg)
    await output.open()
    gen = generator(500.0, faults=LineFaults(garble=LineFault(every=9)))
    try:
        feed = Feed(output, gen, count=100)
        stats = await asyncio.wait_for(feed.run(), DEADLINE)
        await output.finish(DEADLINE)
    finally:
        await output.close()
    assert stats.lines == 100 and output.acknowledged == 100
    await eventually(lambda: len(subscriber.got()) >= 100, DEADLINE, what="100 messages")
    got = subscriber.got()
    assert len(got) == 100
    for i, (topic, payload, retained) in enumerate(got):
        sensor = ("temp1", "hum1")[i % 2]
        assert topic == f"{root}/d1/{sensor}" and not retained
        if (i + 1) % 9 == 0:
            assert payload == b"#$%^&*"
        else:
            assert json.loads(payload)["sensor"] == sensor


async def test_mqtt_number_payloads_retained(
    broker: Broker, request: pytest.FixtureRequest
) -> None:
    root = topic_root(request)
    cfg = MqttOutputConfig(
        type="mqtt", url=broker.url, topic=root + "/{sensor}", payload="number", retain=True, qos=0
    )
    output = MqttOutput(cfg)
    await output.open()
    gen = generator(100.0)
    try:
        out = Feed(output, gen, count=10, realtime=False, start_time=START)
        await asyncio.wait_for(out.run(), DEADLINE)
        await output.finish(DEADLINE)
    finally:
        await output.close()
    # A subscriber that comes later gets the last value of each sensor, retained.
    late = Subscriber(broker, root + "/#")
    try:
        await eventually(lambda: len(late.got()) >= 2, DEADLINE, what="retained messages")
        got = sorted(late.got())
    finally:
        late.stop()
    expected = sorted(
        (f"{root}/{line.sensor}", repr(line.value).encode(), True)
        for line in (gen.line(i, 0.0) for i in (8, 9))
        if line is not None
    )
    assert got == expected


async def test_mqtt_broker_disconnect_and_reconnect_loses_nothing(
    broker: Broker, subscriber: Subscriber, request: pytest.FixtureRequest
) -> None:
    root = topic_root(request)
    cfg = MqttOutputConfig(type="mqtt", url=broker.url, topic=root + "/{sensor}", qos=1)
    output = MqttOutput(cfg)
    await output.open()
    try:
        feed = Feed(output, generator(200.0), count=120, outages=[Recurring(0.2, 0.2)])
        stats = await asyncio.wait_for(feed.run(), DEADLINE)
        await output.finish(DEADLINE)
    finally:
        await output.close()
    assert stats.outages == 1 and stats.skipped == 40 and stats.lines == 120
    assert output.reconnects == 1

    def distinct() -> list[float]:
        return sorted({json.loads(p)["ts"] for _, p, _ in subscriber.got()})

    await eventually(lambda: len(distinct()) >= 120, DEADLINE, what="120 readings")
    # QoS 1 is at least once: a message whose PUBACK the drop cut off comes again (DUP).
    ts = distinct()
    assert len(ts) == 120
    gaps = [b - a for a, b in itertools.pairwise(ts)]
    assert max(gaps) == pytest.approx(0.205, abs=0.01)  # 40 lines never sent, none lost


def test_mqtt_command_prints_where_it_publishes(
    broker: Broker, subscriber: Subscriber, request: pytest.FixtureRequest
) -> None:
    root = topic_root(request)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulator.cli",
            "mqtt",
            "--url",
            broker.url,
            "--topic",
            root + "/{sensor}",
            "--count",
            "30",
            "--fast",
            "--format",
            "kv",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"PUBLISHING {broker.url} {root}/{{sensor}}"
    deadline = time.monotonic() + DEADLINE
    while len(subscriber.got()) < 30 and time.monotonic() < deadline:
        time.sleep(0.02)
    got = subscriber.got()
    assert len(got) == 30 and all(p.startswith(b"sensor=") for _, p, _ in got)
