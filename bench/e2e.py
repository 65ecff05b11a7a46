"""End to end through a real agent process: MQTT in -> committed log -> MQTT out.

Five real parts, as on a gateway: a mosquitto started here on a free port; the agent
(`python -m agent run CONFIG`, a temp `data_dir`) with an MQTT input (QoS 1, manual ack: a
message is PUBACKed only once its readings are committed) and an MQTT upstream (QoS 1, its
cursor moves on the PUBACK) publishing to the same broker on another topic; two publishers, each
in a process of its own so that neither shares this one's GIL: `bench.mqttload`'s fast one (a
raw socket, QoS 1 PUBLISH packets written a chunk at a time and PUBACKs parsed in bulk) and paho
at QoS 1; and a subscriber here (`bench.mqttload`'s too, on a thread: paho's receives some
12,000 messages/s at a core, which would be the limit of the bare runs), counting the readings
that arrive and noting when each message arrived.

The agent runs with DEFAULT settings for its log, input and upstream (group commit every 100 ms
with synchronous=FULL, the input's `max_inflight` window, the upstream's `batch_size` 500,
`linger` 200 ms and 100 messages in flight); the config names only the broker, the topics and
the client id. Readings carry their sensor in the payload and the topic names none, so an input
message is decoded once.

Modes:
  a. throughput, one reading per input message: `--messages` published as fast as the
     publisher's window of unacknowledged messages lets it go;
  b. throughput, `--per-message` readings (100) per input message: `--batches` messages;
  c. latency at a steady `--rate` readings/s (one per message) for `--seconds`, from the paho
     publisher: each reading's `ts` is the publisher's wall clock when it built the message, and
     its latency is the subscriber's wall clock at arrival minus that (the agent forwards `ts`
     as the event's `time`).

In modes a and b the agent is driven by the fast publisher (`--fast-window` unacknowledged):
paho tops out near 6,400 QoS 1 messages/s on a 2-core machine, a core of Python, below the
15,000 readings/s asked for with one reading per message. Two references in the same run send
the same messages straight to a topic the subscriber reads, without the agent: the fast
publisher (what the path could carry here: broker and subscriber) and bare paho QoS 1 publish ->
broker -> subscribe (`--window` unacknowledged), what the agent's path is made of with the
clients most Python gateways use. Mode c has the paho reference only. The latencies of modes a
and b hold the backlog that queues at the broker while the publisher outpaces the agent: only
mode c's say how late a reading is.

Readings/s is the readings that arrived over the time from the first publish to the last
arrival. CPU per reading is the agent process's utime + stime (`/proc/<pid>/stat`, all its
threads) over the run, divided by the readings forwarded. Each run also shows the CPU of each
process in % of one core (the agent, mosquitto, the publisher, this process with the
subscriber's thread), their sum, and the whole machine's busy time from /proc/stat (of
100 x nproc): what the four take next to what other work on the machine took. A process's
figure is exact (the kernel scales utime + stime to its scheduler run time); the machine's is
sampled at timer ticks, so it reads low when the work comes in short bursts, as in mode c,
and is to be trusted when the cores are busy, as in modes a and b.

The broker allows `--broker-inflight` unacknowledged messages per client (mosquitto's
`max_inflight_messages`, for MQTT 3.1.1 clients as the agent's input is; default the input's
`max_inflight`, so bench and agent agree; mosquitto's own default, 20, put the p50 latency at
1,000 readings/s at 144 ms instead of 80 ms). It also queues up to a million messages per
client (its default, 1000, drops the rest while the agent lags behind the publisher). On a
broker that keeps its window, the window bounds mode a whatever the agent's CPU: a message
holds its slot until its group commit, and commits are `commit_interval` (100 ms) apart, so
one reading per message cannot pass `--broker-inflight` / 0.1 s (40,960/s with 4096); the
table prints that ceiling. mosquitto 2.0.11 keeps it only until the first PUBACKs: a client
acknowledging every 100 ms, with a backlog of 20,000 and a window of 1000, was sent 1000
messages, then the other 19,000 at once after its first acknowledgements (mosquitto issue
2301 points at its quota accounting), so there the ceiling does not bind.

This prints each figure next to its target and never asserts. It exits 0, or 1 with a message
when a figure would be wrong rather than low: the broker did not start, or a publisher or the
subscriber hit a protocol error (mosquitto closes the connection) or lost its connection.

    python bench/e2e.py [--messages 50000] [--batches 2000] [--per-message 100]
                        [--rate 1000] [--seconds 10] [--window 100] [--fast-window 1000]
                        [--broker-inflight N] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import paho.mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

if __package__ in (None, ""):  # run as a script (`python bench/e2e.py`): find `bench`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from agent.config import LogConfig, MqttInputConfig
from bench.common import cores as _cores
from bench.common import mark as _mark
from bench.common import positive_int as _positive_int
from bench.mqttload import FastPublisher, FastSubscriber, LoadError
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
# The runs of a mode, as the table names them.
AGENT_FAST = "agent (in -> log -> out), fast pub"
AGENT_PAHO = "agent (in -> log -> out), paho pub"
BARE_FAST = "bare fast pub -> broker -> sub"
BARE_PAHO = "bare paho pub -> broker -> sub"
CLK_TCK = os.sysconf("SC_CLK_TCK")
#: The input's window by default: the broker's `max_inflight_messages` follows it.
DEFAULT_INFLIGHT: int = MqttInputConfig.model_fields["max_inflight"].default


class LoadFailed(Exception):
    """A figure would be wrong, not just low: the broker did not start, or a publisher or the
    subscriber lost its connection or hit a protocol error. The bench exits 1."""


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
    (paho leaves Nagle on), so the paho publisher sends small packets as the agent does."""
    sock = client.socket()
    if isinstance(sock, socket.socket):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process, all its threads, from /proc."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()  # after the command name (may hold spaces)
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent busy, all cores (/proc/stat: all but idle and
    iowait): others run benchmarks here too, and this says how much of the machine they took."""
    # cpu  user nice system idle iowait irq softirq steal ... (guest time is inside user)
    ticks = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(ticks) - ticks[3] - ticks[4]) / CLK_TCK


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

    def body(self, i: int, ts: str) -> bytes:
        """Message `i`'s payload, stamped with `ts`."""
        return payload(self.sensor, i * self.per_message, self.per_message, ts)


def payload(sensor: str, first: int, per_message: int, ts: str) -> bytes:
    """One input message: a JSON reading (or a list of them) stamped with `ts`, the time it
    goes out (`repr(time.time())`)."""
    if per_message == 1:
        return f'{{"sensor":"{sensor}","value":{first},"ts":{ts}}}'.encode()
    items = ",".join(
        f'{{"sensor":"{sensor}","value":{v},"ts":{ts}}}' for v in range(first, first + per_message)
    )
    return f"[{items}]".encode()


def publisher(conn: Connection, port: int, window: int) -> None:
    """The paho publisher process: runs the jobs it receives on `conn` until it receives None,
    answering each with when it started and ended (wall clock), its CPU seconds, and `error`
    if the broker closed the connection meanwhile (paho would reconnect and go on quietly)."""
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

    lost: list[str] = []

    def on_disconnect(c: mqtt.Client, u: Any, flags: Any, reason: Any, props: Any) -> None:
        lost.append(str(reason))
        done.set()  # what is left will not be acknowledged on this connection

    def slot() -> bool:
        """A slot of the window; False once the connection is lost (no PUBACK will free one)."""
        while not slots.acquire(timeout=0.5):
            if lost:
                return False
        return True

    connected = threading.Event()
    client.on_publish = on_publish
    client.on_disconnect = on_disconnect
    client.on_connect = lambda *a: connected.set()
    client.connect("127.0.0.1", port)
    no_delay(client)
    client.loop_start()
    try:
        if not connected.wait(10):
            conn.send("paho publisher: no CONNACK within 10 s")
            return
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
                if lost or not slot():
                    break
                client.publish(job.topic, job.body(i, repr(time.time())), qos=1)
            done.wait(120)
            reply: dict[str, Any] = {
                "start": t0,
                "end": time.time(),
                "sent": job.messages,
                "acked": acked[0],
                "cpu": time.process_time() - cpu0,
            }
            if lost:
                reply["error"] = f"paho publisher: the broker closed the connection ({lost[0]})"
            conn.send(reply)
            if lost:
                return
    finally:
        client.disconnect()
        client.loop_stop()


def fast_publisher(conn: Connection, port: int, window: int) -> None:
    """The fast publisher process (`bench.mqttload`): as `publisher`, and `error` when the
    broker broke the connection or the protocol (after which it stops)."""
    try:
        client = FastPublisher("127.0.0.1", port, "e2e-fast-publisher")
    except (LoadError, OSError) as exc:
        conn.send(f"fast publisher: {exc}")
        return
    try:
        conn.send("ready")
        while (job := conn.recv()) is not None:
            assert isinstance(job, Job)
            cpu0 = time.process_time()
            try:
                done = client.publish(
                    job.topic,
                    job.messages,
                    job.body,
                    window=window,
                    rate=job.rate / job.per_message,
                )
            except LoadError as exc:
                conn.send({"error": f"fast publisher: {exc}", "cpu": time.process_time() - cpu0})
                return
            conn.send(
                {
                    "start": done.start,
                    "end": done.end,
                    "sent": done.sent,
                    "acked": done.acked,
                    "cpu": time.process_time() - cpu0,
                }
            )
    finally:
        client.close()


# --------------------------------------------------------------------------- the subscriber


@dataclass(slots=True)
class Subscriber:
    """A subscriber (`bench.mqttload`'s, its own thread) on the agent's output and the bare topic.

    paho's would be the limit of the bare runs with one reading per message (some 12,000
    messages/s at a core). `watch` sets the sensor whose readings `progress` counts (a byte
    count per message, so the thread stays cheap); messages are kept with their arrival time and
    parsed after.
    """

    port: int
    arrivals: list[tuple[float, str, bytes]] = field(default_factory=list)
    progress: int = 0
    last: float = 0.0
    _needle: bytes = b"\0"
    _client: FastSubscriber | None = None

    def start(self) -> None:
        """Connect and subscribe; raises LoadFailed when the broker will not have it."""
        try:
            self._client = FastSubscriber(
                "127.0.0.1", self.port, "e2e-subscriber", [OUT_TOPIC, BARE_TOPIC], self._on_message
            )
        except (LoadError, OSError) as exc:
            raise LoadFailed(f"the subscriber: {exc}") from exc

    @property
    def error(self) -> str | None:
        """Why the subscriber stopped reading, if it did (then every figure after is wrong)."""
        return self._client.error if self._client is not None else None

    def _on_message(self, now: float, topic: str, body: bytes) -> None:
        self.arrivals.append((now, topic, body))
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

    def wait(self, readings: int, stall: float, give_up: Callable[[], bool] | None = None) -> None:
        """Until `readings` arrived, nothing more did for `stall` seconds, or `give_up()`."""
        mark, since = -1, time.monotonic()
        while self.progress < readings and not (give_up is not None and give_up()):
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
            self._client.close()


# --------------------------------------------------------------------------- one run


@dataclass(slots=True)
class Run:
    """The agent process, the two publishers and the subscriber, set up for `measure`."""

    agent: subprocess.Popen[bytes]
    broker_pid: int
    paho: Connection
    fast: Connection
    sub: Subscriber
    stall: float

    def measure(
        self, name: str, job: Job, pub: Connection, *, through_agent: bool
    ) -> dict[str, Any]:
        """Run `job` on publisher `pub` (to the agent's input, or straight to the bare topic)
        and measure. Raises LoadFailed when the publisher reports an error."""
        readings = job.messages * job.per_message
        self.sub.watch(job.sensor)
        reply: dict[str, Any] = {}

        def failed() -> bool:
            # The publisher answers once all its messages are acknowledged, or at an error:
            # then nothing more will come and waiting out `stall` would only hide it.
            if not reply and pub.poll():
                try:
                    reply.update(pub.recv())
                except EOFError:
                    reply["error"] = "the publisher process exited"
            return "error" in reply or self.sub.error is not None

        a0, b0, s0 = cpu_seconds(self.agent.pid), cpu_seconds(self.broker_pid), time.process_time()
        m0, w0 = machine_busy(), time.time()
        pub.send(job)
        self.sub.wait(readings, self.stall, failed)
        if not reply and pub.poll(150):  # its own bound is 120 s
            failed()
        a1, b1, s1 = cpu_seconds(self.agent.pid), cpu_seconds(self.broker_pid), time.process_time()
        m1, w1 = machine_busy(), time.time()
        if "error" in reply:
            raise LoadFailed(f"{name}: {reply['error']}")
        if self.sub.error is not None:
            raise LoadFailed(f"{name}: the subscriber: {self.sub.error}")
        got = self.sub.readings(OUT_TOPIC if through_agent else BARE_TOPIC, job.sensor)
        start = reply.get("start", w0)
        seconds = max(1e-9, (self.sub.last or w1) - start)
        wall = w1 - w0
        cpu = {
            "agent": a1 - a0 if through_agent else 0.0,
            "broker": b1 - b0,
            "publisher": reply.get("cpu", 0.0),
            # This process: the subscriber's network thread, and the 5 ms polls of `wait`.
            "subscriber": s1 - s0,
        }
        out: dict[str, Any] = {
            "name": name,
            "readings": readings,
            "arrived": len(got),
            "seconds": round(seconds, 3),
            "readings_per_s": round(len(got) / seconds, 1),
            **percentiles(list(got.values())),
            **{f"{k}_cpu_percent": round(100 * v / wall, 1) for k, v in cpu.items()},
            "ours_cpu_percent": round(100 * sum(cpu.values()) / wall, 1),
            "machine_cpu_percent": round(100 * (m1 - m0) / wall, 1),
        }
        if through_agent:
            out["agent_cpu_ms_per_reading"] = (
                round(1000 * cpu["agent"] / len(got), 4) if got else None
            )
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
        run.paho.send(Job(IN_TOPIC, "probe", 1))
        if run.paho.poll(10):
            reply = run.paho.recv()
            if "error" in reply:
                raise LoadFailed(reply["error"])
        run.sub.wait(1, 0.5)


def start_publisher(
    ctx: Any, target: Callable[[Connection, int, int], None], port: int, window: int
) -> tuple[multiprocessing.process.BaseProcess, Connection]:
    """A publisher process, connected to the broker; raises LoadFailed when it cannot be."""
    mine, theirs = ctx.Pipe()
    proc: multiprocessing.process.BaseProcess = ctx.Process(
        target=target, args=(theirs, port, window), daemon=True
    )
    proc.start()
    try:
        answer = mine.recv() if mine.poll(30) else "no answer within 30 s"
    except EOFError:
        proc.join(5)
        answer = f"its process exited ({proc.exitcode})"
    if answer != "ready":
        raise LoadFailed(f"a publisher did not connect: {answer}")
    return proc, mine


def bench(args: argparse.Namespace, root: Path) -> dict[str, Any]:
    extra = (
        f"max_inflight_messages {args.broker_inflight}\n"
        "max_queued_messages 1000000\npersistence false\n"
    )
    try:
        broker, port = start_mosquitto(root, extra)
    except (RuntimeError, OSError) as exc:
        raise LoadFailed(f"the broker: {exc}") from exc
    ctx = multiprocessing.get_context("spawn")
    procs: list[tuple[multiprocessing.process.BaseProcess, Connection]] = []
    sub = Subscriber(port)
    agent: subprocess.Popen[bytes] | None = None
    results: dict[str, Any] = {}
    try:
        procs.append(start_publisher(ctx, publisher, port, args.window))
        procs.append(start_publisher(ctx, fast_publisher, port, args.fast_window))
        (_, paho), (_, fast) = procs
        sub.start()
        agent = start_agent(root, port)
        run = Run(agent, broker.pid, paho, fast, sub, args.stall)
        wait_ready(run)
        a, b = args.messages, args.batches
        steady = int(args.rate * args.seconds)
        # Per mode: the runs as (key, title, job, publisher, through the agent); the references
        # go first, so the agent's run is the last thing the machine remembers in its caches.
        modes: dict[str, list[tuple[str, str, Job, Connection, bool]]] = {
            "a": [
                ("paho", BARE_PAHO, Job(BARE_TOPIC, "tput1", a), paho, False),
                ("fast", BARE_FAST, Job(BARE_TOPIC, "tput1", a), fast, False),
                ("agent", AGENT_FAST, Job(IN_TOPIC, "tput1", a), fast, True),
            ],
            "b": [
                ("paho", BARE_PAHO, Job(BARE_TOPIC, "tput100", b, args.per_message), paho, False),
                ("fast", BARE_FAST, Job(BARE_TOPIC, "tput100", b, args.per_message), fast, False),
                ("agent", AGENT_FAST, Job(IN_TOPIC, "tput100", b, args.per_message), fast, True),
            ],
            "c": [
                ("paho", BARE_PAHO, Job(BARE_TOPIC, "steady", steady, 1, args.rate), paho, False),
                ("agent", AGENT_PAHO, Job(IN_TOPIC, "steady", steady, 1, args.rate), paho, True),
            ],
        }
        for key, runs in modes.items():
            if key not in args.modes:
                continue
            r = results[key] = {
                side: run.measure(title, job, pub, through_agent=through)
                for side, title, job, pub, through in runs
            }
            # Next to the reference that drove the same publisher: the fast one where it ran.
            ref = r["fast" if "fast" in r else "paho"]["readings_per_s"]
            r["ratio"] = round(r["agent"]["readings_per_s"] / ref, 3) if ref else 0.0
    finally:
        sub.close()
        if agent is not None:
            stop(agent)
        for proc, conn in procs:
            with contextlib.suppress(OSError):
                conn.send(None)  # the publisher disconnects and exits
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join(5)
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
    return f"{value:>8.1f}" if value is not None else f"{'-':>8}"


#: The CPU columns: a run's key, and its heading (% of one core; `host`: the whole machine).
CPU_COLUMNS = (
    ("agent", "agent"),
    ("broker", "broker"),
    ("publisher", "pub"),
    ("subscriber", "sub"),
    ("ours", "ours"),
    ("machine", "host"),
)


def print_table(out: dict[str, Any]) -> None:
    m, c = out["machine"], out["config"]
    print("edge-agent bench: end to end (MQTT in, QoS 1 manual ack -> log -> MQTT out, QoS 1)")
    print(f"machine: nproc {m['nproc']} ({m['cpu']}), Python {m['python']}, paho {m['paho']},")
    load = " ".join(map(str, m["loadavg"]))
    print(f"         {m['mosquitto']}, load average {load} (at the end)")
    print(
        "config:  agent defaults (commit_interval 100 ms, synchronous=FULL, input max_inflight "
        f"{DEFAULT_INFLIGHT}, batch_size 500, linger 200 ms);"
    )
    print(
        f"         paho publisher window {c['window']}, fast publisher window "
        f"{c['fast_window']}, broker max_inflight_messages {c['broker_inflight']}"
    )
    # A message holds its broker slot until the group commit that holds it (module docstring).
    ceiling = c["broker_inflight"] / LogConfig().commit_interval
    print(
        f"         window ceiling for mode a: {ceiling:,.0f} readings/s (inflight / commit, "
        "where the broker keeps its window)"
    )
    print(
        f"CPU:     % of one core over the run (ours: the four processes; host: the machine, "
        f"of {100 * m['nproc']}, tick-sampled: low for mode c's short bursts)"
    )
    print()
    head = f"{'':36}{'readings/s':>11}{'p50 ms':>8}{'p99 ms':>8}{'arrived':>9}{'cpu ms/rd':>10}"
    print(head + "".join(f"{h:>7}" for _, h in CPU_COLUMNS))
    titles = {
        "a": f"a. {c['messages']:,} messages, 1 reading each, as fast as possible",
        "b": f"b. {c['batches']:,} messages of {c['per_message']} readings",
        "c": f"c. steady {c['rate']:,.0f} readings/s for {c['seconds']:g} s, 1 per message",
    }
    for key in ("a", "b", "c"):
        if key not in out:
            continue
        r = out[key]
        print(titles[key])
        for side in ("paho", "fast", "agent"):
            if side not in r:
                continue
            p = r[side]
            cpu = p.get("agent_cpu_ms_per_reading")
            cells = (
                f"{p['readings_per_s']:>11,.0f}{_ms(p['p50_ms'])}{_ms(p['p99_ms'])}"
                f"{p['arrived']:>9,}" + (f"{cpu:>10.4f}" if cpu is not None else f"{'':>10}")
            )
            for k, _ in CPU_COLUMNS:
                cells += (
                    f"{p[f'{k}_cpu_percent']:>7.1f}"
                    if side == "agent" or k != "agent"
                    else f"{'':>7}"
                )
            print(f"  {p['name']:34}{cells}")
        ref = "bare fast" if "fast" in r else "bare paho"
        print(f"  {'ratio agent / ' + ref:34}{r['ratio']:>11.2f}")
        cpu = r["agent"].get("agent_cpu_ms_per_reading")
        if key != "c" and cpu:
            # What the agent could do with a core to itself, whatever held it back here.
            print(f"  {'agent ceiling (1 core / cpu per rd)':34}{1000 / cpu:>11,.0f}")
    print()
    print("targets")
    rows: list[tuple[str, str, bool]] = []
    if "a" in out:
        a = out["a"]["agent"]
        cpu = a.get("agent_cpu_ms_per_reading")
        rate = a["readings_per_s"]
        rows.append(("a. >= 15,000 readings/s", f"{rate:,.0f}", rate >= TARGET_RATE_1))
        rows.append(
            (
                "a. agent CPU < 0.05 ms/reading",
                f"{cpu:.4f}" if cpu is not None else "-",
                cpu is not None and cpu < TARGET_CPU,
            )
        )
    if "b" in out:
        rate = out["b"]["agent"]["readings_per_s"]
        rows.append(("b. >= 100,000 readings/s", f"{rate:,.0f}", rate >= TARGET_RATE_100))
    if "c" in out:
        p50 = out["c"]["agent"]["p50_ms"]
        rows.append(
            (
                "c. p50 < 100 ms",
                f"{p50:.1f} ms" if p50 is not None else "-",
                p50 is not None and p50 < TARGET_P50,
            )
        )
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
        help="the paho publisher's unacknowledged messages (default 100: paho scans its whole "
        "window on every PUBACK, so a larger one makes it slower, not faster)",
    )
    p.add_argument(
        "--fast-window",
        type=_window,
        default=1000,
        help="the fast publisher's unacknowledged messages (default 1000; at most 65535)",
    )
    p.add_argument(
        "--broker-inflight",
        type=_positive_int,
        default=DEFAULT_INFLIGHT,
        help=f"mosquitto max_inflight_messages (default {DEFAULT_INFLIGHT}, the input's "
        "max_inflight; mosquitto's own default is 20)",
    )
    p.add_argument(
        "--modes",
        type=_modes,
        default="abc",
        help="which modes to run, e.g. b or ac (default abc)",
    )
    p.add_argument("--stall", type=float, default=15.0, help="give up after this long idle")
    p.add_argument("--dir", type=Path, default=None, help="where the temp dir goes")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def _modes(text: str) -> str:
    """An argparse type: some of the modes a, b and c."""
    if not text or set(text) - set("abc"):
        raise argparse.ArgumentTypeError("modes are some of a, b and c, as in 'ac'")
    return text


def _window(text: str) -> int:
    """An argparse type: a window of MQTT packet ids, 1 to 65535."""
    value = _positive_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError("MQTT has 65535 packet ids")
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="edge-bench-e2e-", dir=args.dir) as tmp:
        root = Path(tmp)
        try:
            results = bench(args, root)
        except LoadFailed as exc:
            # Not a low figure but a wrong one: say so, and fail.
            print(f"e2e: {exc}", file=sys.stderr)
            return 1
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
                "fast_window",
                "broker_inflight",
                "modes",
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
