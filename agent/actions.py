"""Local actions: the edge reacting to its own alerts, offline or not.

Each action is a consumer of the `alerts` stream with its own cursor (`action:<name>`): it takes
the next alert its filters let through (rules, severities, kinds), performs it, and moves its
cursor past it only once the action is done (the broker's PUBACK, a 2xx answer, exit status
0). A crash in between performs that alert once more on the next start, never skips it.
A failure is retried with jittered backoff and counted; after `max_attempts` (0: never) the
action gives up on that alert and records `action.failed` in the `agent` stream. Each action
runs in its own task, so a slow or failing one never holds up the pipeline or another action.

Kinds of action: `mqtt` (publish to a local broker, QoS 1, e.g. to switch a relay), `webhook`
(POST the alert as JSON) and `command` (run a program: argv without a shell, a timeout, the
alert as JSON on stdin and in `EDGE_*` environment variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import json
import logging
import os
import re
import signal
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from agent import mqttloop
from agent.backoff import Backoff
from agent.config import (
    ActionConfig,
    CommandActionConfig,
    MqttActionConfig,
    WebhookActionConfig,
)
from agent.events import Event, NewEvent, Stream
from agent.log import CursorUpdate, EventLog

if TYPE_CHECKING:
    # Only the action that uses them imports them at run time: paho and aiohttp cost MiB of
    # RSS on a Pi, and most agents configure no MQTT action and no webhook (issue 7).
    import aiohttp
    import paho.mqtt.client as mqtt

log = logging.getLogger(__name__)

#: How much of a failing command's stderr is kept for the error message.
STDERR_TAIL = 2048
_FIELD = re.compile(r"\{([a-z_]+)\}")


class ActionError(Exception):
    """An action could not be performed (it will be retried)."""


@dataclass(slots=True)
class ActionStatus:
    """What `status` shows for an action."""

    done: int = 0
    failures: int = 0
    gave_up: int = 0
    last_success: float | None = None
    last_error: str | None = None
    last_error_time: float | None = None


def alert_fields(event: Event, log_id: str) -> dict[str, str]:
    """An alert's fields by name, as strings: for templates and environment variables."""
    data = event.data or {}
    return {
        "alert_id": str(data.get("alert_id", "")),
        "kind": event.kind.removeprefix("alert."),
        "rule": str(data.get("rule", "")),
        "severity": str(data.get("severity", "")),
        "sensor": event.sensor or "",
        "value": "" if event.value is None else repr(event.value),
        "unit": event.unit or "",
        "time": repr(event.time),
        "event_id": event.event_id(log_id),
    }


def render(template: str, fields: Mapping[str, str]) -> str:
    """`{name}` replaced by the alert's field of that name; other text as it is."""
    return _FIELD.sub(lambda m: fields.get(m.group(1), m.group(0)), template)


class Action:
    """One configured action. `run` is never called concurrently with itself; `perform` is
    only called by `run`, one alert at a time."""

    def __init__(self, cfg: ActionConfig) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.consumer = f"action:{cfg.name}"
        self.status = ActionStatus()
        self._backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)

    def wants(self, event: Event) -> bool:
        """Whether this action's filters let `event` through."""
        data = event.data or {}
        if event.kind.removeprefix("alert.") not in self.cfg.kinds:
            return False
        if data.get("severity") not in self.cfg.severities:
            return False
        rule = str(data.get("rule", ""))
        return any(fnmatch.fnmatchcase(rule, g) for g in self.cfg.rules)

    async def perform(self, event: Event, log_id: str) -> None:
        """Do the action for one alert; raise ActionError when it did not happen."""
        raise NotImplementedError

    async def close(self) -> None:
        """Release connections (called once `run` ends)."""

    async def run(self, event_log: EventLog, stop: asyncio.Event) -> None:
        """Act on alerts until `stop` is set."""
        await event_log.register(self.consumer, (Stream.ALERTS,))
        cursor = event_log.cursor(self.consumer, Stream.ALERTS)
        try:
            while not stop.is_set():
                batch = await event_log.read(Stream.ALERTS, cursor, 100)
                if not batch:
                    await _first(event_log.wait_for(Stream.ALERTS, cursor, within=1.0), stop)
                    continue
                passed = cursor
                for event in batch:
                    if not self.wants(event):
                        passed = event.seq
                        continue
                    outcome = await self._attempts(event, event_log, stop)
                    if outcome is None:  # stopping: this alert is performed next time
                        break
                    passed = event.seq
                    await event_log.append(
                        events={Stream.AGENT: outcome} if outcome else None,
                        cursors=[CursorUpdate(self.consumer, Stream.ALERTS, passed)],
                    )
                    cursor = passed
                if passed != cursor:
                    await event_log.append(
                        cursors=[CursorUpdate(self.consumer, Stream.ALERTS, passed)]
                    )
                    cursor = passed
        finally:
            await self.close()

    async def _attempts(
        self, event: Event, event_log: EventLog, stop: asyncio.Event
    ) -> list[NewEvent] | None:
        """Perform until done (returns []), given up (returns the `action.failed` event) or
        stopped (returns None)."""
        attempts = 0
        while True:
            attempts += 1
            try:
                done = await _first(self.perform(event, event_log.log_id), stop)
            except ActionError as exc:
                self.status.failures += 1
                self.status.last_error, self.status.last_error_time = str(exc), time.time()
                alert_id = (event.data or {}).get("alert_id")
                if self.cfg.max_attempts and attempts >= self.cfg.max_attempts:
                    self.status.gave_up += 1
                    log.error(
                        "action %s: gave up on %s after %d attempts: %s",
                        self.name,
                        alert_id,
                        attempts,
                        exc,
                    )
                    now = time.time()
                    data = {
                        "action": self.name,
                        "alert_id": alert_id,
                        "event_id": event.event_id(event_log.log_id),
                        "attempts": attempts,
                        "error": str(exc),
                    }
                    return [NewEvent("action.failed", now, now, time.monotonic(), data=data)]
                delay = self._backoff.next()
                if attempts <= 3 or attempts % 20 == 0:
                    log.warning(
                        "action %s: %s for %s; retrying in %.2gs", self.name, exc, alert_id, delay
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return None
                continue
            if not done:
                return None
            self._backoff.reset()
            self.status.done += 1
            self.status.last_success = time.time()
            return []


async def _first(work: Any, stop: asyncio.Event) -> bool:
    """Run `work` unless `stop` comes first (then cancel it): True if it finished."""
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({task, stopper}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, ActionError):
            await task
        return False
    task.result()
    return True


# --------------------------------------------------------------------------- command


class CommandAction(Action):
    """Run a program per alert: argv (no shell), the alert as JSON on stdin and in `EDGE_*`
    environment variables; done when it exits 0 within `timeout` (else it is killed, with
    the processes it started)."""

    cfg: CommandActionConfig

    def __init__(self, cfg: CommandActionConfig) -> None:
        super().__init__(cfg)

    async def perform(self, event: Event, log_id: str) -> None:
        fields = alert_fields(event, log_id)
        argv = [render(a, fields) for a in self.cfg.argv]
        env = {**os.environ, **self.cfg.env}
        env.update({f"EDGE_{k.upper()}": v for k, v in fields.items() if k != "kind"})
        env["EDGE_ALERT_KIND"] = fields["kind"]
        body = json.dumps(event.to_wire(log_id)).encode()
        env["EDGE_ALERT_JSON"] = body.decode()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                start_new_session=True,  # its own process group, killed whole on timeout
            )
        except OSError as exc:
            raise ActionError(f"cannot run {argv[0]}: {exc.strerror or exc}") from exc
        tail = bytearray()

        async def feed() -> None:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                proc.stdin.write(body)
                await proc.stdin.drain()
                proc.stdin.close()

        async def drain() -> None:
            assert proc.stderr is not None
            while chunk := await proc.stderr.read(4096):
                tail.extend(chunk)
                del tail[:-STDERR_TAIL]

        try:
            async with asyncio.timeout(self.cfg.timeout):
                await asyncio.gather(feed(), drain(), proc.wait())
        except TimeoutError:
            raise ActionError(f"{argv[0]} did not finish within {self.cfg.timeout:g}s") from None
        finally:
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                await proc.wait()
        if proc.returncode != 0:
            why = tail.decode("utf-8", "replace").strip().splitlines()
            raise ActionError(
                f"{argv[0]} exited with status {proc.returncode}"
                + (f": {why[-1][:200]}" if why else "")
            )


# --------------------------------------------------------------------------- webhook


class WebhookAction(Action):
    """POST each alert as JSON to a local endpoint; done on a 2xx answer."""

    cfg: WebhookActionConfig

    def __init__(self, cfg: WebhookActionConfig) -> None:
        super().__init__(cfg)
        self._session: aiohttp.ClientSession | None = None

    async def perform(self, event: Event, log_id: str) -> None:
        import aiohttp  # deferred: only agents with a webhook pay for it (see the top)

        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.cfg.timeout),
                headers={"User-Agent": "edge-agent", **self.cfg.headers},
            )
        body = {"log_id": log_id, "alert": event.to_wire(log_id)}
        try:
            async with self._session.post(self.cfg.url, json=body) as resp:
                if not 200 <= resp.status < 300:
                    text = (await resp.text(errors="replace"))[:200]
                    raise ActionError(f"HTTP {resp.status}: {text}")
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ActionError(f"{type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


# --------------------------------------------------------------------------- mqtt


class MqttAction(Action):
    """Publish each alert to a local broker, QoS 1; done once the broker's PUBACK came.

    The paho client runs on the event loop, without a paho network thread (`agent/mqttloop.py`).
    A connection is made when the first alert comes and kept; a lost one is made again at the
    next attempt.
    """

    cfg: MqttActionConfig

    def __init__(self, cfg: MqttActionConfig) -> None:
        super().__init__(cfg)
        self._client: mqtt.Client | None = None
        self._misc: asyncio.Task[None] | None = None
        self._connected: asyncio.Future[None] | None = None
        self._acks: dict[int, asyncio.Future[None]] = {}

    async def perform(self, event: Event, log_id: str) -> None:
        import paho.mqtt.client as mqtt  # deferred: only agents with an MQTT action pay for it

        client = await self._connect()
        fields = alert_fields(event, log_id)
        template = self.cfg.payload_raised if fields["kind"] == "raised" else None
        if fields["kind"] == "cleared":
            template = self.cfg.payload_cleared
        if template is not None:
            payload = render(template, fields).encode()
        else:
            payload = json.dumps(event.to_wire(log_id), separators=(",", ":")).encode()
        topic = render(self.cfg.topic, fields)
        info = client.publish(topic, payload, qos=1, retain=self.cfg.retain)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            await self.close()
            raise ActionError(f"publish to {topic!r} failed: {mqtt.error_string(info.rc)}")
        # PUBACK is read by the loop, after this returns: the future is there before it comes.
        ack = self._acks[info.mid] = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await ack
        except TimeoutError:
            await self.close()
            raise ActionError(f"no PUBACK for {topic!r} within {self.cfg.timeout:g}s") from None
        finally:
            self._acks.pop(info.mid, None)

    async def _connect(self) -> mqtt.Client:
        import paho.mqtt.client as mqtt  # deferred, as in `perform`
        from paho.mqtt.enums import CallbackAPIVersion

        if self._client is not None and self._client.is_connected():
            return self._client
        await self.close()
        loop = asyncio.get_running_loop()
        url = urlsplit(self.cfg.url)
        tls = url.scheme == "mqtts"
        host, port = url.hostname or "127.0.0.1", url.port or (8883 if tls else 1883)
        client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.cfg.client_id or f"edge-agent-action-{self.name}",
            clean_session=True,
            protocol=mqtt.MQTTv311,
        )
        client.connect_timeout = self.cfg.timeout
        if self.cfg.username is not None:
            client.username_pw_set(self.cfg.username, self.cfg.password)
        if tls:
            try:
                context = ssl.create_default_context(
                    cafile=str(self.cfg.ca_file) if self.cfg.ca_file else None
                )
                if self.cfg.cert_file is not None:
                    key = str(self.cfg.key_file) if self.cfg.key_file else None
                    context.load_cert_chain(str(self.cfg.cert_file), key)
            except (OSError, ssl.SSLError) as exc:
                raise ActionError(f"TLS files: {exc}") from exc
            client.tls_set_context(context)
        self._connected = loop.create_future()
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        mqttloop.SocketHooks().install(client)
        keepalive = int(self.cfg.keepalive)
        try:
            await loop.run_in_executor(None, client.connect, host, port, keepalive)
        except (OSError, ValueError) as exc:
            raise ActionError(f"cannot connect to {host}:{port}: {exc}") from exc
        sock = client.socket()
        if sock is None:
            raise ActionError(f"{host}:{port} closed the connection")
        self._client = client
        mqttloop.watch(client, sock, client.loop_read)
        self._misc = asyncio.create_task(
            mqttloop.keep_alive(client, 1.0), name=f"action-{self.name}"
        )
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await self._connected
        except TimeoutError:
            await self.close()
            raise ActionError(f"{host}:{port} did not answer CONNECT") from None
        except ActionError:
            await self.close()
            raise
        return client

    def _on_connect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        if self._connected is not None and not self._connected.done():
            if reason.is_failure:
                self._connected.set_exception(ActionError(f"connection refused: {reason}"))
            else:
                self._connected.set_result(None)

    def _on_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, properties: Any
    ) -> None:
        error = ActionError(f"disconnected: {reason}")
        if self._connected is not None and not self._connected.done():
            self._connected.set_exception(error)
        for ack in self._acks.values():
            if not ack.done():
                ack.set_exception(error)

    def _on_publish(
        self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, properties: Any
    ) -> None:
        ack = self._acks.get(mid)
        if ack is not None and not ack.done():
            ack.set_result(None)

    async def close(self) -> None:
        if self._misc is not None:
            self._misc.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._misc
            self._misc = None
        client, self._client = self._client, None
        if client is None:
            return
        with contextlib.suppress(OSError):
            client.disconnect()
            client.loop_write()  # sends DISCONNECT, and paho closes the socket
        mqttloop.close_socket(client)


def build_action(cfg: ActionConfig) -> Action:
    """The runtime object for a validated action config."""
    if isinstance(cfg, CommandActionConfig):
        return CommandAction(cfg)
    if isinstance(cfg, WebhookActionConfig):
        return WebhookAction(cfg)
    return MqttAction(cfg)
