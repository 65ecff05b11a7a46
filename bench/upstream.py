"""Readings/s from the log to each upstream, next to the bare client's rate in the same run.

A log is filled with N readings (a backlog, as after an outage), then drained:

- MQTT: `MqttUpstream` (format `batch`, QoS 1, every message acknowledged) to a real mosquitto
  started here; then a bare paho client (its own network thread, the same window of
  unacknowledged messages) publishes the very same payloads, encoded beforehand.
- HTTP: `HttpUpstream` to the simulator's endpoint (`edge-sim cloud`, its own process, a fresh
  database); then a bare aiohttp session posts the same bodies (gzipped beforehand) to a
  second fresh endpoint, one request at a time, as the upstream does.

Each agent phase is timed from the upstream's start until every reading is acknowledged (PUBACK
or 2xx), so the drain time of the backlog is its seconds; `cpu ms` is this process's CPU time
(event loop and database thread) per 1,000 readings. The ratio agent / bare is how much of what
the client library and the receiver can do the agent keeps. This prints; it never asserts.

    python bench/upstream.py [--readings 1000000] [--http-readings 200000] [--batch 1000]
                             [--inflight 100] [--json]
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
from agent.events import Reading, Stream
from agent.log import EventLog
from agent.upstream import Upstream, WireEncoder, batch_body
from agent.upstream_http import HttpUpstream
from agent.upstream_mqtt import MqttUpstream

TARGET_RATE = 100_000.0  # readings/s to each upstream, with batching
TARGET_DRAIN = 30.0  # seconds for 1,000,000 buffered readings
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


def start_mosquitto(workdir: Path) -> tuple[subprocess.Popen[bytes], int]:
    binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    port = free_port()
    conf = workdir / "mosquitto.conf"
    root = "user root\n" if os.geteuid() == 0 else ""
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous true\n{root}log_type error\n")
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


def start_endpoint(db: Path) -> tuple[subprocess.Popen[str], str]:
    """`edge-sim cloud` in its own process (its own core), on a free port."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulator.cli", "cloud", "--port", "0", "--db", str(db)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().split()
    if len(line) != 2 or line[0] != "LISTENING":
        proc.kill()
        raise RuntimeError(f"edge-sim cloud did not start: {line}")
    return proc, line[1]


def stop(proc: subprocess.Popen[Any]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()


async def bare_aiohttp(url: str, bodies: list[bytes], readings: int) -> Phase:
    """A plain aiohttp session posting the gzipped `bodies`, one request at a time."""
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, headers=headers) as session:
        t0 = time.perf_counter()
        for body in bodies:
            async with session.post(url, data=body) as resp:
                await resp.read()
                if resp.status != 200:
                    raise RuntimeError(f"bare aiohttp: HTTP {resp.status}")
        seconds = time.perf_counter() - t0
    return Phase("bare aiohttp (same bodies)", readings, seconds, len(bodies))


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
            linger=0,
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
    endpoint, url = start_endpoint(root / "cloud-agent.db")
    try:
        http_cfg = HttpUpstreamConfig(
            type="http",
            name="bench-http",
            url=f"{url}/ingest",
            streams=["readings"],
            batch_size=args.batch,
            linger=0,
        )
        agent = asyncio.run(drain(log_path, HttpUpstream(http_cfg, AGENT), n, "http"))
        agent.name = "agent (log -> 2xx)"
    finally:
        stop(endpoint)
    bodies = [gzip.compress(b, 5) for b in asyncio.run(payloads(log_path, args.batch, n))]
    endpoint, url = start_endpoint(root / "cloud-bare.db")
    try:
        bare = asyncio.run(bare_aiohttp(f"{url}/ingest", bodies, n))
    finally:
        stop(endpoint)
    results["http"] = _pair(agent, bare)
    return results


def _pair(agent: Phase, bare: Phase) -> dict[str, Any]:
    return {
        "agent": agent.as_dict(),
        "bare": bare.as_dict(),
        "ratio": round(agent.rate / bare.rate, 3) if bare.rate else 0.0,
    }


def _machine(tmp: Path) -> dict[str, Any]:
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 0
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
    }


def _mark(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def print_table(out: dict[str, Any]) -> None:
    m, c = out["machine"], out["config"]
    print("edge-agent bench: upstreams (a backlog in the log -> acknowledged upstream)")
    print(
        f"machine: nproc {m['nproc']} ({m['cpu']}), Python {m['python']}, paho {m['paho']}, "
        f"aiohttp {m['aiohttp']}, {m['mosquitto']}"
    )
    print(
        f"config:  {c['readings']:,} readings in the log (filled in {out['fill_seconds']} s), "
        f"{c['http_readings']:,} over HTTP, batch {c['batch']:,}, mqtt window {c['inflight']}"
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
    print()
    print("targets")
    for key, rate in targets:
        print(
            f"  {key} >= {TARGET_RATE:,.0f} readings/s  {rate:>12,.0f}   "
            + _mark(rate >= TARGET_RATE)
        )
    drain = out["mqtt"]["agent"]["seconds"] * 1_000_000 / c["readings"]
    print(
        f"  1M backlog drained (mqtt) < {TARGET_DRAIN:.0f} s   {drain:>12.1f}   "
        f"{_mark(drain < TARGET_DRAIN)}"
    )


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--readings", type=_positive_int, default=1_000_000, help="default 1000000")
    p.add_argument("--http-readings", type=_positive_int, default=200_000, help="default 200000")
    p.add_argument("--batch", type=_positive_int, default=1000, help="events per batch")
    p.add_argument("--inflight", type=_positive_int, default=100, help="MQTT window")
    p.add_argument("--dir", type=Path, default=None, help="where the temp dir goes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
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
