"""What the running agent imports: only the libraries its config uses (issue 7, peak RSS); and
how it tunes its cycle collector.

Each library costs RSS for the agent's whole life (on a Pi: paho about 1 MiB, aiohttp.web and
prometheus_client about 3, rich about 2), so the `run` path imports a part's library only when
the config has that part. Each case runs the real `edge-agent run CONFIG` in a fresh
interpreter until its parts are working, stops it with SIGTERM, and reads the modules it had
loaded by then (written at exit). The cases pull both ways: a library must be absent where
nothing uses it and present where something does, so a broken probe cannot pass.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import tty
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.daemon import GC_THRESHOLDS, SWITCH_INTERVAL
from tests.conftest import free_port, wait_until

#: Runs the CLI as `python -m agent` does, and writes sys.modules and the cycle collector's
#: settings when the interpreter exits.
RUN_AND_DUMP = """
import atexit, gc, json, sys
out, config = sys.argv[1:]
atexit.register(lambda: open(out, "w").write(json.dumps({
    "modules": sorted(sys.modules),
    "gc": {"threshold": gc.get_threshold(), "frozen": gc.get_freeze_count()},
    "switch_interval": sys.getswitchinterval(),
})))
sys.argv = ["edge-agent", "run", config]
from agent.daemon import main
main()
"""


@pytest.fixture
def serial_port() -> Iterator[tuple[int, str]]:
    """A pty pair: the agent reads the slave (by path); the test writes the master."""
    master, slave = os.openpty()
    tty.setraw(slave)
    yield master, os.ttyname(slave)
    os.close(master)
    os.close(slave)


def _readings(db: Path) -> int:
    if not db.exists():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return int(conn.execute("SELECT count(*) FROM events WHERE stream=1").fetchone()[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return int(resp.status) in (200, 503)
    except OSError:
        return False


def modules_of_run(tmp_path: Path, config: str, running: Callable[[], bool]) -> set[str]:
    """Run the agent on `config` until `running()` holds, stop it; the modules it loaded."""
    return set(run_and_dump(tmp_path, config, running)["modules"])


def run_and_dump(tmp_path: Path, config: str, running: Callable[[], bool]) -> dict[str, Any]:
    """Run the agent on `config` until `running()` holds, stop it; what RUN_AND_DUMP wrote."""
    path, out = tmp_path / "agent.yaml", tmp_path / "modules.json"
    path.write_text(config)
    log = (tmp_path / "agent.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-c", RUN_AND_DUMP, str(out), str(path)],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        wait_until(lambda: running() or proc.poll() is not None, 30, "the agent running")
        assert proc.poll() is None, (tmp_path / "agent.log").read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "agent.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    dump: dict[str, Any] = json.loads(out.read_text())
    return dump


def loaded(modules: set[str], name: str) -> bool:
    """Whether package or module `name` (or any module inside it) was imported."""
    return any(m == name or m.startswith(name + ".") for m in modules)


def test_serial_and_http_upstream_load_no_mqtt_metrics_or_rich(
    tmp_path: Path, serial_port: tuple[int, str]
) -> None:
    # The soak's shape (bench/soak.py): serial in, a window, a rule, an HTTP upstream.
    master, port = serial_port
    data = tmp_path / "data"
    config = f"""
agent: {{name: imports, data_dir: {data}, status_interval: 100ms}}
inputs:
  - {{type: serial, name: sim, port: "{port}", format: json}}
processing:
  windows: [{{name: mean10s, sensors: "*", size: 10s, function: mean}}]
  rules: [{{name: high, window: mean10s, sensors: "*", above: 25.0, clear_below: 23.0}}]
upstreams:
  - {{type: http, name: cloud, url: "http://127.0.0.1:{free_port()}/ingest"}}
"""
    db = data / "events.db"

    def device_heard() -> bool:
        # The driver drops what the tty held before it opened: the device keeps talking.
        os.write(master, b'{"sensor": "t1", "value": 21.5}\n')
        return _readings(db) >= 10

    dump = run_and_dump(tmp_path, config, device_heard)
    modules = set(dump["modules"])
    for needed in ("serial", "agent.httpclient", "aiosqlite", "numpy", "pydantic"):
        assert loaded(modules, needed), needed
    for unused in ("paho", "prometheus_client", "aiohttp", "rich", "typer", "click"):
        assert not loaded(modules, unused), f"{unused} imported with nothing using it"
    # agent.daemon.tune_interpreter: what startup made is out of every collection, and young
    # collections are rare enough that readings are committed and freed before them.
    assert tuple(dump["gc"]["threshold"]) == GC_THRESHOLDS
    assert dump["gc"]["frozen"] > 10_000
    # ...and the log's writer thread gets the GIL back within half a millisecond.
    assert dump["switch_interval"] == pytest.approx(SWITCH_INTERVAL)


def test_mqtt_parts_load_paho_and_no_aiohttp(tmp_path: Path) -> None:
    # Nothing listens on these ports: the input and the upstream retry, which is enough to
    # have built and started them.
    data = tmp_path / "data"
    config = f"""
agent: {{name: imports, data_dir: {data}, status_interval: 100ms}}
inputs:
  - {{type: mqtt, name: lan, url: "mqtt://127.0.0.1:{free_port()}", client_id: imports-in}}
upstreams:
  - {{type: mqtt, name: cloud, url: "mqtt://127.0.0.1:{free_port()}", client_id: imports-out}}
"""
    status = data / "status.json"
    modules = modules_of_run(tmp_path, config, status.exists)
    assert loaded(modules, "paho")
    for unused in ("aiohttp", "prometheus_client", "serial", "rich"):
        assert not loaded(modules, unused), f"{unused} imported with nothing using it"


def test_health_listener_loads_aiohttp_web_and_prometheus(tmp_path: Path) -> None:
    port = free_port()
    data = tmp_path / "data"
    config = f"""
agent: {{name: imports, data_dir: {data}, status_interval: 100ms}}
health: {{listen: "127.0.0.1:{port}"}}
inputs:
  - {{type: simulated, name: sim, rate: 10, sensors: [{{name: t1}}]}}
"""
    modules = modules_of_run(tmp_path, config, lambda: _answers(f"http://127.0.0.1:{port}/metrics"))
    for needed in ("aiohttp.web", "prometheus_client"):
        assert loaded(modules, needed), needed
    for unused in ("paho", "serial", "rich"):
        assert not loaded(modules, unused), f"{unused} imported with nothing using it"


def test_importing_the_run_path_loads_no_optional_library() -> None:
    # What bench/soak.py measures as "agent imported, idle": the modules alone, no config.
    code = (
        "import json, sys, agent.daemon, agent.runtime, agent.upstream_http, drivers.serial; "
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    )
    modules = set(json.loads(out.stdout))
    for unused in ("paho", "prometheus_client", "aiohttp", "rich", "typer"):
        assert not loaded(modules, unused), unused
