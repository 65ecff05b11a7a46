"""`edge-agent service install|uninstall`: put the agent under systemd on a Raspberry Pi.

Every step is a plain command or file write, printed before it runs; `--dry-run` only prints.
An existing config is never overwritten.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

UNIT_NAME = "edge-agent.service"
USER = "edge-agent"
#: The source tree: an editable install (the README's) or a checkout.
REPO = Path(__file__).resolve().parent.parent
#: Where a regular install (`pip install <path>`, a wheel) puts the unit, the drop-in examples
#: and the example config (pyproject's data-files): the source tree is not there to read.
SHARE = Path(sys.prefix) / "share" / "edge-agent"


class ServiceError(Exception):
    """What the project ships for the service is not where an install puts it."""


def shipped(relative: str) -> Path:
    """A file the project ships, by its path in the source tree (`systemd/edge-agent.service`):
    from the source tree when it is there, else from `SHARE`."""
    for path in (REPO / relative, SHARE / Path(relative).name):
        if path.is_file():
            return path
    raise ServiceError(
        f"{relative} is neither in the source tree ({REPO}) nor in {SHARE}: reinstall edge-agent"
        " (pip install -e <source> or pip install <source>)"
    )


@dataclass(frozen=True, slots=True)
class Step:
    """One install step: a description and what doing it means."""

    describe: str
    run: Callable[[], None]


def _command(argv: list[str]) -> Step:
    def run() -> None:
        subprocess.run(argv, check=True)

    return Step(" ".join(argv), run)


def _write(path: Path, text: str, mode: int = 0o644) -> Step:
    def run() -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(mode)

    return Step(f"write {path} ({len(text)} bytes, mode {mode:o})", run)


def _chown(path: Path, user: str, group: str) -> Step:
    def run() -> None:
        shutil.chown(path, user, group)

    return Step(f"chown {user}:{group} {path}", run)


def _executable() -> str:
    found = shutil.which("edge-agent")
    if found:
        return str(Path(found).resolve())
    return str(Path(sys.argv[0]).resolve())


def unit_text(executable: str) -> str:
    """The shipped unit with ExecStart pointing at `executable`."""
    template = shipped(f"systemd/{UNIT_NAME}").read_text()
    return template.replace("@EDGE_AGENT@", executable)


def install_steps(
    *,
    unit_dir: Path = Path("/etc/systemd/system"),
    config_dir: Path = Path("/etc/edge-agent"),
    example: Path | None = None,
    executable: str | None = None,
    have_user: bool | None = None,
) -> list[Step]:
    """Every step of an install, in order, without running any (ServiceError when the unit or
    the example config cannot be found)."""
    example = example or shipped("config/agent.example.yaml")
    unit = unit_text(executable or _executable())
    steps: list[Step] = []
    if have_user is None:
        have_user = subprocess.run(["id", "-u", USER], capture_output=True).returncode == 0
    if not have_user:
        steps.append(
            _command(
                [
                    "useradd",
                    "--system",
                    "--no-create-home",
                    "--home-dir",
                    "/var/lib/edge-agent",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--groups",
                    "dialout",
                    USER,
                ]
            )
        )
    steps.append(_write(unit_dir / UNIT_NAME, unit))
    config = config_dir / "agent.yaml"
    if config.exists():
        steps.append(Step(f"keep {config} (exists; never overwritten)", lambda: None))
    else:
        steps.append(_write(config, example.read_text(), 0o640))
        # Root owns it; the agent (group edge-agent) may read it, nobody else: it may hold
        # secrets.
        steps.append(_chown(config, "root", USER))
    steps.append(_command(["systemctl", "daemon-reload"]))
    steps.append(_command(["systemctl", "enable", "--now", UNIT_NAME]))
    return steps


def uninstall_steps(*, unit_dir: Path = Path("/etc/systemd/system")) -> list[Step]:
    """Stop, disable and remove the unit; the config and the log stay."""
    unit = unit_dir / UNIT_NAME
    return [
        _command(["systemctl", "disable", "--now", UNIT_NAME]),
        Step(f"remove {unit}", lambda: unit.unlink(missing_ok=True)),
        _command(["systemctl", "daemon-reload"]),
        Step("keep /etc/edge-agent and /var/lib/edge-agent (config and event log)", lambda: None),
    ]
