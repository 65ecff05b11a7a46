"""`edge-sim verify`: planted losses, duplicates and gaps counted right; and once end to end."""

from __future__ import annotations

import json
import math
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from simulator.cli import app
from simulator.cloud import connect, parse_batch, store_batch
from simulator.record import Recorder
from simulator.signals import Line
from simulator.verify import format_report, verify_files
from tests.conftest import wait_until

REPO = Path(__file__).resolve().parent.parent
T0 = 1_764_170_000.0
LOG = "log1"


def sent_line(index: int, sensor: str, value: float | None, fault: Any = None) -> Line:
    ts = T0 + index
    return Line(index, sensor, value, "C", ts, fault, b"")


def record(path: Path, lines: list[Line]) -> None:
    with Recorder(path, output="serial", fmt="json", seed=0, rate=1.0, sensors=["t", "h"]) as rec:
        for line in lines:
            rec.add([line], sent_at=line.ts)  # the device clock is exact here


class Cloud:
    """A cloud database written with the endpoint's own schema and store."""

    def __init__(self, path: Path) -> None:
        self.conn = connect(path, create=True)
        self.seq: dict[str, int] = {}

    def event(self, stream: str, kind: str, time: float, **extra: Any) -> dict[str, Any]:
        seq = self.seq[stream] = self.seq.get(stream, 0) + 1
        return {
            "id": f"{LOG}:{stream}:{seq}", "stream": stream, "seq": seq, "kind": kind,
            "time": time, "recv_time": time, **extra,
        }  # fmt: skip

    def store(self, events: list[dict[str, Any]], received_at: float) -> None:
        batch = parse_batch({"log_id": LOG, "agent": "pi", "events": events})
        store_batch(self.conn, batch, received_at)

    def reading(self, sensor: str, value: float, time: float) -> dict[str, Any]:
        return self.event("readings", "reading", time, sensor=sensor, value=value, unit="C")


@pytest.fixture
def planted(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """temp1 loses one reading silently and one inside a reported disconnect; hum1 is
    delivered twice once (under another id) and resent once (same id); two fault lines."""
    sent = tmp_path / "sent.db"
    lines = [sent_line(i, "temp1", 20.0 + i) for i in range(10)]
    lines += [sent_line(i, "hum1", 50.0 + i) for i in range(10, 20)]
    lines += [sent_line(20, "temp1", None, "garble"), sent_line(21, "hum1", math.nan, "nan")]
    record(sent, lines)

    cloud = Cloud(tmp_path / "cloud.db")
    delivered = [ln for ln in lines[:20] if ln.index not in (3, 7)]
    first = [cloud.reading("board." + ln.sensor, ln.value or 0.0, ln.ts) for ln in delivered]
    cloud.store(first[:10], received_at=T0 + 30.0)
    cloud.store(first[10:], received_at=T0 + 30.5)
    cloud.store(first[10:12], received_at=T0 + 31.0)  # a resend: the cloud drops it
    twice = lines[15]
    cloud.store(
        [cloud.reading("board.hum1", twice.value or 0.0, twice.ts)], received_at=T0 + 32.0
    )  # the same reading again under a new id: a duplicate the cloud cannot see
    gap = {"input": "board", "reason": "disconnected", "detail": "hung up"}
    cloud.store(
        [
            cloud.event("agent", "gap", T0 + 8, data={**gap, "from": T0 + 6.5, "to": T0 + 7.5}),
            cloud.event("deadletter", "deadletter", T0 + 20, data={"reason": "invalid_json"}),
            cloud.event("deadletter", "deadletter", T0 + 21, data={"reason": "nan"}),
            # Another device's reading: not part of this run.
            cloud.reading("other.temp1", 1.0, T0 + 1),
        ],
        received_at=T0 + 33.0,
    )
    cloud.conn.close()
    yield sent, tmp_path / "cloud.db"


def test_verify_counts_a_planted_loss_duplicate_and_reported_gap(
    planted: tuple[Path, Path],
) -> None:
    sent, cloud = planted
    report = verify_files(sent, cloud, slack=0.0)
    assert report.prefix == "board."  # found from the data
    by = {v.sensor: v for v in report.sensors}
    t, h = by["temp1"], by["hum1"]
    assert (t.sent, t.delivered, t.lost, t.reported, t.silent, t.duplicates) == (10, 8, 2, 1, 1, 0)
    assert (h.sent, h.delivered, h.lost, h.reported, h.silent, h.duplicates) == (10, 10, 0, 0, 0, 1)
    assert (t.rejected, h.rejected, t.unexpected, h.unexpected) == (1, 1, 0, 0)
    assert report.total.silent == 1 and report.silent_loss
    assert report.resends_dropped == 2
    assert report.deadletter == {"invalid_json": 1, "nan": 1}
    (gap,) = report.gaps
    assert (gap.reason, gap.subject, gap.clock, gap.covers) == ("disconnected", "board", "wall", 1)
    # temp1: sent at T0 + i, received at T0 + 30: latencies 30 - i.
    assert t.latency_p50 == pytest.approx(30 - 5) and t.latency_p99 == pytest.approx(30 - 0)
    assert report.silent_examples == [
        {"sensor": "temp1", "ts": T0 + 3, "value": 23.0, "sent_at": T0 + 3}
    ]
    text = format_report(report)
    assert "verdict: SILENT LOSS: 1 of 20 readings lost without a gap" in text
    assert "disconnected (board)" in text and "accounts for 1 lost" in text


def test_a_reading_outside_a_gap_by_more_than_the_slack_is_silent(
    planted: tuple[Path, Path],
) -> None:
    sent, cloud = planted
    # The lost reading at T0 + 3 is 3.5 s before the gap: silent unless the slack covers it.
    assert verify_files(sent, cloud, slack=3.0).total.silent == 1
    wide = verify_files(sent, cloud, slack=3.6)
    assert (wide.total.silent, wide.total.reported, wide.silent_loss) == (0, 2, False)


def test_quota_gaps_account_for_readings_by_device_time(tmp_path: Path) -> None:
    sent = tmp_path / "sent.db"
    lines = [sent_line(i, "t1", float(i)) for i in range(20)]
    record(sent, lines)
    cloud = Cloud(tmp_path / "cloud.db")
    cloud.store([cloud.reading("t1", ln.value or 0.0, ln.ts) for ln in lines[10:]], T0 + 40)
    quota = {
        "stream": "readings", "reason": "quota", "count": 10, "first_seq": 1, "last_seq": 10,
        "first_time": T0 + 0, "last_time": T0 + 9, "first_recv_time": T0 + 0.1,
        "last_recv_time": T0 + 9.1,
    }  # fmt: skip
    cloud.store([cloud.event("agent", "gap", T0 + 50, data=quota)], T0 + 50)
    cloud.conn.close()
    report = verify_files(sent, tmp_path / "cloud.db")
    assert report.prefix == ""
    (v,) = report.sensors
    assert (v.sent, v.delivered, v.lost, v.reported, v.silent) == (20, 10, 10, 10, 0)
    (gap,) = report.gaps
    assert (gap.reason, gap.subject, gap.clock, gap.covers) == ("quota", "readings", "device", 10)
    assert not report.silent_loss


def test_cli_json_and_exit_codes(planted: tuple[Path, Path], tmp_path: Path) -> None:
    sent, cloud = planted
    runner = CliRunner()
    result = runner.invoke(
        app, ["verify", "--sent", str(sent), "--cloud", str(cloud), "--json", "--slack", "0"]
    )
    assert result.exit_code == 1, result.output
    doc = json.loads(result.stdout)
    assert doc["ok"] is False and doc["total"]["silent"] == 1 and doc["prefix"] == "board."
    assert {s["sensor"]: s["duplicates"] for s in doc["sensors"]} == {"hum1": 1, "temp1": 0}

    result = runner.invoke(
        app, ["verify", "--sent", str(sent), "--cloud", str(cloud), "--slack", "5"]
    )
    assert result.exit_code == 0, result.output
    assert "verdict: OK: 2 of 20 readings lost, every one reported" in result.stdout

    # A wrong prefix matches nothing: everything is lost, and the hint says why.
    result = runner.invoke(
        app, ["verify", "--sent", str(sent), "--cloud", str(cloud), "--prefix", "lab/"]
    )
    assert result.exit_code == 1
    assert "hint: nothing matched; is --prefix" in result.stdout

    result = runner.invoke(
        app, ["verify", "--sent", str(tmp_path / "no.db"), "--cloud", str(cloud)]
    )
    assert result.exit_code == 2 and "does not exist" in result.output


# --------------------------------------------------------------------------- end to end


def spawn(args: list[str], log: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=log.open("a"), text=True
    )


@pytest.mark.timeout(90)
def test_end_to_end_a_vanishing_port_is_a_reported_loss_and_faults_are_dead_letters(
    tmp_path: Path,
) -> None:
    logs = tmp_path / "logs.txt"
    procs: list[subprocess.Popen[str]] = []
    try:
        cloud = spawn(
            ["-m", "simulator.cli", "cloud", "--port", "0", "--db", str(tmp_path / "cloud.db")],
            logs,
        )
        procs.append(cloud)
        assert cloud.stdout is not None
        url = cloud.stdout.readline().strip().removeprefix("LISTENING ")
        link, sent = tmp_path / "ttySIM0", tmp_path / "sent.db"
        sim = spawn(
            [
                "-m",
                "simulator.cli",
                "serial",
                "--link",
                str(link),
                "--rate",
                "200",
                "--sensors",
                "3",
                "--duration",
                "2",
                "--wait-open",
                "--record",
                str(sent),
                "--fault",
                "outage:at=0.8s,duration=0.4s",
                "--fault",
                "garble:every=50",
                "--fault",
                "nan:every=70",
                "--fault",
                "oversize:every=90,length=2KiB",
            ],
            logs,
        )
        procs.append(sim)
        assert sim.stdout is not None and sim.stdout.readline().startswith("PORT ")
        config = tmp_path / "agent.yaml"
        data = tmp_path / "data"
        config.write_text(f"""
agent: {{name: e2e, data_dir: {data}, status_interval: 0.5}}
log: {{commit_interval: 20ms}}
inputs:
  - {{type: serial, name: board, port: {link}, sensor_prefix: "board.",
      reconnect_initial: 50ms, reconnect_max: 100ms}}
upstreams:
  - {{type: http, name: cloud, url: "{url}/ingest", batch_size: 200, linger: 10ms,
      backoff_initial: 20ms, backoff_max: 100ms}}
""")
        agent = spawn(["-m", "agent", "run", str(config)], logs)
        procs.append(agent)
        assert sim.wait(30) == 0, logs.read_text()[-3000:]

        def settled() -> bool:
            result = CliRunner().invoke(
                app, ["verify", "--sent", str(sent), "--cloud", str(tmp_path / "cloud.db")]
            )
            return result.exit_code == 0 and "gaps reported by the agent: 1" in result.stdout

        wait_until(settled, 30, "every reading delivered or reported")
        report = verify_files(sent, tmp_path / "cloud.db")
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(20) == 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)
    t = report.total
    assert report.prefix == "board."
    assert t.sent > 250 and t.silent == 0 and t.duplicates == 0 and t.unexpected == 0
    assert t.delivered + t.reported == t.sent
    (gap,) = report.gaps
    assert gap.subject == "board" and gap.clock == "wall"
    # Every fault line is in the dead-letter stream, not among readings, except those that
    # went the way of the readings the agent reported lost.
    conn = sqlite3.connect(sent)
    assert gap.start is not None and gap.end is not None
    (in_gap,) = conn.execute(
        "SELECT count(*) FROM sent WHERE fault IS NOT NULL AND sent_at BETWEEN ? AND ?",
        (gap.start - 2.0, gap.end + 2.0),
    ).fetchone()
    assert t.rejected - in_gap <= sum(report.deadletter.values()) <= t.rejected
    assert t.rejected > 0 and set(report.deadletter) <= {"invalid_json", "nan", "oversized"}
    (outage_lines,) = conn.execute("SELECT count(*) FROM sent WHERE discarded = 1").fetchone()
    assert outage_lines == t.discarded
