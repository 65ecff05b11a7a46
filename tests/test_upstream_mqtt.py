"""The MQTT upstream against a real mosquitto: plain and with TLS + client certificates,
PUBACK-driven cursors, the bounded in-flight window, the three payload formats."""

from __future__ import annotations

import asyncio
import json
import random
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from agent.config import LogConfig, MqttUpstreamConfig
from agent.events import Event, NewEvent, Stream
from agent.log import EventLog
from agent.upstream import AckWindow, WireEncoder, write_replay_request
from agent.upstream_mqtt import MqttUpstream, _Link, thingsboard_entry
from simulator.cloud import CloudServer, CloudStore, MqttSubscription
from tests.conftest import Broker, TlsBroker, eventually
from tests.test_upstream_http import Running, alert, caught_up, fill


def mqtt_upstream(url: str, **kw: Any) -> MqttUpstream:
    cfg = MqttUpstreamConfig.model_validate(
        {
            "type": "mqtt",
            "name": "m",
            "url": url,
            "linger": 0,
            "backoff_initial": 0.05,
            "backoff_max": 0.2,
            "connect_timeout": 2,
            **kw,
        }
    )
    return MqttUpstream(cfg, "pi-1")


def log_cfg() -> LogConfig:
    return LogConfig(commit_interval=0.01)


class Collector:
    """A subscriber of the test's own (paho in its own thread): every message, in order."""

    def __init__(self, broker: Broker, topic: str) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        client_id = f"collector-{random.randrange(1 << 30)}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id)
        self.client.on_message = lambda c, u, m: self._add(m.topic, bytes(m.payload))
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topic, qos=1)
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()
        assert subscribed.wait(5), "the collector did not subscribe"

    def _add(self, topic: str, payload: bytes) -> None:
        with self._lock:
            self.messages.append((topic, payload))

    def take(self) -> list[tuple[str, bytes]]:
        with self._lock:
            return list(self.messages)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def collect(broker: Broker) -> Iterator[Callable[[str], Collector]]:
    made: list[Collector] = []

    def make(topic: str) -> Collector:
        made.append(Collector(broker, topic))
        return made[-1]

    yield make
    for c in made:
        c.close()


def wire_ids(messages: list[tuple[str, bytes]]) -> list[str]:
    out = []
    for _, payload in messages:
        doc = json.loads(payload)
        out.extend(e["id"] for e in doc["events"]) if "events" in doc else out.append(doc["id"])
    return out


# --------------------------------------------------------------------------- the window


def test_the_window_moves_cursors_only_over_a_contiguous_acknowledged_prefix() -> None:
    w = AckWindow(3)
    a = w.add(Stream.READINGS, 10, events=10)
    b = w.add(Stream.ALERTS, 2, events=2)
    c = w.add(Stream.READINGS, 20, events=10)
    assert w.full and len(w) == 3
    assert w.acked(c) and w.acked(b)
    assert w.settle() == ({}, 0, [])  # the oldest is still out: nothing may move
    assert w.full, "the window counts from the oldest unacknowledged message"
    assert w.acked(a)
    assert not w.acked(a), "an acknowledgement counts once"
    assert w.settle() == ({Stream.READINGS: 20, Stream.ALERTS: 2}, 22, [])
    assert not w and not w.full


def test_the_window_never_holds_more_than_its_size_whatever_the_ack_order() -> None:
    """200,000 messages (packet ids wrap three times) acknowledged in random order within
    the window: no cursor ever passes an unacknowledged message."""
    rng = random.Random(1)
    w = AckWindow(100)
    outstanding: dict[int, int] = {}
    cursor, seq = 0, 0
    while seq < 200_000 or outstanding:
        while seq < 200_000 and not w.full:
            seq += 1
            outstanding[w.add(Stream.READINGS, seq, events=1)] = seq
        assert len(w) <= 100 and len(outstanding) <= 100
        for ticket in rng.sample(sorted(outstanding), k=min(len(outstanding), rng.randint(1, 30))):
            w.acked(ticket)
            del outstanding[ticket]
        moves, _, _ = w.settle()
        if Stream.READINGS in moves:
            assert moves[Stream.READINGS] > cursor
            cursor = moves[Stream.READINGS]
        assert all(cursor < s for s in outstanding.values())
    assert cursor == 200_000


# --------------------------------------------------------------------------- formats


async def test_batches_arrive_acknowledged_with_alerts_first(
    tmp_path: Path, broker: Broker
) -> None:
    prefix = f"up-{tmp_path.name}"
    sub = MqttSubscription(broker.url, (f"{prefix}/#",))
    async with (
        CloudServer(tmp_path / "cloud.db", mqtt=sub),
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 2000, sensor="board.t1")
        await alert(log, "board.t1", "critical")
        up = mqtt_upstream(broker.url, topic=prefix + "/{agent}/{stream}", batch_size=300)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="every batch acknowledged")
            assert up.status.connected
        log_id = log.log_id
        with CloudStore(tmp_path / "cloud.db") as store:
            await eventually(lambda: store.count() == 2001, what="the cloud to store them")
            events = store.events()
    assert {e["id"] for e in events} == {f"{log_id}:readings:{i}" for i in range(1, 2001)} | {
        f"{log_id}:alerts:1"
    }
    assert events[0]["stream"] == "alerts"
    assert up.status.sent == 2001 and up.status.failures == 0


async def test_one_message_per_event_on_a_topic_template(
    tmp_path: Path, broker: Broker, collect: Callable[[str], Collector]
) -> None:
    prefix = f"ev-{tmp_path.name}"
    sink = collect(f"{prefix}/#")
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 5, sensor="board.t1")
        await fill(log, 5, sensor="lan.h+1")
        await log.append(events={Stream.AGENT: [NewEvent("gap", 1.0, 1.0, 0.0, data={"n": 1})]})
        up = mqtt_upstream(
            broker.url,
            format="event",
            topic=prefix + "/{stream}/{device}/{key}",
            sensors=["board.*"],
            max_inflight=3,
        )
        async with Running(log, up):
            await eventually(caught_up(log, up), what="every event acknowledged")
            await eventually(lambda: len(sink.take()) == 6, what="6 messages")
        log_id = log.log_id
    topics = [t for t, _ in sink.take()]
    assert topics[0] == f"{prefix}/agent/pi-1/gap"  # no sensor: the agent's device, its kind
    assert topics[1:] == [f"{prefix}/readings/board/t1"] * 5
    assert wire_ids(sink.take())[1:] == [f"{log_id}:readings:{i}" for i in range(1, 6)]
    first = json.loads(sink.take()[1][1])
    assert first["sensor"] == "board.t1" and first["value"] == 0.0 and first["kind"] == "reading"
    # lan.h+1 was left out by the route, and its cursor moved past it all the same.
    assert log.cursor(up.consumer, Stream.READINGS) == 10
    assert up.status.filtered == 5 and up.status.max_inflight <= 3


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["a", "b.c", "100%", 'q"\\', "é", "%d%s"]),
            st.none() | st.sampled_from(["C", "%", "µS"]),
            st.floats(allow_nan=False, width=32),
            st.sampled_from([1.5, 0.0, -0.0, 1764170000.123456, float("inf")]),
            st.sampled_from([1.5, 0.0, -0.0, 1764170000.25]),
            st.booleans(),
        ),
        max_size=30,
    )
)
def test_the_wire_encoder_writes_a_batch_as_json_dumps_writes_each_event(
    rows: list[tuple[str, str | None, float, float, float, bool]],
) -> None:
    """The batch path (templates per sensor, times formatted once per run of equal ones)
    against `json.dumps` event by event; a log id with a '%' too."""
    log_id = "3e1a%d8afd96a"
    events = []
    for seq, (sensor, unit, value, time_, recv, plain) in enumerate(rows, 1):
        if plain:
            events.append(Event("readings", seq, "reading", time_, recv, 0.0, sensor, value, unit))
        else:  # what takes the slow path: data, no value
            events.append(Event("agent", seq, "gap", time_, recv, 0.0, data={"input": sensor}))
    expected = [json.dumps(e.to_wire(log_id), separators=(",", ":")) for e in events]
    assert WireEncoder(log_id).events(events) == expected


def test_thingsboard_entries() -> None:
    def ev(kind: str, sensor: str | None, value: float | None, data: Any = None) -> Event:
        return Event("readings", 1, kind, 1764170000.123, 0.0, 0.0, sensor, value, None, data)

    assert thingsboard_entry(ev("reading", "board.temp1", 21.5), "pi") == [
        "board",
        {"ts": 1764170000123, "values": {"temp1": 21.5}},
    ]
    assert thingsboard_entry(ev("reading", "temp1", 3.0), "pi")[0] == "pi"
    agg = ev("aggregate", "board.t", 2.0, {"window": "w1m", "values": {"mean": 2.0, "max": 3.0}})
    assert thingsboard_entry(agg, "pi")[1]["values"] == {"t_w1m_mean": 2.0, "t_w1m_max": 3.0}
    raised = ev("alert.raised", "board.t", 40.0, {"rule": "hot", "severity": "critical"})
    assert thingsboard_entry(raised, "pi")[1]["values"] == {
        "alert_hot": "raised",
        "alert_hot_severity": "critical",
        "alert_hot_value": 40.0,
    }
    gap = ev("gap", None, None, {"stream": "readings", "count": 7, "nested": {"x": 1}})
    assert thingsboard_entry(gap, "pi") == [
        "pi",
        {
            "ts": 1764170000123,
            "values": {"event": "gap", "gap_stream": "readings", "gap_count": 7},
        },
    ]


async def test_thingsboard_gateway_telemetry(
    tmp_path: Path, broker: Broker, collect: Callable[[str], Collector]
) -> None:
    sink = collect("v1/gateway/telemetry")
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 3, sensor="board.temp1")
        await fill(log, 2, sensor="humidity")
        await alert(log, "board.temp1", "warning")
        up = mqtt_upstream(broker.url, format="thingsboard", token="tb-gateway-token")
        async with Running(log, up):
            await eventually(caught_up(log, up), what="telemetry acknowledged")
            await eventually(lambda: len(sink.take()) == 2, what="2 messages")
    alerts, readings = (json.loads(p) for _, p in sink.take())
    assert alerts["board"][0]["values"] == {"alert_r": "raised", "alert_r_severity": "warning",
                                            "alert_r_value": 1.0}  # fmt: skip
    assert [e["values"] for e in readings["board"]] == [{"temp1": v} for v in (0.0, 1.0, 2.0)]
    assert [e["values"] for e in readings["pi-1"]] == [{"humidity": v} for v in (0.0, 1.0)]
    assert all(isinstance(e["ts"], int) for e in readings["board"])


# --------------------------------------------------------------------------- acknowledgements


async def test_cursor_waits_for_puback_and_the_window_holds(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    """A frozen broker takes the messages into its socket but acknowledges none: the window
    fills, the cursor stays; thawed, everything is acknowledged and the cursor moves."""
    b = make_broker()
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        up = mqtt_upstream(b.url, format="event", max_inflight=7, timeout=30)
        async with Running(log, up):
            await eventually(lambda: up.status.connected is True, what="connected")
            b.freeze()
            try:
                await fill(log, 50)
                await eventually(lambda: up.status.inflight == 7, what="a full window")
                await asyncio.sleep(0.2)
                assert up.status.inflight == 7
                assert log.cursor(up.consumer, Stream.READINGS) == 0
            finally:
                b.thaw()
            await eventually(caught_up(log, up), what="delivery after the thaw")
    assert up.status.max_inflight == 7 and up.status.failures == 0


async def test_a_hung_broker_is_timed_out_and_everything_resent(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    b = make_broker()
    prefix = f"hung-{tmp_path.name}"
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        up = mqtt_upstream(b.url, timeout=0.3, batch_size=10, topic=prefix + "/{stream}")
        async with Running(log, up):
            await eventually(lambda: up.status.connected is True, what="connected")
            b.freeze()
            try:
                await fill(log, 30)
                await eventually(lambda: up.status.failures >= 1, what="the timeout")
                assert "no PUBACK within 0.3s" in (up.status.last_error or "")
                assert log.cursor(up.consumer, Stream.READINGS) == 0
            finally:
                b.thaw()
            await eventually(caught_up(log, up), what="delivery after the thaw")


async def test_broker_restart_loses_nothing(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    b = make_broker(persistence=True)
    prefix = f"rs-{tmp_path.name}"
    sub = MqttSubscription(b.url, (f"{prefix}/#",))
    async with (
        CloudServer(tmp_path / "cloud.db", mqtt=sub),
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        up = mqtt_upstream(b.url, batch_size=50, topic=prefix + "/{stream}")
        async with Running(log, up):
            await fill(log, 500)
            await eventually(lambda: log.cursor(up.consumer, Stream.READINGS) > 0, what="some")
            await asyncio.to_thread(b.stop)
            await fill(log, 500, start=500)
            await eventually(lambda: up.status.failures >= 1, what="the loss noticed")
            await asyncio.to_thread(b.start)
            await eventually(caught_up(log, up), within=15, what="delivery after the restart")
        log_id = log.log_id
        with CloudStore(tmp_path / "cloud.db") as store:
            await eventually(lambda: store.count() == 1000, within=15, what="all at the cloud")
            assert store.event_ids() == {f"{log_id}:readings:{i}" for i in range(1, 1001)}
    assert up.status.connected is False


async def test_mqtt5_and_packet_ids_wrapping(
    tmp_path: Path, broker: Broker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Packet ids wrap at 65,535: paho's counter is started just below it (sending 65,000
    messages first would take the suite's whole budget), then 3,000 messages go over MQTT 5
    with 500 in flight, across the wrap, none lost."""
    clients: list[mqtt.Client] = []
    new_client = _Link._new_client

    def near_the_wrap(self: _Link) -> mqtt.Client:
        client = new_client(self)
        client._last_mid = 64_000  # paho's packet id counter
        clients.append(client)
        return client

    monkeypatch.setattr(_Link, "_new_client", near_the_wrap)
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 3000)
        up = mqtt_upstream(
            broker.url,
            protocol=5,
            format="event",
            batch_size=1000,
            max_inflight=500,
            topic=f"wrap-{tmp_path.name}",
        )
        async with Running(log, up):
            await eventually(caught_up(log, up), within=20, what="3000 messages")
    assert len(clients) == 1 and clients[0]._last_mid < 64_000, "the ids wrapped"
    assert up.status.sent == 3000 and up.status.failures == 0
    assert up.status.max_inflight == 500


# --------------------------------------------------------------------------- TLS


async def test_tls_with_a_client_certificate(tmp_path: Path, tls_broker: TlsBroker) -> None:
    prefix = f"tls-{tmp_path.name}"
    sub = MqttSubscription(tls_broker.plain.url, (f"{prefix}/#",))
    async with (
        CloudServer(tmp_path / "cloud.db", mqtt=sub),
        EventLog.open(tmp_path / "e.db", log_cfg()) as log,
    ):
        await fill(log, 300)
        up = mqtt_upstream(
            tls_broker.url,
            topic=prefix + "/{stream}",
            ca_file=str(tls_broker.ca_file),
            cert_file=str(tls_broker.cert_file),
            key_file=str(tls_broker.key_file),
            batch_size=100,
        )
        async with Running(log, up):
            await eventually(caught_up(log, up), what="delivery over TLS")
        with CloudStore(tmp_path / "cloud.db") as store:
            await eventually(lambda: store.count() == 300, what="the cloud to store them")


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("wrong ca", "TLS: server certificate refused: "),
        ("wrong name", "the server's certificate does not name the host of the url"),
        ("no client certificate", "does the broker require a client certificate? set cert_file"),
    ],
)
async def test_tls_refuses_with_a_clear_error_and_keeps_everything(
    tmp_path: Path, tls_broker: TlsBroker, case: str, expected: str
) -> None:
    tls: dict[str, Any] = {
        "ca_file": str(tls_broker.ca_file),
        "cert_file": str(tls_broker.cert_file),
        "key_file": str(tls_broker.key_file),
    }
    url = tls_broker.url
    if case == "wrong ca":
        tls["ca_file"] = str(tls_broker.other_ca_file)
    elif case == "wrong name":
        url = tls_broker.wrong_name_url
    else:
        del tls["cert_file"], tls["key_file"]
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 10)
        up = mqtt_upstream(url, **tls)
        async with Running(log, up):
            await eventually(lambda: up.status.failures >= 2, what="refusals")
        assert log.cursor(up.consumer, Stream.READINGS) == 0
    assert expected in (up.status.last_error or ""), up.status.last_error


async def test_a_refused_login_says_so(tmp_path: Path, make_broker: Callable[..., Broker]) -> None:
    import subprocess

    passwords = tmp_path / "passwd"
    passwords.write_text("")
    await asyncio.to_thread(
        subprocess.run,
        ["mosquitto_passwd", "-b", str(passwords), "edge", "right"],
        check=True,
        timeout=10,
    )
    passwords.chmod(0o644)
    b = make_broker(extra=f"password_file {passwords}\n")
    b.conf.write_text(b.conf.read_text().replace("allow_anonymous true", "allow_anonymous false"))
    await asyncio.to_thread(b.stop)
    await asyncio.to_thread(b.start)
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 5)
        wrong = mqtt_upstream(b.url, name="wrong", username="edge", password="nope")
        right = mqtt_upstream(b.url, name="right", username="edge", password="right")
        async with Running(log, wrong, right):
            await eventually(caught_up(log, right), what="the right login to deliver")
            await eventually(lambda: wrong.status.failures >= 1, what="the wrong one refused")
    assert "refused the connection: Not authorized" in (wrong.status.last_error or "")


async def test_a_puback_refusal_dead_letters_the_message_and_moves_on(
    tmp_path: Path, make_broker: Callable[..., Broker]
) -> None:
    """MQTT 5: a broker that refuses a publish (here: its ACL) says so in the PUBACK; the
    message's events are recorded in `deadletter` and the cursor moves past them."""
    acl = tmp_path / "acl"
    acl.write_text("topic write allowed/#\n")
    b = make_broker(extra=f"acl_file {acl}\n")
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 20)
        up = mqtt_upstream(
            b.url, protocol=5, batch_size=10, topic="denied/{stream}", streams=["readings"]
        )
        async with Running(log, up):
            await eventually(caught_up(log, up), what="the refusals handled")
            await eventually(lambda: log.head(Stream.DEADLETTER) == 2, what="2 records")
        records = await log.read(Stream.DEADLETTER, 0)
    assert [(r.data or {}).get("first_seq") for r in records] == [1, 11]
    (data,) = {
        json.dumps({k: v for k, v in (r.data or {}).items() if "seq" not in k}) for r in records
    }
    assert json.loads(data) == {
        "reason": "upstream_rejected",
        "detail": "PUBACK: Not authorized",
        "source": "upstream:m",
        "upstream": "m",
        "status": "PUBACK",
        "response": "Not authorized",
        "stream": "readings",
        "count": 10,
    }
    assert up.status.deadlettered == 20 and up.status.sent == 0


async def test_a_replay_request_is_applied_between_acknowledgements(
    tmp_path: Path, broker: Broker, collect: Callable[[str], Collector]
) -> None:
    prefix = f"rp-{tmp_path.name}"
    sink = collect(f"{prefix}/#")
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 100)
        cfg = mqtt_upstream(broker.url, format="event", topic=prefix + "/{stream}").cfg
        up = MqttUpstream(cfg, "pi-1", data_dir=tmp_path)
        async with Running(log, up):
            await eventually(caught_up(log, up), what="the first delivery")
            write_replay_request(tmp_path, "m", {Stream.READINGS: 60})
            await eventually(lambda: up.status.replays == 1, what="the request taken")
            await eventually(caught_up(log, up), what="the replay delivered")
            await eventually(lambda: len(sink.take()) == 140, what="140 messages")
        log_id = log.log_id
    ids = wire_ids(sink.take())
    assert ids[100:] == [f"{log_id}:readings:{i}" for i in range(61, 101)]
    assert not (tmp_path / "replay" / "m.json").exists()


async def test_a_message_mqtt_cannot_carry_is_dead_lettered_not_retried(
    tmp_path: Path, broker: Broker
) -> None:
    async with EventLog.open(tmp_path / "e.db", log_cfg()) as log:
        await fill(log, 1, sensor="x" * 70_000)  # a topic level longer than MQTT allows
        await fill(log, 2, sensor="fine")
        up = mqtt_upstream(broker.url, format="event", topic=f"big-{tmp_path.name}/{{sensor}}")
        async with Running(log, up):
            await eventually(caught_up(log, up), what="handled")
        (record,) = await log.read(Stream.DEADLETTER, 0)
    assert record.data is not None and record.data["status"] == "publish"
    assert record.data["detail"] == "publish: cannot publish: Publish topic is too long."
    assert (record.data["first_seq"], record.data["last_seq"]) == (1, 1)
    assert up.status.sent == 2 + 1  # the readings, and the record itself
