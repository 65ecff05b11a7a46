"""`edge-agent service install`: the steps, the unit it writes, and no overwrite of a config."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.service import install_steps, uninstall_steps, unit_text


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
