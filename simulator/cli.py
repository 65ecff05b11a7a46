"""`edge-sim`: the sensor simulator on a virtual serial port, and the local cloud endpoint.

Both commands print one machine-readable first line on stdout (`PORT /dev/pts/N`,
`LISTENING http://host:port`) so scripts and tests can start them and read where they are;
everything else goes to stderr. SIGTERM and Ctrl-C stop them cleanly with exit status 0.
"""

import asyncio
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from simulator.serial_port import PortError, SerialFeed, VirtualSerialPort
from simulator.signals import LineFormat, LineGenerator, parse_sensors

if TYPE_CHECKING:
    from simulator.cloud import CloudServer

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


# --- edge-sim serial ------------------------------------------------------------------------


async def _run_serial(
    lines: LineGenerator,
    count: int | None,
    duration: float | None,
    link: Path | None,
    drain_timeout: float,
) -> None:
    with VirtualSerialPort(link) as port:
        feed = SerialFeed(port, lines, count=count, duration=duration)
        task = asyncio.create_task(feed.run())
        _on_stop_signals(task.cancel)
        print(f"PORT {port.path}", flush=True)
        if link is not None:
            _say(f"link {link} -> {port.path}")
        try:
            await task
            # Closing the master discards what the reader has not taken yet.
            try:
                async with asyncio.timeout(drain_timeout):
                    await port.drain()
            except TimeoutError:
                _say(f"reader did not take the last {port.pending()} bytes in {drain_timeout}s")
        except asyncio.CancelledError:
            if not task.cancelled():
                raise
        s = feed.stats
        _say(f"sent {s.lines} lines ({s.garbled} garbled, {s.nans} NaN, {s.resyncs} resyncs)")


@app.command()
def serial(
    fmt: Annotated[
        str, typer.Option("--format", help="Line format: json or csv.", show_default=True)
    ] = "json",
    rate: Annotated[float, typer.Option(help="Readings per second, all sensors together.")] = 10.0,
    sensors: Annotated[
        str, typer.Option(help="A number of sensors, or comma-separated names (temp1,hum1).")
    ] = "3",
    seed: Annotated[int, typer.Option(help="Seed of the signal noise.")] = 0,
    duration: Annotated[
        float | None, typer.Option(help="Stop after this many seconds (default: run forever).")
    ] = None,
    count: Annotated[int | None, typer.Option(help="Stop after this many lines.")] = None,
    link: Annotated[
        Path | None, typer.Option(help="Keep a symlink to the port here (removed on exit).")
    ] = None,
    garble_every: Annotated[
        int | None, typer.Option(help="Every Nth line is garbage instead of a reading.")
    ] = None,
    nan_every: Annotated[int | None, typer.Option(help="Every Nth line carries NaN.")] = None,
    drain_timeout: Annotated[
        float, typer.Option(help="After --count/--duration, wait this long for the reader.")
    ] = 5.0,
) -> None:
    """Write simulated sensor lines to a virtual serial port (a pty) in real time."""
    if fmt not in ("json", "csv"):
        raise typer.BadParameter("use json or csv", param_hint="--format")
    if duration is not None and count is not None:
        raise typer.BadParameter("give --duration or --count, not both")
    line_format: LineFormat = "json" if fmt == "json" else "csv"
    try:
        lines = LineGenerator(
            parse_sensors(sensors),
            fmt=line_format,
            rate=rate,
            seed=seed,
            garble_every=garble_every,
            nan_every=nan_every,
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    try:
        asyncio.run(_run_serial(lines, count, duration, link, drain_timeout))
    except PortError as e:
        _say(f"error: {e}")
        raise typer.Exit(1) from e


# --- edge-sim cloud -------------------------------------------------------------------------


async def _run_cloud(server: "CloudServer") -> None:
    await server.start()
    try:
        stop = asyncio.Event()
        _on_stop_signals(stop.set)
        print(f"LISTENING {server.url}", flush=True)
        _say(f"storing into {server.db_path}")
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
    seed: Annotated[int, typer.Option(help="Seed of the fault draws.")] = 0,
) -> None:
    """Run the local stand-in for the cloud ingestion endpoint."""
    # Imported here: aiohttp takes a third of a second to import, and `serial` needs none of it.
    from simulator.cloud import CloudServer

    try:
        server = CloudServer(
            db, host, port, token, fail_rate, lose_ack_rate=lose_ack_rate, seed=seed
        )
    except ValueError as e:
        raise typer.BadParameter(str(e)) from e
    try:
        asyncio.run(_run_cloud(server))
    except (OSError, sqlite3.Error) as e:
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
