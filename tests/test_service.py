"""`edge-agent service install`: the steps, the unit it writes, and no overwrite of a config."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

import agent.service
from agent.cli import app
from agent.config import ConfigError, load_config, parse_config
from agent.preflight import key_file_problems
from agent.service import REPO, ServiceError, install_steps, uninstall_steps, unit_text

#: What `service install` reads, by its path in the source tree.
SHIPPED = [
    "systemd/edge-agent.service",
    "systemd/credentials.conf",
    "systemd/devices.conf",
    "systemd/watchdog.conf",
    "config/agent.example.yaml",
]


def test_install_writes_unit_and_config_but_never_overwrites(tmp_path: Path) -> None:
    steps = install_steps(
        unit_dir=tmp_path / "units",
        config_dir=tmp_path / "etc",
        executable="/opt/x/bin/edge-agent",
        have_user=False,
    )
    described = [s.describe for s in steps]
    assert described[0].startswith("useradd --system")
    assert described[-2:] == [
        "systemctl daemon-reload",
        "systemctl enable --now edge-agent.service",
    ]
    assert f"chown root:edge-agent {tmp_path / 'etc' / 'agent.yaml'}" in described
    for step in steps[1:3]:  # the two file writes; not useradd or systemctl
        step.run()
    unit = (tmp_path / "units" / "edge-agent.service").read_text()
    assert "ExecStart=/opt/x/bin/edge-agent run /etc/edge-agent/agent.yaml" in unit
    assert "@EDGE_AGENT@" not in unit
    config = tmp_path / "etc" / "agent.yaml"
    assert config.stat().st_mode & 0o777 == 0o640
    config.write_text("mine\n")
    again = install_steps(
        unit_dir=tmp_path / "units", config_dir=tmp_path / "etc", executable="x", have_user=True
    )
    assert not any(s.describe.startswith("useradd") for s in again)
    assert any(s.describe.startswith("keep") for s in again)
    for step in again:
        if step.describe.startswith(("keep", "write")):
            step.run()
    assert config.read_text() == "mine\n"


def test_a_regular_install_carries_what_service_install_writes(tmp_path: Path) -> None:
    """`pip install <source>` (not editable, as the README has it) leaves no source tree
    behind: the wheel must carry the unit, the drop-in examples and the example config, to
    where `SHARE` looks (<venv>/share/edge-agent)."""
    src = tmp_path / "src"
    for part in ("agent", "drivers", "simulator", "systemd", "config"):
        shutil.copytree(REPO / part, src / part, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path / "w"), src],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    (wheel,) = (tmp_path / "w").glob("*.whl")
    with zipfile.ZipFile(wheel) as whl:
        data = {
            name.partition(".data/data/share/edge-agent/")[2]: whl.read(name)
            for name in whl.namelist()
            if ".data/data/share/edge-agent/" in name
        }
    assert data == {Path(rel).name: (REPO / rel).read_bytes() for rel in SHIPPED}


def test_without_the_source_tree_the_installed_copies_are_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    share = tmp_path / "share" / "edge-agent"
    share.mkdir(parents=True)
    monkeypatch.setattr(agent.service, "REPO", tmp_path / "no-source-tree")
    monkeypatch.setattr(agent.service, "SHARE", share)
    where = {"unit_dir": tmp_path / "units", "config_dir": tmp_path / "etc"}
    with pytest.raises(ServiceError, match="reinstall edge-agent"):
        install_steps(**where, executable="/x/edge-agent", have_user=True)
    result = CliRunner().invoke(app, ["service", "install", "--dry-run"])
    assert result.exit_code == 1, result.output
    assert "service install: config/agent.example.yaml is neither" in result.output
    assert isinstance(result.exception, SystemExit), "a message, not a traceback"
    for rel in SHIPPED:
        shutil.copy(REPO / rel, share)
    for step in install_steps(**where, executable="/x/edge-agent", have_user=True):
        if step.describe.startswith("write"):
            step.run()
    unit = (tmp_path / "units" / "edge-agent.service").read_text()
    assert "ExecStart=/x/edge-agent run /etc/edge-agent/agent.yaml" in unit
    assert (tmp_path / "etc" / "agent.yaml").read_bytes() == (
        REPO / "config" / "agent.example.yaml"
    ).read_bytes()


def test_uninstall_keeps_config_and_log(tmp_path: Path) -> None:
    unit = tmp_path / "edge-agent.service"
    unit.write_text("x")
    steps = uninstall_steps(unit_dir=tmp_path)
    steps[1].run()
    assert not unit.exists()
    assert "keep /etc/edge-agent and /var/lib/edge-agent" in steps[-1].describe


def test_dry_run_prints_every_step_and_changes_nothing() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "service", "install", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert all(line.startswith("would: ") for line in lines)
    assert any("systemctl enable --now edge-agent.service" in line for line in lines)


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (issue 7 adds it to the test setup)",
)
def test_unit_verifies(tmp_path: Path) -> None:
    unit = tmp_path / "edge-agent.service"
    unit.write_text(unit_text(shutil.which("true") or "/bin/true"))
    proc = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "", "no warnings either (unknown keys are only warnings)"


def _with_drop_ins(tmp_path: Path) -> Path:
    unit = tmp_path / "edge-agent.service"
    unit.write_text(unit_text(shutil.which("true") or "/bin/true"))
    drop_ins = tmp_path / "edge-agent.service.d"
    drop_ins.mkdir()
    for example in sorted((REPO / "systemd").glob("*.conf")):
        shutil.copy(example, drop_ins / example.name)
    return unit


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed"
)


@needs_systemd_analyze
def test_drop_in_examples_verify(tmp_path: Path) -> None:
    unit = _with_drop_ins(tmp_path)
    env = os.environ | {"SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, env=env
    )
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@needs_systemd_analyze
def test_unit_exposure_is_at_most_2(tmp_path: Path) -> None:
    unit = _with_drop_ins(tmp_path)  # the examples must not weaken the sandbox
    env = os.environ | {"SYSTEMD_UNIT_PATH": f"{tmp_path}:"}
    proc = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        env=env,
    )
    found = re.search(r"Overall exposure level for edge-agent.service: ([0-9.]+)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert float(found.group(1)) <= 2.0, proc.stdout


def test_unit_is_a_notify_service_with_a_watchdog_and_serial_access() -> None:
    settings: dict[str, list[str]] = {}
    for line in unit_text("/x/edge-agent").splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    expected = {
        "Type": ["notify"],
        "NotifyAccess": ["main"],
        "Restart": ["on-failure"],
        "ExecReload": ["/bin/kill -HUP $MAINPID"],
        "User": ["edge-agent"],
        "SupplementaryGroups": ["dialout"],
        "DevicePolicy": ["closed"],
        "CapabilityBoundingSet": [""],
        "NoNewPrivileges": ["yes"],
        "ProtectSystem": ["strict"],
        "MemoryDenyWriteExecute": ["yes"],
        "RestrictAddressFamilies": ["AF_UNIX AF_INET AF_INET6"],
    }
    for key, values in expected.items():
        assert settings.get(key) == values, key
    assert settings["WatchdogSec"] and settings["StateDirectory"] == ["edge-agent"]
    assert "char-ttyUSB rw" in settings["DeviceAllow"]
    assert "char-ttyAMA rw" in settings["DeviceAllow"]


def test_credentials_fill_in_what_the_environment_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "EDGE_CLOUD_TOKEN").write_text("s3cret\n")
    text = (
        "upstreams:\n  - {type: http, name: c, url: 'https://x/i', token: '${EDGE_CLOUD_TOKEN}'}\n"
    )
    monkeypatch.delenv("EDGE_CLOUD_TOKEN", raising=False)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="LoadCredential=EDGE_CLOUD_TOKEN"):
        parse_config(text)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert parse_config(text).upstreams[0].token == "s3cret"
    monkeypatch.setenv("EDGE_CLOUD_TOKEN", "from-env")  # the environment comes first
    assert parse_config(text).upstreams[0].token == "from-env"
    key = parse_config(
        "upstreams:\n  - {type: http, name: c, url: 'https://x/i', cert_file: /c.pem,"
        " key_file: '${CREDENTIALS_DIRECTORY}/client.key'}\n"
    ).upstreams[0]
    assert key.key_file == creds / "client.key"


def test_a_key_file_others_can_read_is_refused_at_start(tmp_path: Path) -> None:
    key = tmp_path / "client.key"
    key.write_text("-----BEGIN PRIVATE KEY-----\n")
    key.chmod(0o644)
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"agent: {{data_dir: {tmp_path / 'data'}}}\n"
        "upstreams:\n"
        f"  - {{type: http, name: c, url: 'https://x/i', cert_file: /c.pem, key_file: {key}}}\n"
    )
    cfg = load_config(config)
    (problem,) = key_file_problems(cfg)
    assert problem.startswith(f"{key}: upstreams[0].key_file: the private key is readable")
    assert "mode 0644" in problem and f"chmod 600 {key}" in problem
    proc = subprocess.run(
        [sys.executable, "-m", "agent", "run", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and proc.stderr.strip() == problem
    assert not (tmp_path / "data").exists(), "refused before anything started"
    key.chmod(0o640)
    assert key_file_problems(cfg) == []
