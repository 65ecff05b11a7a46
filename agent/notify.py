"""The sd_notify protocol, by hand: one datagram per message to `$NOTIFY_SOCKET`.

systemd (`Type=notify`) reads `READY=1` as "started", `STATUS=` as the line `systemctl status`
shows, `WATCHDOG=1` as "still making progress" (with `WatchdogSec=`), `RELOADING=1` and
`STOPPING=1` as state changes. Without `$NOTIFY_SOCKET` (a terminal, a test) every call does
nothing. A message that cannot be delivered is logged and dropped: the agent never stops
because its supervisor is not listening.

Concurrency: called from the event loop only; each call is one non-blocking `sendto`.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)

#: The longest STATUS= line sent; systemd shows one line, and a datagram must stay small.
STATUS_MAX = 400


def _address(value: str) -> str | bytes | None:
    if value.startswith("@"):
        # The abstract namespace: a leading NUL instead of a path on disk.
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    # vsock:CID:PORT (VMs) is not something an edge agent on a Pi meets.
    return None


class Notifier:
    """Sends sd_notify messages to one socket; a no-op when there is none."""

    def __init__(self, socket_path: str | None, watchdog_usec: int | None = None) -> None:
        self.address = _address(socket_path) if socket_path else None
        if socket_path and self.address is None:
            log.warning("NOTIFY_SOCKET=%s is not a unix socket address; not notifying", socket_path)
        self.watchdog_usec = watchdog_usec if self.address is not None else None
        self.sent = 0
        self._failed_once = False

    @classmethod
    def from_env(cls, *, unset: bool = False) -> Notifier:
        """The notifier systemd set up for this process (`$NOTIFY_SOCKET`, `$WATCHDOG_USEC`).

        With `unset`, the variables are removed so child processes (command actions) do not
        inherit them and speak for the agent (sd_notify's `unset_environment`).
        """
        path = os.environ.get("NOTIFY_SOCKET")
        usec = _watchdog_usec(os.environ.get("WATCHDOG_USEC"), os.environ.get("WATCHDOG_PID"))
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return cls(path, usec)

    @property
    def enabled(self) -> bool:
        """Whether there is a socket to notify."""
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """How often to send WATCHDOG=1 (half of `WatchdogSec=`, as sd_watchdog_enabled(3)
        advises), or None when systemd does not watch this process."""
        return None if self.watchdog_usec is None else self.watchdog_usec / 2e6

    def notify(self, *fields: str) -> bool:
        """Send `fields` (`KEY=value`) in one datagram; False when it could not be sent."""
        if self.address is None:
            return False
        message = "\n".join(fields).encode()
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            # Logged once: a supervisor that went away would otherwise fill the journal.
            if not self._failed_once:
                self._failed_once = True
                log.warning("cannot notify systemd (%s): %s", self.address, exc)
            return False
        self.sent += 1
        return True

    def ready(self, status: str) -> bool:
        """The pipeline runs: systemd may start what comes after the agent."""
        return self.notify("READY=1", _status(status))

    def status(self, status: str) -> bool:
        """A one-line summary for `systemctl status edge-agent`."""
        return self.notify(_status(status))

    def watchdog(self) -> bool:
        """The pipeline made progress since the last one."""
        return self.notify("WATCHDOG=1")

    def reloading(self) -> bool:
        """A reload started (SIGHUP); `ready` ends it."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify("RELOADING=1", f"MONOTONIC_USEC={usec}", _status("reloading"))

    def stopping(self, status: str = "stopping: draining into the log") -> bool:
        """Shutdown began."""
        return self.notify("STOPPING=1", _status(status))


def _status(text: str) -> str:
    line = " ".join(text.split())
    if len(line) > STATUS_MAX:
        line = line[: STATUS_MAX - 1] + "…"
    return f"STATUS={line}"


def _watchdog_usec(usec: str | None, pid: str | None) -> int | None:
    """`$WATCHDOG_USEC` when it is meant for this process (`$WATCHDOG_PID` unset or ours)."""
    if not usec:
        return None
    try:
        value = int(usec)
        if pid and int(pid) != os.getpid():
            return None
    except ValueError:
        return None
    return value if value > 0 else None
