"""Readings/s from the log to each upstream, next to the bare client's rate in the same run.

A log is filled with N readings (a backlog, as after an outage), then drained:

- MQTT: `MqttUpstream` (format `batch`, QoS 1, every message acknowledged) to a real mosquitto
  started here; then a bare paho client (its own network thread, the same window of
  unacknowledged messages) publishes the very same payloads, encoded beforehand.
- HTTP: `HttpUpstream` to the simulator's endpoint (`edge-sim cloud`, its own process, a fresh
  database), `--http-inflight` requests in flight (the upstream's default); then a bare aiohttp
  session posts the same bodies (gzipped beforehand) to a second fresh endpoint, with as many
  requests in flight. The endpoints run with `--sync off` (`--cloud-sync`): with `full` they
  fsync every batch, and that fsync, not the agent, would be the figure (~17-22k readings/s
  here on both sides). The endpoint, a Python process parsing and storing every event, takes
  a core of its own at these rates, so a third phase drains to a null sink (a process that
  reads each request and answers 200 at once): the agent's own ceiling, on the same machine.

Each agent phase is timed from the upstream's start until every reading is acknowledged (PUBACK
or 2xx), so the drain time of the backlog is its seconds; `cpu ms` is this process's CPU time
(event loop and database thread) per 1,000 readings. The ratio agent / bare is how much of what
the client library and the receiver can do the agent keeps.

Then latency at a steady rate, with DEFAULT log and upstream settings (group commit every
100 ms, `linger` 200 ms for MQTT and 1 s for HTTP, `batch_size` 500): readings are submitted
to a fresh log at `--rate` per second for `--seconds`, while each upstream forwards them, to
the same mosquitto (a subscriber here notes each batch's arrival) and to an endpoint with its
default `--sync full` (which notes its own arrival time per event). A reading's latency is
its arrival minus its receive time (when it was handed to the log): the group commit, the
upstream's batching and the transfer. The references are the commit interval, which the log
adds on its own, and the HTTP upstream's linger, the longest a part-full batch waits.

This prints; it never asserts.

    python bench/upstream.py [--readings 1000000] [--http-readings 200000] [--batch 1000]
                             [--inflight 100] [--http-inflight 4] [--cloud-sync off]
                             [--rate 1000] [--seconds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import platform
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp
import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import HttpUpstreamConfig, LogConfig, MqttUpstreamConfig
from agent.daemon import tune_interpreter
from agent.events import Reading, Stream
from agent.log import EventLog
from agent.upstream import Upstream, WireEncoder, batch_body
from agent.upstream_http import HttpUpstream
from agent.upstream_mqtt import MqttUpstream

if __package__ in (None, ""):  # run as a script (`python bench/upstream.py`): find `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.common import cores as _cores
from bench.common import mark as _mark
from bench.common import positive_int as _positive_int

TARGET_RATE = 100_000.0  # readings/s to each upstream, with batching
#: The default settings the latency phase runs with.
MQTT_LINGER: float = MqttUpstreamConfig.model_fields["linger"].default
HTTP_LINGER: float = HttpUpstreamConfig.model_fields["linger"].default
TARGET_DRAIN = 30.0  # seconds for 1,000,000 buffered readings
TARGET_P50 = 0.100  # seconds, at 1,000 readings/s with default settings
AGENT = "bench-pi"
SENSORS = 8


@dataclass(slots=True)
class Phase:
    """One timed drain."""

    name: str
    readings: int
    seconds: float
    messages: int
    cpu_seconds: float | None = None

    @property
    def rate(self) -> float:
        return self.readings / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["readings_per_s"] = round(self.rate, 1)
        out["seconds"] = round(self.seconds, 3)
        if self.cpu_seconds is not None:
            out["cpu_ms_per_1000"] = round(self.cpu_seconds / self.readings * 1e6, 2)
        return out


# --------------------------------------------------------------------------- the backlog


async def fill(path: Path, n: int) -> str:
    """`n` readings in a fresh log, as fast as it takes them; returns the log id."""
    cfg = LogConfig(synchronous="normal", commit_interval=0.05, quota=1024**4)
    now, mono = time.time(), time.monotonic()
    async with EventLog.open(path, cfg) as log:
        for start in range(0, n, 10_000):
            chunk = [
                Reading(f"sensor-{i % SENSORS}", 20.0 + (i % 1000) / 100, "C", now, now, mono, "b")
                for i in range(start, min(n, start + 10_000))
            ]
            await log.submit(chunk)
        await log.append()
        return log.log_id


async def payloads(path: Path, batch: int, n: int) -> list[bytes]:
    """The bodies the upstreams send for the first `n` readings, encoded the same way."""
    out = []
    async with EventLog.open(path, LogConfig(quota=1024**4)) as log:
        encoder = WireEncoder(log.log_id)
        after = 0
        while after < n:
            events = await log.read(Stream.READINGS, after, min(batch, n - after))
            if not events:
                break
            text = "[" + ",".join(encoder.events(events)) + "]"
            out.append(batch_body(log.log_id, AGENT, text))
            after = events[-1].seq
    return out


async def drain(path: Path, up: Upstream, n: int, name: str) -> Phase:
    """Run `up` on the log until it acknowledged `n` readings."""
    async with EventLog.open(path, LogConfig(commit_interval=0.1, quota=1024**4)) as log:
        stop = asyncio.Event()
        cpu0, t0 = time.process_time(), time.perf_counter()
        task = asyncio.create_task(up.run(log, stop))
        while up.status.sent < n:
            if task.done():
                task.result()
                raise RuntimeError(f"{name}: the upstream stopped: {up.status.last_error}")
            await asyncio.sleep(0.002)
        seconds, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        stop.set()
        await task
    return Phase(name, n, seconds, up.status.batches, cpu)


# --------------------------------------------------------------------------- MQTT


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_mosquitto(workdir: Path, extra: str = "") -> tuple[subprocess.Popen[bytes], int]:
    """A mosquitto on a free loopback port (`extra`: more configuration lines)."""
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    root = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\n{root}log_type error\n{extra}"
    )
    proc = subprocess.Popen([binary, "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.02)
    proc.kill()
    raise RuntimeError("mosquitto did not start")


def bare_paho(port: int, bodies: list[bytes], window: int, readings: int) -> Phase:
    """A plain paho client publishing `bodies` at QoS 1, at most `window` unacknowledged."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-bare")
    client.max_inflight_messages_set(window)
    slots = threading.Semaphore(window)
    done = threading.Event()
    acked = [0]

    def on_publish(c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        acked[0] += 1
        slots.release()
        if acked[0] == len(bodies):
            done.set()

    client.on_publish = on_publish
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("bare paho: no CONNACK")
        t0 = time.perf_counter()
        for body in bodies:
            slots.acquire()
            client.publish(f"edge/{AGENT}/readings", body, qos=1)
        if not done.wait(300):
            raise RuntimeError("bare paho: PUBACKs missing")
        seconds = time.perf_counter() - t0
    finally:
        client.disconnect()
        client.loop_stop()
    return Phase("bare paho (same payloads)", readings, seconds, len(bodies))


# --------------------------------------------------------------------------- HTTP


def start_endpoint(db: Path, sync: str = "full") -> tuple[subprocess.Popen[str], str]:
    """`edge-sim cloud` in its own process (its own core), on a free port."""
    return _listening(
        "edge-sim cloud",
        sys.executable,
        *("-m", "simulator.cli", "cloud", "--port", "0", "--db", str(db), "--sync", sync),
    )


def _listening(what: str, *argv: str) -> tuple[subprocess.Popen[str], str]:
    """Start `argv` and read its first line, `LISTENING <url>`: the process and the url."""
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "LISTENING":
        proc.kill()
        raise RuntimeError(f"{what} did not start: {line}")
    return proc, line[1]


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def bare_aiohttp(url: str, bodies: list[bytes], readings: int, inflight: int) -> Phase:
    """A plain aiohttp session posting the gzipped `bodies`, `inflight` requests at a time."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    connector = aiohttp.TCPConnector(limit=inflight)
    todo = iter(bodies)

    async def poster(session: aiohttp.ClientSession) -> None:
        for body in todo:
            async with session.post(url, data=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"bare aiohttp: HTTP {resp.status}")

    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(poster(session) for _ in range(inflight)))
        seconds = time.perf_counter() - t0
    return Phase("bare aiohttp (same bodies)", readings, seconds, len(bodies))


_SINK_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


async def _sink_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            writer.write(_SINK_ANSWER)
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    writer.close()


async def _serve_sink() -> None:
    server = await asyncio.start_server(_sink_connection, "127.0.0.1", 0, limit=1 << 20)
    print(f"LISTENING http://127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


def start_sink() -> tuple[subprocess.Popen[str], str]:
    """A null HTTP sink in its own process: reads each request whole, answers 200 at once."""
    return _listening("the null sink", sys.executable, __file__, "--serve-sink")


# --------------------------------------------------------------------------- latency


@dataclass(slots=True)
class Latency:
    """Readings forwarded at a steady rate, and how long each took to arrive."""

    name: str
    readings: int
    rate: float
    seconds: list[float]

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "readings": self.readings,
            "arrived": len(self.seconds),
            "rate": self.rate,
            **percentiles(self.seconds),
        }


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    """p50, p99 and max of `seconds`, in milliseconds (None when there are none)."""
    if len(seconds) < 2:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    q = statistics.quantiles(seconds, n=100, method="inclusive")
    return {
        "p50_ms": round(q[49] * 1000, 2),
        "p99_ms": round(q[98] * 1000, 2),
        "max_ms": round(max(seconds) * 1000, 2),
    }


async def steady(path: Path, up: Upstream, rate: float, seconds: float) -> int:
    """Submit readings to a fresh log (default settings) at `rate` per second for `seconds`
    while `up` forwards them; return how many, once all are acknowledged."""
    n = max(1, int(rate * seconds))
    async with EventLog.open(path) as log:
        stop = asyncio.Event()
        task = asyncio.create_task(up.run(log, stop))
        try:
            # Warm: connected, and one reading through, before the clock starts.
            await log.submit([_reading("warm-up", 0)])
            await _until(lambda: up.status.sent >= 1, task, 30, up.name)
            t0, sent = time.monotonic(), 0
            while sent < n:
                due = min(n, int((time.monotonic() - t0) * rate) + 1)
                if due > sent:
                    # Like an input, hand what is due to the log in one submission.
                    await log.submit([_reading("steady", i) for i in range(sent, due)])
                    sent = due
                await asyncio.sleep(max(0.0, t0 + sent / rate - time.monotonic()))
            await _until(lambda: up.status.sent >= n + 1, task, 30, up.name)
        finally:
            stop.set()
            await task
    return n


def _reading(sensor: str, i: int) -> Reading:
    now = time.time()
    return Reading(sensor, float(i), "C", now, now, time.monotonic(), "bench")


async def _until(cond: Any, task: asyncio.Task[None], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not cond():
        if task.done():
            task.result()
            raise RuntimeError(f"{what}: the upstream stopped")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not acknowledged within {within:.0f}s")
        await asyncio.sleep(0.01)


class Arrivals:
    """A paho subscriber in its own thread noting when each batch message arrives."""

    def __init__(self, port: int, topic: str) -> None:
        self.messages: list[tuple[float, bytes]] = []
        subscribed = threading.Event()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-arrivals")
        self.client.on_message = lambda c, u, m: self.messages.append(
            (time.time(), bytes(m.payload))
        )
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not subscribed.wait(10):
            raise RuntimeError("the subscriber did not subscribe")

    def latencies(self, sensor: str) -> list[float]:
        """Arrival minus receive time of each reading of `sensor` (each id once)."""
        out: dict[str, float] = {}
        for arrived, payload in self.messages:
            for e in json.loads(payload)["events"]:
                if e.get("sensor") == sensor:
                    out.setdefault(e["id"], arrived - e["recv_time"])
        return list(out.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def cloud_latencies(db: Path, sensor: str) -> list[float]:
    """Arrival (the endpoint's `received_at`) minus receive time of each reading of `sensor`."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT received_at - recv_time FROM events WHERE sensor = ?", (sensor,)
        ).fetchall()
    finally:
        con.close()
    return [r[0] for r in rows]


def latency_phases(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    """Both upstreams, default settings, at a steady rate (see the module docstring)."""
    out: dict[str, Any] = {}
    broker, port = start_mosquitto(root)
    try:
        arrivals = Arrivals(port, f"edge/{AGENT}/readings")
        try:
            cfg = MqttUpstreamConfig(
                type="mqtt", name="lat-mqtt", url=f"mqtt://127.0.0.1:{port}", streams=["readings"]
            )
            n = asyncio.run(
                steady(root / "lat-mqtt.db", MqttUpstream(cfg, AGENT), args.rate, args.seconds)
            )
        finally:
            arrivals.close()
        out["mqtt"] = Latency("agent (log -> broker)", n, args.rate, arrivals.latencies("steady"))
    finally:
        stop(broker)
    db = root / "cloud-latency.db"
    endpoint, url = start_endpoint(db)
    try:
        http_cfg = HttpUpstreamConfig(
            type="http", name="lat-http", url=f"{url}/ingest", streams=["readings"]
        )
        n = asyncio.run(
            steady(root / "lat-http.db", HttpUpstream(http_cfg, AGENT), args.rate, args.seconds)
        )
    finally:
        stop(endpoint)
    out["http"] = Latency("agent (log -> endpoint)", n, args.rate, cloud_latencies(db, "steady"))
    return {k: v.as_dict() for k, v in out.items()}


# --------------------------------------------------------------------------- report


def run(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    log_path = root / "events.db"
    t0 = time.perf_counter()
    asyncio.run(fill(log_path, args.readings))
    fill_seconds = time.perf_counter() - t0
    results: dict[str, Any] = {"fill_seconds": round(fill_seconds, 2)}

    broker, port = start_mosquitto(root)
    try:
        cfg = MqttUpstreamConfig(
            type="mqtt",
            name="bench-mqtt",
            url=f"mqtt://127.0.0.1:{port}",
            streams=["readings"],
            batch_size=args.batch,
            max_inflight=args.inflight,
        )
        agent = asyncio.run(drain(log_path, MqttUpstream(cfg, AGENT), args.readings, "mqtt"))
        agent.name = "agent (log -> PUBACK)"
        bodies = asyncio.run(payloads(log_path, args.batch, args.readings))
        bare = bare_paho(port, bodies, args.inflight, args.readings)
        del bodies
    finally:
        stop(broker)
    results["mqtt"] = _pair(agent, bare)

    n = min(args.http_readings, args.readings)
    endpoint, url = start_endpoint(root / "cloud-agent.db", args.cloud_sync)
    try:
        http_cfg = HttpUpstreamConfig(
            type="http",
            name="bench-http",
            url=f"{url}/ingest",
            streams=["readings"],
            batch_size=args.batch,
            max_inflight=args.http_inflight,
        )
        agent = asyncio.run(drain(log_path, HttpUpstream(http_cfg, AGENT), n, "http"))
        agent.name = "agent (log -> 2xx)"
    finally:
        stop(endpoint)
    bodies = [gzip.compress(b, 5) for b in asyncio.run(payloads(log_path, args.batch, n))]
    endpoint, url = start_endpoint(root / "cloud-bare.db", args.cloud_sync)
    try:
        bare = asyncio.run(bare_aiohttp(f"{url}/ingest", bodies, n, args.http_inflight))
    finally:
        stop(endpoint)
    del bodies
    results["http"] = _pair(agent, bare)
    sink, url = start_sink()
    try:
        sink_cfg = http_cfg.model_copy(update={"url": f"{url}/ingest", "name": "bench-sink"})
        alone = asyncio.run(drain(log_path, HttpUpstream(sink_cfg, AGENT), n, "http-sink"))
        alone.name = "agent (log -> null sink)"
    finally:
        stop(sink)
    results["http"]["sink"] = alone.as_dict()
    if args.seconds > 0:
        results["latency"] = latency_phases(args, root)
    return results


def _pair(agent: Phase, bare: Phase) -> dict[str, Any]:
    return {
        "agent": agent.as_dict(),
        "bare": bare.as_dict(),
        "ratio": round(agent.rate / bare.rate, 3) if bare.rate else 0.0,
    }


def _machine(tmp: Path) -> dict[str, Any]:
    cores = _cores()
    version = subprocess.run(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    return {
        "nproc": cores,
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "paho": paho.mqtt.__version__,
        "aiohttp": aiohttp.__version__,
        "mosquitto": version[0] if version else "?",
        "tmp_dir": str(tmp),
        # Other work on the machine moves every figure: say how busy it was.
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def print_table(out: dict[str, Any]) -> None:
    m, c = out["machine"], out["config"]
    print("edge-agent bench: upstreams (a backlog in the log -> acknowledged upstream)")
    print(
        f"machine: nproc {m['nproc']} ({m['cpu']}), Python {m['python']}, paho {m['paho']}, "
        f"aiohttp {m['aiohttp']}, {m['mosquitto']}, "
        f"load average {' '.join(map(str, m['loadavg']))} (at the end)"
    )
    print(
        f"config:  {c['readings']:,} readings in the log (filled in {out['fill_seconds']} s), "
        f"{c['http_readings']:,} over HTTP, batch {c['batch']:,}, mqtt window {c['inflight']}, "
        f"http requests in flight {c['http_inflight']}, "
        f"endpoint --sync {c['cloud_sync']}"
    )
    print()
    print(f"{'':34}{'readings/s':>12}{'seconds':>10}{'messages':>10}{'cpu ms/1000':>13}")
    targets = []
    for key, title in (("mqtt", "MQTT QoS 1 (mosquitto)"), ("http", "HTTP (edge-sim cloud)")):
        r = out[key]
        print(title)
        for side in ("agent", "bare"):
            p = r[side]
            cpu = f"{p['cpu_ms_per_1000']:>13.1f}" if "cpu_ms_per_1000" in p else f"{'':>13}"
            print(
                f"  {p['name']:32}{p['readings_per_s']:>12,.0f}{p['seconds']:>10.2f}"
                f"{p['messages']:>10,}{cpu}"
            )
        print(f"  {'ratio agent / bare':32}{r['ratio']:>12.2f}")
        targets.append((key, r["agent"]["readings_per_s"]))
        if "sink" in r:
            p = r["sink"]
            print(
                f"  {p['name']:32}{p['readings_per_s']:>12,.0f}{p['seconds']:>10.2f}"
                f"{p['messages']:>10,}{p['cpu_ms_per_1000']:>13.1f}"
            )
            targets.append(("http, agent alone", p["readings_per_s"]))
    print()
    print("targets")
    for key, rate in targets:
        print(
            f"  {key + ' >= ' + f'{TARGET_RATE:,.0f}' + ' readings/s':34}{rate:>12,.0f}   "
            + _mark(rate >= TARGET_RATE)
        )
    drain = out["mqtt"]["agent"]["seconds"] * 1_000_000 / c["readings"]
    print(
        f"  1M backlog drained (mqtt) < {TARGET_DRAIN:.0f} s   {drain:>12.1f}   "
        f"{_mark(drain < TARGET_DRAIN)}"
    )
    lat = out.get("latency")
    if not lat:
        return
    print()
    print(
        f"latency at {c['rate']:,.0f} readings/s for {c['seconds']:g} s, default settings "
        f"(commit_interval 100 ms, linger {1000 * MQTT_LINGER:.0f} ms MQTT, "
        f"{1000 * HTTP_LINGER:.0f} ms HTTP, batch_size 500); endpoint --sync full"
    )
    print(f"{'':34}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'arrived':>10}")
    for key, title in (("mqtt", "MQTT"), ("http", "HTTP")):
        r = lat[key]
        cells = "".join(
            f"{r[k]:>10.1f}" if r[k] is not None else f"{'-':>10}"
            for k in ("p50_ms", "p99_ms", "max_ms")
        )
        print(f"  {title + ': ' + r['name']:32}{cells}{r['arrived']:>10,}")
    print(f"  {'reference: the commit interval':32}{100.0:>10.1f}")
    print(f"  {'reference: HTTP linger':32}{1000 * HTTP_LINGER:>10.1f}  (at most)")
    print()
    p50 = lat["mqtt"]["p50_ms"]
    ok = p50 is not None and p50 < TARGET_P50 * 1000
    shown = f"{p50:>12.1f}" if p50 is not None else f"{'-':>12}"
    print(f"  mqtt p50 < {TARGET_P50 * 1000:.0f} ms              {shown}   {_mark(ok)}")
    # HTTP, under a steady flow, sends at most one request per `linger` (fewer, larger
    # requests: the CPU and the endpoint's per-request cost); its latency is shown, the
    # target is the MQTT path's.


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--readings", type=_positive_int, default=1_000_000, help="default 1000000")
    p.add_argument("--http-readings", type=_positive_int, default=200_000, help="default 200000")
    p.add_argument("--batch", type=_positive_int, default=1000, help="events per batch")
    p.add_argument("--inflight", type=_positive_int, default=100, help="MQTT window")
    p.add_argument(
        "--http-inflight",
        type=_positive_int,
        default=HttpUpstreamConfig.model_fields["max_inflight"].default,
        help="HTTP requests in flight (default: the upstream's)",
    )
    p.add_argument("--serve-sink", action="store_true", help=argparse.SUPPRESS)
    p.add_argument(
        "--cloud-sync",
        choices=("full", "normal", "off"),
        default="off",
        help="the endpoint's durability for the throughput phases (default off)",
    )
    p.add_argument("--rate", type=float, default=1000.0, help="latency phase: readings/s")
    p.add_argument(
        "--seconds", type=float, default=5.0, help="latency phase: seconds per upstream (0: none)"
    )
    p.add_argument("--dir", type=Path, default=None, help="where the temp dir goes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_sink:
        asyncio.run(_serve_sink())
        return 0
    tune_interpreter()  # the upstreams run in this process: run them as the daemon does
    with tempfile.TemporaryDirectory(prefix="edge-bench-up-", dir=args.dir) as tmp:
        root = Path(tmp)
        results = run(args, root)
        out: dict[str, Any] = {
            "machine": _machine(root.parent),
            "config": {
                "readings": args.readings,
                "http_readings": min(args.http_readings, args.readings),
                "batch": args.batch,
                "inflight": args.inflight,
                "http_inflight": args.http_inflight,
                "cloud_sync": args.cloud_sync,
                "rate": args.rate,
                "seconds": args.seconds,
            },
            **results,
        }
    if args.json:
        print(json.dumps(out))
    else:
        print_table(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
