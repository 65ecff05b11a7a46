"""Shared fixtures: real SQLite files, free ports, and condition polling (never fixed sleeps)."""

from __future__ import annotations

import asyncio
import datetime
import os
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def eventually(
    condition: Callable[[], bool | Awaitable[bool]],
    within: float = 10.0,
    interval: float = 0.02,
    what: str = "condition",
) -> None:
    """Poll `condition` until it holds; fail the test after `within` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = condition()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def wait_until(
    condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition"
) -> None:
    """Synchronous `eventually`, for tests that drive subprocesses."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    """A fresh log file path in the test's own directory."""
    return tmp_path / "events.db"


def _mosquitto_binary() -> str:
    import shutil

    found = shutil.which("mosquitto") or (
        "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
    )
    if found is None:
        pytest.fail(
            "mosquitto is not installed: `make test` installs it (apt-get install mosquitto)"
        )
    return found


class Broker:
    """A real mosquitto on a free loopback port.

    `stop` and `start` keep the port, and with `persistence` the sessions and the messages
    queued for them too (mosquitto saves them when stopped cleanly). `freeze` (SIGSTOP) leaves
    every connection open with nobody answering: a hung broker, or a network cut silently.
    `extra` is more configuration, such as further listeners.
    """

    def __init__(self, workdir: Path, *, persistence: bool = False, extra: str = "") -> None:
        self.workdir = workdir
        self.port = free_port()
        self.url = f"mqtt://127.0.0.1:{self.port}"
        self.conf = workdir / "mosquitto.conf"
        self.stderr = workdir / "mosquitto.stderr"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            + (
                f"persistence true\npersistence_location {workdir}/\n"
                if persistence
                else "persistence false\n"
            )
            + "max_queued_messages 100000\n"
            # As root (CI) mosquitto would drop to a user who cannot read the test's files.
            + ("user root\n" if os.geteuid() == 0 else "")
            + f"log_type {'all' if os.environ.get('MQTT_DEBUG') else 'error'}\n"
            + extra
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        """Start (again, on the same port); returns once it accepts connections."""
        with self.stderr.open("ab") as err:
            proc = subprocess.Popen(
                [_mosquitto_binary(), "-c", str(self.conf)],
                stdout=subprocess.DEVNULL,
                stderr=None if os.environ.get("MQTT_DEBUG") else err,
            )
        self.proc = proc

        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.stderr.read_text()[-2000:]}")
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0

        wait_until(listening, 10, "mosquitto to listen")

    def stop(self) -> None:
        """A clean stop (SIGTERM): clients are disconnected, a persistent broker saves."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGCONT)  # a frozen broker handles SIGTERM only once thawed
            proc.terminate()
            proc.wait(10)

    def freeze(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def thaw(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)


@pytest.fixture(scope="session")
def broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One mosquitto for the test session."""
    b = Broker(tmp_path_factory.mktemp("mosquitto"))
    yield b
    b.stop()


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Brokers of the test's own (to stop, restart or freeze), stopped when the test ends."""
    started: list[Broker] = []

    def make(*, persistence: bool = False, extra: str = "") -> Broker:
        workdir = tmp_path / f"mosquitto-{len(started)}"
        workdir.mkdir()
        started.append(Broker(workdir, persistence=persistence, extra=extra))
        return started[-1]

    yield make
    for b in started:
        b.stop()


@dataclass(frozen=True)
class Pki:
    """A certificate authority of the test's own (trustme), another one to be wrong with, and
    a client certificate (`cert_file`, `key_file`) the first one issued."""

    ca: Any  # trustme.CA
    ca_file: Path
    other_ca_file: Path
    cert_file: Path
    key_file: Path

    def server_context(
        self, *hosts: str, expired: bool = False, client_cert: bool = False
    ) -> ssl.SSLContext:
        """A TLS server context with a certificate for `hosts` (expired yesterday, if asked),
        wanting a client certificate from this CA if asked."""
        when: dict[str, datetime.datetime] = {}
        if expired:
            past = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
            when = {"not_before": past - datetime.timedelta(days=30), "not_after": past}
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*hosts, **when).configure_cert(ctx)
        if client_cert:
            self.ca.configure_trust(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx


def make_pki(d: Path) -> Pki:
    """A `Pki` with its PEM files in `d`."""
    import trustme

    ca, other = trustme.CA(), trustme.CA()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    other.cert_pem.write_to_path(str(d / "other-ca.pem"))
    client = ca.issue_cert("edge-agent.example")
    client.cert_chain_pems[0].write_to_path(str(d / "client.pem"))
    client.private_key_pem.write_to_path(str(d / "client.key"))
    return Pki(ca, d / "ca.pem", d / "other-ca.pem", d / "client.pem", d / "client.key")


@dataclass(frozen=True)
class TlsBroker:
    """A mosquitto with TLS listeners that want a client certificate, and the test's PKI.

    `url` presents a certificate for 127.0.0.1 and localhost; `wrong_name_url` one for
    other.example only. `plain` is the same broker without TLS, for test publishers.
    """

    plain: Broker
    url: str
    wrong_name_url: str
    ca_file: Path
    cert_file: Path
    key_file: Path
    other_ca_file: Path


@pytest.fixture(scope="session")
def tls_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TlsBroker]:
    """One TLS mosquitto for the session, certificates made here by trustme."""
    pki = tmp_path_factory.mktemp("pki")
    certs = make_pki(pki)
    for name, cert in (
        ("server", certs.ca.issue_cert("127.0.0.1", "localhost")),
        ("wrong-name", certs.ca.issue_cert("other.example")),
    ):
        cert.cert_chain_pems[0].write_to_path(str(pki / f"{name}.pem"))
        cert.private_key_pem.write_to_path(str(pki / f"{name}.key"))
    ports = {"server": free_port(), "wrong-name": free_port()}
    extra = "".join(
        f"listener {port} 127.0.0.1\n"
        f"cafile {pki / 'ca.pem'}\n"
        f"certfile {pki / name}.pem\n"
        f"keyfile {pki / name}.key\n"
        "require_certificate true\n"
        for name, port in ports.items()
    )
    plain = Broker(tmp_path_factory.mktemp("mosquitto-tls"), extra=extra)
    yield TlsBroker(
        plain=plain,
        url=f"mqtts://127.0.0.1:{ports['server']}",
        wrong_name_url=f"mqtts://127.0.0.1:{ports['wrong-name']}",
        ca_file=certs.ca_file,
        cert_file=certs.cert_file,
        key_file=certs.key_file,
        other_ca_file=certs.other_ca_file,
    )
    plain.stop()
