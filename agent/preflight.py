"""Checks at start that the config cannot express: what the files it names look like on disk."""

from __future__ import annotations

import stat
from pathlib import Path

from agent.config import AgentConfig


def key_files(cfg: AgentConfig) -> list[tuple[str, Path]]:
    """Every private key file the config names, with where: `upstreams[0].key_file`."""
    found: list[tuple[str, Path]] = []
    sections: list[tuple[str, list[object]]] = [
        ("inputs", list(cfg.inputs)),
        ("upstreams", list(cfg.upstreams)),
        ("processing.actions", list(cfg.processing.actions)),
    ]
    for section, items in sections:
        for i, item in enumerate(items):
            path = getattr(item, "key_file", None)
            if isinstance(path, Path):
                found.append((f"{section}[{i}].key_file", path))
    return found


def key_file_problems(cfg: AgentConfig) -> list[str]:
    """Key files anyone on the device may read: the agent refuses to start with them, as ssh
    does. A missing or unreadable file is left to the part that uses it to report."""
    problems = []
    for where, path in key_files(cfg):
        try:
            mode = path.stat().st_mode
        except OSError:
            continue
        if mode & (stat.S_IROTH | stat.S_IWOTH):
            problems.append(
                f"{path}: {where}: the private key is readable by every user of this device "
                f"(mode {stat.S_IMODE(mode):04o}); refusing to start (hint: chmod 600 {path}, "
                f"or chmod 640 and chgrp edge-agent; or pass it with LoadCredential=)"
            )
    return problems
