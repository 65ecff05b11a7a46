"""The live status file a running agent keeps in its data dir, and how readers judge it."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

STATUS_FILE = "status.json"

#: A status file older than this is from an agent that is no longer running.
STALE_AFTER = 60.0


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_live(data_dir: Path) -> dict[str, Any]:
    """What the agent last wrote to `<data_dir>/status.json`, or {} when there is nothing."""
    try:
        live = json.loads((data_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return live if isinstance(live, dict) else {}


def is_running(live: dict[str, Any]) -> bool:
    """Whether the agent that wrote `live` is still running: its pid exists, its file is fresh."""
    updated = live.get("updated", 0)
    fresh = isinstance(updated, int | float) and time.time() - updated < STALE_AFTER
    return fresh and pid_alive(live.get("pid"))
