"""`edge-sim`: the sensor simulator (a virtual serial port, MQTT, stdout), the local cloud
endpoint, and `verify`, the delivery verdict.

Long-running commands print one machine-readable first line on stdout (`PORT /dev/pts/N`,
`PUBLISHING mqtt://...`, `LISTENING http://host:port`) so scripts and tests can start them
and read where they are; everything else goes to stderr (`stdout` writes its lines there).
SIGTERM and Ctrl-C stop them cleanly with exit status 0. Bad options or profiles exit 2.
"""

import asyncio
import json
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simulator.serial_port import PortError, SerialOutput, VirtualSerialPort
from simulator.signals import LINE_FORMATS, LineGenerator, SensorModel, parse_rate, parse_sensors

if TYPE_CHECKING:
    from simulator.cloud import CloudServer
    from simulator.outputs import Feed, Output
    from simulator.profiles import Profile

app = typer.Typer(
    name="edge-sim",
    help="Simulated sensors on a virtual serial port, and a local cloud ingestion endpoint.",
    no_args_is_help=True,
    add_completion=False,
)


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _on_stop_signals(callback: Callable[[], object]) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, callback)


# --- edge-sim serial / mqtt / stdout / run: simulated sensors -------------------------------

ProfileOption = Annotated[
    Path | None,
    typer.Option(
        "--profile",
        help="A simulator profile (YAML, see config/simulator.yaml); options override it.",
    ),
]
FormatOption = Annotated[
    str | None, typer.Option("--format", help="Line format: json, csv or kv.  [default: json]")
]
RateOption = Annotated[
    str | None,
    typer.Option(
        help="Readings per second, all sensors together: 20000, 10/s, 1/min.  [default: 10]"
    ),
]
SensorsOption = Annotated[
    str | None,
    typer.Option(help="A number of sensors, or comma-separated names (temp1,hum1).  [default: 3]"),
]
SeedOption = Annotated[int | None, typer.Option(help="Seed of signals and faults.  [default: 0]")]
DurationOption = Annotated[
    str | None,
    typer.Option(help="Stop after this much signal time (10, 90s, 10m; default: never)."),
]
CountOption = Annotated[int | None, typer.Option(help="Stop after this many lines.")]
FastOption = Annotated[
    bool | None,
    typer.Option(
        "--fast/--realtime",
        help="As fast as the output takes lines, device times from --start-time; or paced in "
        "real time.  [default: realtime]",
    ),
]
RecordOption = Annotated[
    Path | None,
    typer.Option(help="Record every line sent in this SQLite file (for `edge-sim verify`)."),
]
FaultOption = Annotated[
    list[str] | None,
    typer.Option(
        "--fault",
        help="A fault, KIND[:key=value,...], repeatable: garble:every=50, nan:probability=0.01, "
        "invalid_utf8:every=100, oversize:every=200,length=4KiB, outage:at=10s,duration=3s"
        "[,every=60s], burst:at=5s,duration=2s, skew:offset=-90s[,drift_ppm=50], "
        "clock_step:at=20s,by=-1h. See config/simulator.yaml.",
    ),
]
GarbleOption = Annotated[
    int | None, typer.Option(help="Every Nth line is garbage instead of a reading.")
]
NanOption = Annotated[int | None, typer.Option(help="Every Nth line carries NaN.")]
FinishOption = Annotated[
    float, typer.Option(help="After --count/--duration, wait this long for the reader.")
]


def _resolve(
    profile_path: Path | None,
    fmt: str | None,
    rate: str | None,
    sensors: str | None,
    seed: int | None,
    duration: str | None,
    count: int | None,
    fast: bool | None,
    record: Path | None,
    faults: list[str] | None,
    garble_every: int | None = None,
    nan_every: int | None = None,
) -> tuple["Profile", list[SensorModel]]:
    """The profile (file, then command-line options over it) and its sensor models."""
    from agent.config import ConfigError
    from agent.units import parse_duration
    from simulator.profiles import Profile, build_models, load_profile, with_faults

    try:
        profile = load_profile(profile_path) if profile_path else Profile()
    except ConfigError as e:
        _say(str(e))
        raise typer.Exit(2) from e
    updates: dict[str, object] = {}
    if fmt is not None:
        if fmt not in LINE_FORMATS:
            raise typer.BadParameter(f"use one of {', '.join(LINE_FORMATS)}", param_hint="--format")
        updates["format"] = fmt
    if rate is not None:
        try:
            updates["rate"] = parse_rate(rate)
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--rate") from e
    if duration is not None and count is not None:
        raise typer.BadParameter("give --duration or --count, not both")
    if duration is not None:
        try:
            updates["duration"], updates["count"] = parse_duration(duration), None
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--duration") from e
    if count is not None:
        if count < 0:
            raise typer.BadParameter("must be >= 0", param_hint="--count")
        updates["count"], updates["duration"] = count, None
    for key, value in (("seed", seed), ("record", record)):
        if value is not None:
            updates[key] = value
    if fast is not None:
        updates["realtime"] = not fast
    profile = profile.model_copy(update=updates)
    specs = list(faults or [])
    for kind, every in (("garble", garble_every), ("nan", nan_every)):
        if every is not None:
            if every < 1:
                raise typer.BadParameter("must be >= 1", param_hint=f"--{kind}-every")
            specs.append(f"{kind}:every={every}")
    try:
        profile = with_faults(profile, specs)
        models = parse_sensors(sensors) if sensors is not None else build_models(profile)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    return profile, models


async def _simulate(
    profile: "Profile", models: list[SensorModel], output: "Output", finish_timeout: float
) -> None:
    """Open the output, announce it, feed it until done or a stop signal, then close it."""
    from simulator.outputs import Feed, MqttOutput
    from simulator.profiles import build_clock, build_line_faults, build_timeline
    from simulator.record import Recorder

    lines = LineGenerator(
        models,
        fmt=profile.format,
        rate=profile.rate,
        seed=profile.seed,
        faults=build_line_faults(profile.faults),
    )
    recorder = None
    if profile.record is not None:
        recorder = Recorder(
            profile.record,
            output=output.name,
            fmt=profile.format,
            seed=profile.seed,
            rate=profile.rate,
            sensors=[m.name for m in models],
        )
    timeline = build_timeline(profile.faults)
    feed = Feed(
        output,
        lines,
        count=profile.count,
        duration=profile.duration,
        realtime=profile.realtime,
        start_time=profile.start_time,
        clock=build_clock(profile.faults),
        outages=timeline.outages,
        bursts=timeline.bursts,
        recorder=recorder,
    )
    try:
        await output.open()
        if isinstance(output, SerialOutput):
            print(f"PORT {output.port.path}", flush=True)
            if output.port.link is not None:
                _say(f"link {output.port.link} -> {output.port.path}")
        elif isinstance(output, MqttOutput):
            print(f"PUBLISHING {output.cfg.url} {output.cfg.topic}", flush=True)
        task = asyncio.create_task(_ready_then_feed(output, feed))
        _on_stop_signals(task.cancel)
        try:
            await task
            await output.finish(finish_timeout)
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
    finally:
        await output.close()
        if recorder is not None:
            recorder.close()
            _say(f"recorded {recorder.rows} lines in {recorder.path} (run {recorder.run})")
    _say(feed.stats.summary())


async def _ready_then_feed(output: "Output", feed: "Feed") -> None:
    if isinstance(output, SerialOutput) and output.wait_open:
        _say("waiting for a reader to open the port")
        await output.ready()
    await feed.run()


def _execute(
    profile: "Profile", models: list[SensorModel], output: "Output", finish_timeout: float
) -> None:
    from simulator.outputs import OutputError

    try:
        asyncio.run(_simulate(profile, models, output, finish_timeout))
    except (PortError, OutputError, OSError, sqlite3.Error) as e:
        _say(f"error: {e}")
        raise typer.Exit(1) from e


@app.command()
def serial(
    fmt: FormatOption = None,
    rate: RateOption = None,
    sensors: SensorsOption = None,
    seed: SeedOption = None,
    duration: DurationOption = None,
    count: CountOption = None,
    link: Annotated[
        Path | None, typer.Option(help="Keep a symlink to the port here (removed on exit).")
    ] = None,
    garble_every: GarbleOption = None,
    nan_every: NanOption = None,
    drain_timeout: FinishOption = 5.0,
    wait_open: Annotated[
        bool | None,
        typer.Option(
            "--wait-open/--no-wait-open",
            help="Send nothing until a reader opened the port (seen as pyserial sets it up).",
        ),
    ] = None,
    profile: ProfileOption = None,
    fast: FastOption = None,
    record: RecordOption = None,
    fault: FaultOption = None,
) -> None:
    """Simulated sensor lines on a virtual serial port (a pty); first line `PORT /dev/pts/N`."""
    cfg, models = _resolve(
        profile, fmt, rate, sensors, seed, duration, count, fast, record, fault, garble_every,
        nan_every,
    )  # fmt: skip
    outage_drain, waits = 0.5, False
    if cfg.output.type == "serial":
        link = cfg.output.link if link is None else link
        outage_drain, waits = cfg.output.outage_drain, cfg.output.wait_open
    waits = waits if wait_open is None else wait_open
    output = SerialOutput(VirtualSerialPort(link), outage_drain=outage_drain, wait_open=waits)
    _execute(cfg, models, output, drain_timeout)


@app.command()
def mqtt(
    url: Annotated[
        str | None,
        typer.Option(help="Broker: mqtt://HOST[:PORT].  [default: mqtt://127.0.0.1:1883]"),
    ] = None,
    topic: Annotated[
        str | None,
        typer.Option(help="Topic template; {sensor}, {device}.  [default: sensors/{sensor}]"),
    ] = None,
    qos: Annotated[int | None, typer.Option(help="0, 1 or 2.  [default: 1]")] = None,
    retain: Annotated[
        bool | None, typer.Option("--retain/--no-retain", help="Retained messages.")
    ] = None,
    payload: Annotated[
        str | None, typer.Option(help="line (the formatted line) or number (the bare value).")
    ] = None,
    device: Annotated[str | None, typer.Option(help="The {device} of the topic.")] = None,
    client_id: Annotated[str | None, typer.Option(help="MQTT client id.")] = None,
    fmt: FormatOption = None,
    rate: RateOption = None,
    sensors: SensorsOption = None,
    seed: SeedOption = None,
    duration: DurationOption = None,
    count: CountOption = None,
    garble_every: GarbleOption = None,
    nan_every: NanOption = None,
    profile: ProfileOption = None,
    fast: FastOption = None,
    record: RecordOption = None,
    fault: FaultOption = None,
    finish_timeout: Annotated[
        float, typer.Option(help="At the end, wait this long for the broker's acks.")
    ] = 10.0,
) -> None:
    """Publish simulated readings to an MQTT broker; first line `PUBLISHING URL TOPIC`."""
    from pydantic import ValidationError

    from simulator.outputs import MqttOutput
    from simulator.profiles import MqttOutputConfig

    cfg, models = _resolve(
        profile, fmt, rate, sensors, seed, duration, count, fast, record, fault, garble_every,
        nan_every,
    )  # fmt: skip
    base: dict[str, object] = (
        cfg.output.model_dump() if cfg.output.type == "mqtt" else {"type": "mqtt"}
    )
    given: dict[str, object] = {
        "url": url, "topic": topic, "qos": qos, "retain": retain, "payload": payload,
        "device": device, "client_id": client_id,
    }  # fmt: skip
    base.update({k: v for k, v in given.items() if v is not None})
    try:
        out_cfg = MqttOutputConfig.model_validate(base)
    except ValidationError as e:
        problems = "; ".join(
            f"{'.'.join(map(str, err['loc'])) or 'mqtt'}: "
            + err["msg"].removeprefix("Value error, ")
            for err in e.errors()
        )
        raise typer.BadParameter(problems) from e
    _execute(cfg, models, MqttOutput(out_cfg), finish_timeout)


@app.command()
def stdout(
    fmt: FormatOption = None,
    rate: RateOption = None,
    sensors: SensorsOption = None,
    seed: SeedOption = None,
    duration: DurationOption = None,
    count: CountOption = None,
    garble_every: GarbleOption = None,
    nan_every: NanOption = None,
    profile: ProfileOption = None,
    fast: FastOption = None,
    record: RecordOption = None,
    fault: FaultOption = None,
) -> None:
    """Simulated sensor lines on standard output (everything else on stderr)."""
    from simulator.outputs import StdoutOutput

    cfg, models = _resolve(
        profile, fmt, rate, sensors, seed, duration, count, fast, record, fault, garble_every,
        nan_every,
    )  # fmt: skip
    _execute(cfg, models, StdoutOutput(), 0.0)


@app.command()
def run(
    profile: Annotated[Path, typer.Argument(help="The simulator profile (YAML).")],
    rate: RateOption = None,
    seed: SeedOption = None,
    duration: DurationOption = None,
    count: CountOption = None,
    fast: FastOption = None,
    record: RecordOption = None,
    fault: FaultOption = None,
) -> None:
    """Run a simulator profile, output and all (`output:` in the file)."""
    from simulator.outputs import MqttOutput, StdoutOutput

    cfg, models = _resolve(profile, None, rate, None, seed, duration, count, fast, record, fault)
    out = cfg.output
    output: Output
    finish = 0.0
    if out.type == "serial":
        port = VirtualSerialPort(out.link)
        output = SerialOutput(port, outage_drain=out.outage_drain, wait_open=out.wait_open)
        finish = out.drain_timeout
    elif out.type == "mqtt":
        output, finish = MqttOutput(out), 10.0
    else:
        output = StdoutOutput()
    _execute(cfg, models, output, finish)


# --- edge-sim verify ------------------------------------------------------------------------


@app.command()
def verify(
    sent: Annotated[Path, typer.Option(help="The simulator's record (--record FILE).")],
    cloud: Annotated[Path, typer.Option(help="The local cloud's database (edge-sim cloud --db).")],
    prefix: Annotated[
        str | None,
        typer.Option(help="The agent input's sensor_prefix (default: found from the data)."),
    ] = None,
    json_out: Annotated[
        bool, typer.Option("--json", help="One JSON document for scripts.")
    ] = False,
    slack: Annotated[
        float,
        typer.Option(help="Seconds a reported gap is widened by when losses are attributed."),
    ] = 2.0,
) -> None:
    """Compare what the simulator sent with what reached the cloud; exit 1 on silent loss."""
    from simulator.verify import VerifyError, format_report, verify_files

    try:
        report = verify_files(sent, cloud, prefix=prefix, slack=slack)
    except VerifyError as e:
        _say(f"error: {e}")
        raise typer.Exit(2) from e
    if json_out:
        print(json.dumps(report.as_dict(), indent=2))
    else:
        print(format_report(report))
    raise typer.Exit(1 if report.silent_loss else 0)


# --- edge-sim cloud -------------------------------------------------------------------------


async def _run_cloud(server: "CloudServer") -> None:
    await server.start()
    try:
        stop = asyncio.Event()
        _on_stop_signals(stop.set)
        print(f"LISTENING {server.url}", flush=True)
        _say(f"storing into {server.db_path}; live page at {server.url}/")
        if server.mqtt is not None:
            _say(f"subscribed to {', '.join(server.mqtt.topics)} at {server.mqtt.url}")
        faults = {k: v for k, v in server.faults.as_dict().items() if v and k != "retry_after"}
        if faults:
            _say("faults: " + ", ".join(f"{k}={v}" for k, v in faults.items()))
        await stop.wait()
    finally:
        await server.stop()


@app.command()
def cloud(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind; 0 picks a free one.")] = 8080,
    db: Annotated[Path, typer.Option(help="SQLite file of received events.")] = Path(
        "edge-cloud.sqlite"
    ),
    token: Annotated[
        str | None, typer.Option(help="Require `Authorization: Bearer TOKEN` on POSTs.")
    ] = None,
    fail_rate: Annotated[
        float, typer.Option(help="Fraction of ingest POSTs answered 500 (seeded).")
    ] = 0.0,
    lose_ack_rate: Annotated[
        float, typer.Option(help="Fraction of ingest POSTs stored, then answered 500.")
    ] = 0.0,
    throttle_rate: Annotated[
        float, typer.Option(help="Fraction of ingest POSTs answered 429 with Retry-After.")
    ] = 0.0,
    retry_after: Annotated[float, typer.Option(help="Seconds in the Retry-After of a 429.")] = 1.0,
    latency: Annotated[float, typer.Option(help="Seconds added before every ingest answer.")] = 0.0,
    jitter: Annotated[
        float, typer.Option(help="Up to this many more seconds, drawn per request.")
    ] = 0.0,
    drop_rate: Annotated[
        float,
        typer.Option(
            help="Fraction of ingest POSTs stored, then the connection closed unanswered."
        ),
    ] = 0.0,
    down_for: Annotated[
        float | None,
        typer.Option(help="Start down (503) and come back after this many seconds."),
    ] = None,
    mqtt_url: Annotated[
        str | None,
        typer.Option(help="Also store what arrives on a broker: mqtt://host:port or user:pw@host."),
    ] = None,
    mqtt_topic: Annotated[
        list[str] | None,
        typer.Option(help="Topic filter to subscribe to (repeatable; default edge/#)."),
    ] = None,
    mqtt_qos: Annotated[int, typer.Option(help="QoS of the subscription.")] = 1,
    mqtt_client_id: Annotated[
        str | None,
        typer.Option(help="MQTT client id (default: derived from --db; the session persists)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
    sync: Annotated[
        str,
        typer.Option(
            help="full: fsync every batch before its 200; normal: only at WAL checkpoints; "
            "off: never (for benchmarks: the agent's rate, not the disk's)."
        ),
    ] = "full",
) -> None:
    """Run the local stand-in for the cloud ingestion endpoint, with its live page at /.

    Every fault can also be changed while it runs: POST /control {"throttle_rate": 0.2, ...}.
    """
    # Imported here: aiohttp takes a third of a second to import, and `serial` needs none of it.
    import logging

    from simulator.cloud import SYNC_LEVELS, CloudError, CloudServer, MqttSubscription

    subscription = None
    if mqtt_url is not None:
        try:
            subscription = MqttSubscription(
                mqtt_url, tuple(mqtt_topic or ("edge/#",)), mqtt_qos, mqtt_client_id
            )
        except ValueError as e:
            raise typer.BadParameter(str(e), param_hint="--mqtt-url/--mqtt-topic") from e
    elif mqtt_topic:
        raise typer.BadParameter("--mqtt-topic needs --mqtt-url", param_hint="--mqtt-topic")
    if sync not in SYNC_LEVELS:
        raise typer.BadParameter(f"use one of {', '.join(SYNC_LEVELS)}", param_hint="--sync")
    try:
        server = CloudServer(
            db,
            host,
            port,
            token,
            fail_rate,
            lose_ack_rate=lose_ack_rate,
            throttle_rate=throttle_rate,
            retry_after=retry_after,
            latency=latency,
            jitter=jitter,
            drop_rate=drop_rate,
            down_for=down_for,
            mqtt=subscription,
            seed=seed,
            sync=sync,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    try:
        asyncio.run(_run_cloud(server))
    except (OSError, sqlite3.Error, CloudError) as e:
        _say(f"error: {e}")
        raise typer.Exit(1) from e


# --- edge-sim demo: added by the lead -------------------------------------------------------


@app.command()
def demo(
    config: Annotated[Path, typer.Option(help="The agent config the demo runs.")] = Path(
        "config/demo.yaml"
    ),
    rate: Annotated[float, typer.Option(help="Readings per second, all sensors together.")] = 5.0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: at Ctrl-C).")
    ] = None,
    sensors: Annotated[
        str, typer.Option(help="A number of sensors, or comma-separated names (temp1,hum1).")
    ] = "3",
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Start over: delete the log and the cloud's database.")
    ] = False,
    garble_every: Annotated[
        int | None, typer.Option(help="Every Nth simulated line is garbage (bad input).")
    ] = None,
    nan_every: Annotated[int | None, typer.Option(help="Every Nth line carries NaN.")] = None,
) -> None:
    """Run the laptop demo: simulator on a pty, the agent, a local cloud, and a live view."""
    if rate <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--rate")
    if duration is not None and duration <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--duration")
    try:
        parse_sensors(sensors)
    except ValueError as e:
        raise typer.BadParameter(str(e), param_hint="--sensors") from e
    from simulator.demo import run_demo

    for name, every in (("--garble-every", garble_every), ("--nan-every", nan_every)):
        if every is not None and every < 1:
            raise typer.BadParameter("must be >= 1", param_hint=name)
    code = run_demo(
        config,
        rate=rate,
        sensors=sensors,
        duration=duration,
        fresh=fresh,
        garble_every=garble_every,
        nan_every=nan_every,
    )
    raise typer.Exit(code)


def main() -> None:
    """Console-script entry point (`edge-sim`)."""
    app()


if __name__ == "__main__":
    main()
