"""End to end through a real agent process: MQTT in -> committed log -> MQTT out.

Four real parts, as on a gateway: a mosquitto started here on a free port; the agent
(`python -m agent run CONFIG`, a temp `data_dir`) with an MQTT input (QoS 1, manual ack: a
message is PUBACKed only once its readings are committed) and an MQTT upstream (QoS 1, its
cursor moves on the PUBACK) publishing to the same broker on another topic; a publisher (paho,
QoS 1, in a process of its own so it does not share this one's GIL); and a subscriber here,
counting the readings the agent forwarded and noting when each batch arrived.

The agent runs with DEFAULT settings for its log, input and upstream (group commit every 100 ms
with synchronous=FULL, `batch_size` 500, `linger` 200 ms, 100 messages in flight); the config
names only the broker, the topics and the client id. Readings carry their sensor in the payload
and the topic names none, so an input message is decoded once.

Modes:
  a. throughput, one reading per input message: `--messages` published as fast as a window of
     `--window` unacknowledged messages lets the publisher go;
  b. throughput, `--per-message` readings (100) per input message: `--batches` messages;
  c. latency at a steady `--rate` readings/s (one per message) for `--seconds`: each reading's
     `ts` is the publisher's wall clock when it sent it, and its latency is the subscriber's
     wall clock at arrival minus that (the agent forwards `ts` as the event's `time`).

Readings/s is the readings that arrived over the time from the first publish to the last
arrival. CPU per reading is the agent process's utime + stime (`/proc/<pid>/stat`, all its
threads) over the mode, divided by the readings forwarded. The reference, in the same run, is
the same publisher sending the same messages straight to a topic the subscriber reads: bare paho
QoS 1 publish -> broker -> subscribe, what the agent's path is made of without the agent.

The broker allows `--broker-inflight` (default 1000, the input's `max_inflight`) unacknowledged
messages per client: the input acknowledges a message only after its group commit, and with
mosquitto's own default of 20 the p50 latency at 1,000 readings/s measured 144 ms here instead of
80 ms. It also queues up to a million messages per client (its default, 1000, drops the rest
while the agent lags behind the publisher). That window also bounds mode a whatever the agent's
CPU: a message holds its slot until its group commit, and commits are `commit_interval` (100 ms)
apart, so one reading per message cannot pass `--broker-inflight` / 0.1 s (10,000/s by default);
the table prints that ceiling.

This prints each figure next to its target; it never asserts and exits 0.

    python bench/e2e.py [--messages 50000] [--batches 2000] [--per-message 100]
                        [--rate 1000] [--seconds 10] [--window 100] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

if __package__ in (None, ""):  # run as a script (`python bench/e2e.py`): find `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.config import LogConfig
from bench.common import cores as _cores
from bench.common import mark as _mark
from bench.common import positive_int as _positive_int
from bench.upstream import percentiles, start_mosquitto, stop

TARGET_RATE_1 = 15_000.0  # readings/s end to end, one reading per input message
TARGET_CPU = 0.05  # ms of agent CPU per reading (one per message)
TARGET_RATE_100 = 100_000.0  # readings/s with 100 readings per input message
TARGET_P50 = 100.0  # ms at 1,000 readings/s, default settings
#: Measured earlier on this machine, not in this run: an existing Python gateway on the same
#: path (the issue's figures).
PEER = "an existing Python gateway: 2,500-2,900 readings/s, 0.35-0.40 ms CPU/reading, p50 ~300 ms"

AGENT = "e2e"
IN_TOPIC = "e2e/in/readings"
BARE_TOPIC = "e2e/bare/readings"
OUT_TOPIC = f"edge/{AGENT}/readings"
CLK_TCK = os.sysconf("SC_CLK_TCK")

CONFIG = """\
agent:
  name: {agent}
  data_dir: {data}
  log_level: warning
inputs:
  - type: mqtt
    name: in
    url: mqtt://127.0.0.1:{port}
    topics: ["e2e/in/#"]
    client_id: e2e-agent-in
upstreams:
  - type: mqtt
    name: out
    url: mqtt://127.0.0.1:{port}
"""


def no_delay(client: mqtt.Client) -> None:
    """TCP_NODELAY on a paho client's socket, as the agent's MQTT upstream sets it on its own
    (paho leaves Nagle on), so the reference clients send small packets as the agent does."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name (may hold spaces)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


# --------------------------------------------------------------------------- the publisher


@dataclass(frozen=True, slots=True)
class Job:
    """What the publisher sends: `messages` of `per_message` readings of `sensor` on `topic`,
    at `rate` readings/s (0: as fast as the window lets it)."""

    topic: str
    sensor: str
    messages: int
    per_message: int = 1
    rate: float = 0.0


def payload(sensor: str, first: int, per_message: int) -> bytes:
    """One input message: a JSON reading (or a list of them) stamped with the time now."""
    ts = repr(time.time())
    if per_message == 1:
        return f'{{"sensor":"{sensor}","value":{first},"ts":{ts}}}'.encode()
    items = ",".join(
        f'{{"sensor":"{sensor}","value":{v},"ts":{ts}}}' for v in range(first, first + per_message)
    )
    return f"[{items}]".encode()


def publisher(conn: Connection, port: int, window: int) -> None:
    """The publisher process: runs the jobs it receives on `conn` until it receives None,
    answering each with when it started and ended (wall clock) and its CPU seconds."""
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-publisher")
    client.max_inflight_messages_set(window)
    slots = threading.Semaphore(window)
    acked = [0]
    done = threading.Event()
    target = [0]

    def on_publish(c: mqtt.Client, u: Any, mid: int, reason: Any, props: Any) -> None:
        slots.release()
        acked[0] += 1
        if acked[0] >= target[0]:
            done.set()

    connected = threading.Event()
    client.on_publish = on_publish
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    no_delay(client)
    client.loop_start()
    try:
        if not connected.wait(10):
            raise RuntimeError("publisher: no CONNACK")
        conn.send("ready")
        while (job := conn.recv()) is not None:
            assert isinstance(job, Job)
            acked[0], target[0] = 0, job.messages
            done.clear()
            cpu0, t0 = time.process_time(), time.time()
            pace = job.rate / job.per_message if job.rate > 0 else 0.0
            for i in range(job.messages):
                if pace:
                    # A steady rate: each message at its due time, not in bursts.
                    wait = t0 + i / pace - time.time()
                    if wait > 0:
                        time.sleep(wait)
                slots.acquire()
                body = payload(job.sensor, i * job.per_message, job.per_message)
                client.publish(job.topic, body, qos=1)
            done.wait(120)
            conn.send(
                {
                    "start": t0,
                    "end": time.time(),
                    "sent": job.messages,
                    "acked": acked[0],
                    "cpu": time.process_time() - cpu0,
                }
            )
    finally:
        client.disconnect()
        client.loop_stop()


# --------------------------------------------------------------------------- the subscriber


@dataclass(slots=True)
class Subscriber:
    """A paho subscriber (its own network thread) on the agent's output and the bare topic.

    `watch` sets the sensor whose readings `progress` counts (a byte count per message, so the
    network thread stays cheap); messages are kept with their arrival time and parsed after.
    """

    port: int
    arrivals: list[tuple[float, str, bytes]] = field(default_factory=list)
    progress: int = 0
    last: float = 0.0
    _needle: bytes = b"\0"
    _client: mqtt.Client | None = None

    def start(self) -> None:
        subscribed = threading.Event()
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="e2e-subscriber")
        client.on_message = self._on_message
        client.on_subscribe = lambda *a: subscribed.set()
        client.on_connect = lambda c, *a: c.subscribe([(OUT_TOPIC, 1), (BARE_TOPIC, 1)])
        client.connect("127.0.0.1", self.port)
        no_delay(client)
        client.loop_start()
        self._client = client
        if not subscribed.wait(10):
            raise RuntimeError("the subscriber did not subscribe")

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        now = time.time()
        body = bytes(msg.payload)
        self.arrivals.append((now, msg.topic, body))
        found = body.count(self._needle)
        if found:
            self.progress += found
            self.last = now

    def watch(self, sensor: str) -> None:
        """Count the readings of `sensor` from now on (and forget what arrived before)."""
        self.arrivals = []
        self.progress = 0
        self.last = 0.0
        self._needle = f'"sensor":"{sensor}"'.encode()

    def wait(self, readings: int, stall: float) -> None:
        """Until `readings` arrived, or nothing more did for `stall` seconds."""
        mark, since = -1, time.monotonic()
        while self.progress < readings:
            if self.progress != mark:
                mark, since = self.progress, time.monotonic()
            elif time.monotonic() - since > stall:
                return
            time.sleep(0.005)

    def readings(self, topic: str, sensor: str) -> dict[Any, float]:
        """Each reading of `sensor` that arrived on `topic`, once, with its latency (arrival
        minus its `ts`, or the `time` the agent forwarded it with)."""
        out: dict[Any, float] = {}
        for arrived, where, body in list(self.arrivals):
            if where != topic:
                continue
            doc = json.loads(body)
            if topic == OUT_TOPIC:
                for e in doc["events"]:
                    if e.get("sensor") == sensor:
                        out.setdefault(e["id"], arrived - e["time"])
            else:
                for r in doc if isinstance(doc, list) else [doc]:
                    out.setdefault(r["value"], arrived - r["ts"])
        return out

    def close(self) -> None:
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()


# --------------------------------------------------------------------------- one run


@dataclass(slots=True)
class Run:
    """The agent process, the publisher and the subscriber, set up for `measure`."""

    agent: subprocess.Popen[bytes]
    broker_pid: int
    pub: Connection
    sub: Subscriber
    stall: float

    def measure(self, name: str, job: Job, *, through_agent: bool) -> dict[str, Any]:
        """Run `job` (to the agent's input, or straight to the bare topic) and measure."""
        readings = job.messages * job.per_message
        self.sub.watch(job.sensor)
        a0, b0, w0 = cpu_seconds(self.agent.pid), cpu_seconds(self.broker_pid), time.time()
        self.pub.send(job)
        self.sub.wait(readings, self.stall)
        done = self.pub.recv() if self.pub.poll(150) else {}  # its own bound is 120 s
        a1, b1, w1 = cpu_seconds(self.agent.pid), cpu_seconds(self.broker_pid), time.time()
        got = self.sub.readings(OUT_TOPIC if through_agent else BARE_TOPIC, job.sensor)
        start = done.get("start", w0)
        seconds = max(1e-9, (self.sub.last or w1) - start)
        out: dict[str, Any] = {
            "name": name,
            "readings": readings,
            "arrived": len(got),
            "seconds": round(seconds, 3),
            "readings_per_s": round(len(got) / seconds, 1),
            **percentiles(list(got.values())),
            "broker_cpu_percent": round(100 * (b1 - b0) / (w1 - w0), 1),
            "publisher_cpu_percent": round(100 * done.get("cpu", 0.0) / (w1 - w0), 1),
        }
        if through_agent:
            cpu = a1 - a0
            out["agent_cpu_ms_per_reading"] = round(1000 * cpu / len(got), 4) if got else None
            out["agent_cpu_percent"] = round(100 * cpu / (w1 - w0), 1)
        return out


def start_agent(root: Path, port: int) -> subprocess.Popen[bytes]:
    data = root / "agent"
    data.mkdir()
    config = root / "agent.yaml"
    config.write_text(CONFIG.format(agent=AGENT, data=data, port=port))
    log = (root / "agent.log").open("wb")
    try:
        return subprocess.Popen(
            [sys.executable, "-m", "agent", "run", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    finally:
        log.close()


def wait_ready(run: Run, within: float = 60.0) -> None:
    """Probe readings through the agent until one arrives: connected, subscribed, forwarding."""
    run.sub.watch("probe")
    deadline = time.monotonic() + within
    while run.sub.progress == 0:
        if run.agent.poll() is not None:
            raise RuntimeError(f"the agent exited ({run.agent.returncode})")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no reading came through the agent within {within:.0f}s")
        run.pub.send(Job(IN_TOPIC, "probe", 1))
        if run.pub.poll(10):
            run.pub.recv()
        run.sub.wait(1, 0.5)


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    extra = (
        f"max_inflight_messages {args.broker_inflight}\n"
        "max_queued_messages 1000000\npersistence false\n"
    )
    broker, port = start_mosquitto(root, extra)
    ctx = multiprocessing.get_context("spawn")
    mine, theirs = ctx.Pipe()
    pub = ctx.Process(target=publisher, args=(theirs, port, args.window), daemon=True)
    sub = Subscriber(port)
    agent: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {}
    try:
        pub.start()
        if not mine.poll(30) or mine.recv() != "ready":
            raise RuntimeError("the publisher did not connect")
        sub.start()
        agent = start_agent(root, port)
        run = Run(agent, broker.pid, mine, sub, args.stall)
        wait_ready(run)
        modes = (
            ("a", Job(IN_TOPIC, "tput1", args.messages), Job(BARE_TOPIC, "tput1", args.messages)),
            (
                "b",
                Job(IN_TOPIC, "tput100", args.batches, args.per_message),
                Job(BARE_TOPIC, "tput100", args.batches, args.per_message),
            ),
            (
                "c",
                Job(IN_TOPIC, "steady", int(args.rate * args.seconds), 1, args.rate),
                Job(BARE_TOPIC, "steady", int(args.rate * args.seconds), 1, args.rate),
            ),
        )
        for key, through, bare in modes:
            results[key] = {
                "bare": run.measure("bare paho (publish -> subscribe)", bare, through_agent=False),
                "agent": run.measure("agent (in -> log -> out)", through, through_agent=True),
            }
            r = results[key]
            bare_rate = r["bare"]["readings_per_s"]
            r["ratio"] = round(r["agent"]["readings_per_s"] / bare_rate, 3) if bare_rate else 0.0
        mine.send(None)
    finally:
        sub.close()
        if agent is not None:
            stop(agent)
        pub.join(10)
        if pub.is_alive():
            pub.kill()
        stop(broker)
    return results


# --------------------------------------------------------------------------- report


def _machine() -> dict[str, Any]:
    version = subprocess.run(
        [shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-h"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.splitlines()
    return {
        "nproc": _cores(),
        "cpu": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "paho": paho.mqtt.__version__,
        "mosquitto": version[0] if version else "?",
        # Other work on the machine moves every figure: say how busy it was.
        "loadavg": [round(x, 2) for x in os.getloadavg()],
    }


def _ms(value: float | None) -> str:
    return f"{value:>9.1f}" if value is not None else f"{'-':>9}"


def print_table(out: dict[str, Any]) -> None:
    m, c = out["machine"], out["config"]
    print("edge-agent bench: end to end (MQTT in, QoS 1 manual ack -> log -> MQTT out, QoS 1)")
    print(f"machine: nproc {m['nproc']} ({m['cpu']}), Python {m['python']}, paho {m['paho']},")
    load = " ".join(map(str, m["loadavg"]))
    print(f"         {m['mosquitto']}, load average {load} (at the end)")
    print(
        "config:  agent defaults (commit_interval 100 ms, synchronous=FULL, batch_size 500, "
        "linger 200 ms);"
    )
    print(
        f"         publisher window {c['window']}, broker max_inflight_messages "
        f"{c['broker_inflight']}"
    )
    # A message holds its broker slot until the group commit that holds it (module docstring).
    ceiling = c["broker_inflight"] / LogConfig().commit_interval
    print(f"         window ceiling for mode a: {ceiling:,.0f} readings/s (inflight / commit)")
    print()
    head = f"{'':36}{'readings/s':>11}{'p50 ms':>9}{'p99 ms':>9}{'arrived':>10}"
    print(head + f"{'cpu ms/rd':>11}{'cpu %':>7}")
    titles = {
        "a": f"a. {c['messages']:,} messages, 1 reading each, as fast as possible",
        "b": f"b. {c['batches']:,} messages of {c['per_message']} readings",
        "c": f"c. steady {c['rate']:,.0f} readings/s for {c['seconds']:g} s, 1 per message",
    }
    for key in ("a", "b", "c"):
        r = out[key]
        print(titles[key])
        for side in ("agent", "bare"):
            p = r[side]
            cpu = p.get("agent_cpu_ms_per_reading")
            cells = (
                f"{p['readings_per_s']:>11,.0f}{_ms(p['p50_ms'])}{_ms(p['p99_ms'])}"
                f"{p['arrived']:>10,}"
            )
            if cpu is not None:
                cells += f"{cpu:>11.4f}{p['agent_cpu_percent']:>7.1f}"
            print(f"  {p['name']:34}{cells}")
        print(f"  {'ratio agent / bare':34}{r['ratio']:>11.2f}")
        cpu = r["agent"].get("agent_cpu_ms_per_reading")
        if key != "c" and cpu:
            # What the agent could do with a core to itself, whatever held it back here.
            print(f"  {'agent ceiling (1 core / cpu per rd)':34}{1000 / cpu:>11,.0f}")
    a, b, cc = out["a"]["agent"], out["b"]["agent"], out["c"]["agent"]
    cpu = a.get("agent_cpu_ms_per_reading")
    print()
    print("targets")
    rows = [
        ("a. >= 15,000 readings/s", f"{a['readings_per_s']:,.0f}", a["readings_per_s"] >= 15e3),
        (
            "a. agent CPU < 0.05 ms/reading",
            f"{cpu:.4f}" if cpu is not None else "-",
            cpu is not None and cpu < TARGET_CPU,
        ),
        ("b. >= 100,000 readings/s", f"{b['readings_per_s']:,.0f}", b["readings_per_s"] >= 1e5),
        (
            "c. p50 < 100 ms",
            f"{cc['p50_ms']:.1f} ms" if cc["p50_ms"] is not None else "-",
            cc["p50_ms"] is not None and cc["p50_ms"] < TARGET_P50,
        ),
    ]
    for label, value, ok in rows:
        print(f"  {label:34}{value:>14}   {_mark(ok)}")
    print(f"peer (measured before, not in this run): {PEER}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--messages", type=_positive_int, default=50_000, help="mode a, default 50000")
    p.add_argument("--batches", type=_positive_int, default=2_000, help="mode b, default 2000")
    p.add_argument("--per-message", type=_positive_int, default=100, help="mode b, default 100")
    p.add_argument("--rate", type=float, default=1000.0, help="mode c readings/s, default 1000")
    p.add_argument("--seconds", type=float, default=10.0, help="mode c duration, default 10")
    p.add_argument(
        "--window",
        type=_positive_int,
        default=100,
        help="the publisher's unacknowledged messages (default 100: paho scans its whole "
        "window on every PUBACK, so a larger one makes it slower, not faster)",
    )
    p.add_argument(
        "--broker-inflight",
        type=int,
        default=1000,
        help="mosquitto max_inflight_messages (default 1000; mosquitto's own default is 20)",
    )
    p.add_argument("--stall", type=float, default=15.0, help="give up after this long idle")
    p.add_argument("--dir", type=Path, default=None, help="where the temp dir goes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-bench-e2e-", dir=args.dir) as tmp:
        root = Path(tmp)
        try:
            results = bench(args, root)
        except RuntimeError as exc:
            log = root / "agent.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            print(f"e2e: {exc}\n--- agent log\n{tail}", file=sys.stderr)
            return 0
    out: dict[str, Any] = {
        "machine": _machine(),
        "config": {
            k: getattr(args, k)
            for k in (
                "messages",
                "batches",
                "per_message",
                "rate",
                "seconds",
                "window",
                "broker_inflight",
            )
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
