"""The cloud's live page: its JSON endpoints, and the page itself rendered by headless Chromium.

The Chromium tests drive Debian's `chromium` directly (`--dump-dom`, `--screenshot`) and are
skipped with the reason when it is not installed (`apt-get install chromium chromium-driver`).
"""

from __future__ import annotations

import asyncio
import math
import struct
import zlib
from collections.abc import AsyncIterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import aiohttp
import numpy as np
import pytest

from simulator.cloud import CloudServer, CloudStore

CHROMIUM = Path("/usr/bin/chromium")
needs_chromium = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason="headless Chromium is not installed (apt-get install -y chromium chromium-driver)",
)
DEADLINE = 5.0
CHROMIUM_DEADLINE = 40.0
LOG = "3e1a48afd96a"
AGENT = "greenhouse-pi-01"
TEMP, HUM = "board.temp1", "board.hum1"
WIDTH, HEIGHT = 1200, 800


# --- a realistic feed --------------------------------------------------------------------------


class Feed:
    """What an agent would have sent over the last four minutes, one stream per batch.

    Two sensors at 1 Hz; a 10 s mean per sensor; the temperature climbs past 35 and back, so one
    alert is raised and then cleared; the agent dropped 20 s of readings (a quota gap, reported,
    and missing from the readings); and one batch is sent twice with an overlap of one event.
    """

    def __init__(self, now: float) -> None:
        self.now = now
        self.t0 = now - 240.0
        self.seq = {"readings": 0, "aggregates": 0, "alerts": 0, "agent": 0}
        self.gap = (self.t0 + 150.0, self.t0 + 170.0)
        self.readings: dict[str, list[dict[str, Any]]] = {TEMP: [], HUM: []}
        self.aggregates: dict[str, list[dict[str, Any]]] = {TEMP: [], HUM: []}
        self.alerts: list[dict[str, Any]] = []
        self.gaps: list[dict[str, Any]] = []
        self._build()

    def event(self, stream: str, kind: str, t: float, **extra: Any) -> dict[str, Any]:
        self.seq[stream] += 1
        seq = self.seq[stream]
        ev = {"id": f"{LOG}:{stream}:{seq}", "stream": stream, "seq": seq, "kind": kind,
              "time": t, "recv_time": t + 0.02}  # fmt: skip
        ev.update(extra)
        return ev

    @staticmethod
    def temperature(s: float) -> float:
        excursion = 14.0 * math.exp(-(((s - 110.0) / 28.0) ** 2))
        return 22.0 + excursion + 0.4 * math.sin(s / 7.0) + 0.15 * math.sin(s * 1.7)

    @staticmethod
    def humidity(s: float) -> float:
        return 55.0 - 6.0 * math.exp(-(((s - 110.0) / 35.0) ** 2)) + 0.8 * math.sin(s / 11.0)

    def _build(self) -> None:
        raised: str | None = None
        window: dict[str, list[dict[str, Any]]] = {TEMP: [], HUM: []}
        for s in range(240):
            t = self.t0 + s
            if self.gap[0] <= t < self.gap[1]:
                continue
            for sensor, fn, unit in ((TEMP, self.temperature, "C"), (HUM, self.humidity, "%")):
                ev = self.event("readings", "reading", t, sensor=sensor, value=round(fn(s), 3),
                                unit=unit)  # fmt: skip
                self.readings[sensor].append(ev)
                window[sensor].append(ev)
            if (s + 1) % 10:
                continue
            for sensor in (TEMP, HUM):
                w = window[sensor]
                if not w:
                    continue
                mean = sum(e["value"] for e in w) / len(w)
                data = {"window": "mean_10s", "function": "mean", "size": 10.0, "count": len(w),
                        "first_time": w[0]["time"], "last_time": w[-1]["time"]}  # fmt: skip
                agg = self.event("aggregates", "aggregate", w[-1]["time"], sensor=sensor,
                                 value=round(mean, 3), unit=w[0]["unit"], data=data)  # fmt: skip
                self.aggregates[sensor].append(agg)
                w.clear()
                if sensor != TEMP:
                    continue
                rule = {"rule": "greenhouse_hot", "severity": "warning", "above": 35.0,
                        "clear_below": 32.0, "window": data}  # fmt: skip
                if raised is None and mean > 35.0:
                    raised = f"greenhouse_hot:{TEMP}:1"
                    kind = "alert.raised"
                elif raised is not None and mean < 32.0:
                    kind = "alert.cleared"
                else:
                    continue
                self.alerts.append(self.event("alerts", kind, agg["time"], sensor=TEMP,
                                              value=agg["value"], unit="C",
                                              data={"alert_id": raised, **rule}))  # fmt: skip
                if kind == "alert.cleared":
                    raised = None
        lost = {"stream": "readings", "reason": "quota", "count": 40, "unconsumed": 40,
                "first_seq": 1, "last_seq": 40, "first_recv_time": self.gap[0],
                "last_recv_time": self.gap[1], "first_time": self.gap[0],
                "last_time": self.gap[1]}  # fmt: skip
        self.gaps.append(self.event("agent", "gap", self.gap[1] + 1.0, data=lost))

    def batches(self, sensors: tuple[str, ...] = (TEMP, HUM)) -> list[dict[str, Any]]:
        """The bodies to post in order, the last one a resend overlapping its predecessor."""
        readings = sorted((e for s in sensors for e in self.readings[s]), key=lambda e: e["seq"])
        aggregates = sorted(
            (e for s in sensors for e in self.aggregates[s]), key=lambda e: e["seq"]
        )
        chunks = [readings[i : i + 50] for i in range(0, len(readings), 50)]
        chunks += [aggregates[i : i + 10] for i in range(0, len(aggregates), 10)]
        if TEMP in sensors:  # the alerts and the gap go with the first sensor
            chunks += [self.gaps, self.alerts]
        # Sent as the agent catches up: oldest first (alerts jump the queue: first of a tie).
        chunks.sort(key=lambda c: (c[-1]["time"], c[0]["stream"] != "alerts"))
        bodies = [self.body(c) for c in chunks]
        bodies.append(self.body(readings[-1:]))  # a resend: one duplicate
        return bodies

    @staticmethod
    def body(events: list[dict[str, Any]]) -> dict[str, Any]:
        return {"log_id": LOG, "agent": AGENT, "sent_at": events[-1]["recv_time"], "events": events}


async def feed(url: str, bodies: list[dict[str, Any]]) -> None:
    timeout = aiohttp.ClientTimeout(total=DEADLINE)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for body in bodies:
            async with session.post(f"{url}/ingest", json=body) as resp:
                assert resp.status == 200, await resp.text()


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[CloudServer]:
    async with CloudServer(tmp_path / "cloud.db") as srv:
        yield srv


async def get_json(url: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session,
        session.get(url) as resp,
    ):
        return resp.status, await resp.json()


# --- the JSON endpoints ----------------------------------------------------------------------


async def test_page_is_served_self_contained(server: CloudServer) -> None:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=DEADLINE)) as session,
        session.get(f"{server.url}/") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/html"
        page = await resp.text()
    for needle in ('id="lag"', 'id="duplicates"', 'id="gaps"', "sensor-plot", "alert-marker"):
        assert needle in page
    # Nothing fetched from elsewhere: the machine may be offline.
    assert "://" not in page.replace("http://www.w3.org/2000/svg", "")


async def test_series_and_summary_of_a_realistic_feed(server: CloudServer) -> None:
    import time

    f = Feed(time.time())
    await feed(server.url, f.batches())
    status, s = await get_json(f"{server.url}/api/summary")
    assert status == 200
    n_readings = len(f.readings[TEMP]) + len(f.readings[HUM])
    assert s["streams"]["readings"] == n_readings == 2 * (240 - 20)
    assert s["duplicates"] == 1
    assert s["gaps"]["events"] == 1 and s["gaps"]["readings"] == 40
    gap = s["gaps"]["recent"][0]
    assert (gap["reason"], gap["stream"], gap["start"], gap["end"]) == (
        "quota", "readings", f.gap[0], f.gap[1],
    )  # fmt: skip
    assert len(s["deliveries"]) == len(f.batches())
    assert s["deliveries"][-1][3] == 1  # the resend: one duplicate
    assert [a["kind"] for a in s["alerts"]] == ["alert.cleared", "alert.raised"]

    status, temp = await get_json(f"{server.url}/api/series?sensor={TEMP}")
    assert status == 200
    # Defaults: the last 300 s of the sensor's own event time.
    assert temp["until"] == f.readings[TEMP][-1]["time"]
    assert temp["since"] == temp["until"] - 300
    assert sum(r[4] for r in temp["readings"]) == len(f.readings[TEMP])
    assert [round(r[1], 3) for r in temp["readings"]] == [e["value"] for e in f.readings[TEMP]]
    assert len(temp["aggregates"]) == len(f.aggregates[TEMP])
    agg = temp["aggregates"][0]
    assert (agg["window"], agg["start"], agg["end"]) == ("mean_10s", f.t0, f.t0 + 9)
    assert [(a["kind"], a["rule"], a["above"]) for a in temp["alerts"]] == [
        ("alert.raised", "greenhouse_hot", 35.0), ("alert.cleared", "greenhouse_hot", 35.0),
    ]  # fmt: skip
    assert temp["alerts"][0]["alert_id"] == temp["alerts"][1]["alert_id"]

    # Bounded: buckets of many readings, still every reading counted once.
    since, until = f.t0, f.now
    status, coarse = await get_json(
        f"{server.url}/api/series?sensor={HUM}&since={since}&until={until}&points=12"
    )
    assert status == 200 and 1 < len(coarse["readings"]) <= 12
    assert sum(r[4] for r in coarse["readings"]) == len(f.readings[HUM])
    assert all(r[2] <= r[1] <= r[3] for r in coarse["readings"])
    assert coarse["alerts"] == []

    with CloudStore(server.db_path) as store:
        assert store.series(HUM, since, until, 12) == coarse

    for query, code in (
        ("sensor=nope", 404),
        ("", 400),
        (f"sensor={TEMP}&since=yesterday", 400),
        (f"sensor={TEMP}&points=0", 400),
        (f"sensor={TEMP}&points=x", 400),
    ):
        status, reply = await get_json(f"{server.url}/api/series?{query}")
        assert status == code and reply["error"], query


# --- the page in headless Chromium -----------------------------------------------------------


async def chromium(tmp_path: Path, name: str, *args: str) -> bytes:
    """Run headless Chromium once; its stdout."""
    profile = tmp_path / f"chromium-{name}"
    proc = await asyncio.create_subprocess_exec(
        str(CHROMIUM), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--no-first-run", "--hide-scrollbars", "--force-device-scale-factor=1",
        f"--user-data-dir={profile}", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CHROMIUM_DEADLINE)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")[-2000:]
    return out


class Dom(HTMLParser):
    """The elements of a dumped DOM: (tag, attributes), and the text of elements with an id."""

    def __init__(self, html: str) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.text: dict[str, str] = {}
        self._open: list[str] = []
        self.feed(html)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = {k: v or "" for k, v in attrs}
        self.elements.append((tag, attributes))
        if "id" in attributes:
            self.text[attributes["id"]] = ""
            self._open.append(attributes["id"])

    def handle_endtag(self, tag: str) -> None:
        pass

    def handle_data(self, data: str) -> None:
        for element_id in self._open:
            self.text[element_id] += data
        self._open = [i for i in self._open if not self.text[i]]

    def find(self, tag: str, cls: str | None = None, **attrs: str) -> list[dict[str, str]]:
        return [
            a
            for t, a in self.elements
            if t == tag
            and (cls is None or cls in a.get("class", "").split())
            and all(a.get(k.replace("_", "-")) == v for k, v in attrs.items())
        ]


@needs_chromium
async def test_page_renders_and_updates_in_chromium(
    server: CloudServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    f = Feed(time.time())
    await feed(server.url, f.batches((TEMP,)))
    # The humidity sensor's data arrives only when the page polls a second time: seeing its
    # plot in the final DOM shows that the page keeps polling and redraws what is new.
    polls = 0
    summary = server.summary

    async def summary_then_more() -> dict[str, Any]:
        nonlocal polls
        polls += 1
        if polls == 2:
            await feed(server.url, f.batches((HUM,)))
        return await summary()

    monkeypatch.setattr(server, "summary", summary_then_more)
    out = await chromium(
        tmp_path, "dom", "--virtual-time-budget=5000", f"--window-size={WIDTH},{HEIGHT}",
        "--dump-dom", f"{server.url}/",
    )  # fmt: skip
    dom = Dom(out.decode())
    assert polls >= 2
    assert int(dom.find("span", id="updated")[0]["data-polls"]) >= 2
    for sensor in (TEMP, HUM):
        assert len(dom.find("svg", "sensor-plot", data_sensor=sensor)) == 1, sensor
    assert len(dom.find("path", "readings")) == 2
    assert len(dom.find("line", "aggregate")) >= len(f.aggregates[TEMP]) + len(f.aggregates[HUM])
    markers = dom.find("g", "alert-marker")
    assert sorted(m["data-kind"] for m in markers) == ["cleared", "raised"]
    assert len(dom.find("rect", "gap-band")) >= 2  # on both plots (and in the legends)
    assert len(dom.find("rect", "lag-bar")) == polls_batches(f)
    assert dom.text["duplicates"].strip() == "2"  # one per feed's resend
    assert dom.text["gaps"].strip() == "1"
    assert dom.text["lag"].strip().endswith(("ms", "s", "min")), dom.text["lag"]
    assert float(dom.find("div", id="lag")[0]["data-seconds"]) >= 0
    assert len(dom.find("tr", "alert-row")) == 2
    assert dom.text["status"].strip() == "receiving"


def polls_batches(f: Feed) -> int:
    return len(f.batches((TEMP,))) + len(f.batches((HUM,)))


def decode_png(data: bytes) -> np.ndarray[Any, Any]:
    """An 8-bit RGB or RGBA PNG as a (height, width, channels) array (stdlib zlib + numpy)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, bytearray(), None
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, chunk = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        assert (
            zlib.crc32(kind + chunk)
            == struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])[0]
        )
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    assert header is not None
    width, height, depth, colour, _, _, interlace = header
    assert depth == 8 and colour in (2, 6) and interlace == 0, header
    bpp = 3 if colour == 2 else 4
    raw = np.frombuffer(zlib.decompress(bytes(idat)), np.uint8).reshape(height, width * bpp + 1)
    out = np.zeros((height, width * bpp), np.int32)
    prev = np.zeros(width * bpp, np.int32)
    for y in range(height):
        kind, line = raw[y, 0], raw[y, 1:].astype(np.int32)
        if kind == 0:
            row = line
        elif kind == 1:  # Sub: a running sum per channel
            row = np.cumsum(line.reshape(width, bpp), axis=0).reshape(-1) % 256
        elif kind == 2:  # Up
            row = (line + prev) % 256
        else:  # Average and Paeth depend on the byte to the left: one byte at a time
            row = np.zeros_like(line)
            cur, up = line.tolist(), prev.tolist()
            acc = [0] * len(cur)
            for i in range(len(cur)):
                a = acc[i - bpp] if i >= bpp else 0
                b = up[i]
                if kind == 3:
                    acc[i] = (cur[i] + (a + b) // 2) & 0xFF
                else:
                    c = up[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else b if pb <= pc else c
                    acc[i] = (cur[i] + pred) & 0xFF
            row = np.array(acc, np.int32)
        out[y], prev = row, row
    return out.reshape(height, width, bpp).astype(np.uint8)


@needs_chromium
async def test_page_screenshot(server: CloudServer, tmp_path: Path) -> None:
    import time

    f = Feed(time.time())
    await feed(server.url, f.batches())
    shot = tmp_path / "cloud.png"
    await chromium(
        tmp_path, "shot", "--virtual-time-budget=5000", f"--window-size={WIDTH},{HEIGHT}",
        f"--screenshot={shot}", f"{server.url}/",
    )  # fmt: skip
    pixels = decode_png(shot.read_bytes())
    assert pixels.shape[:2] == (HEIGHT, WIDTH)
    rgb = pixels[:, :, :3].reshape(-1, 3)
    colours = np.unique(
        rgb[:, 0].astype(np.int32) << 16 | rgb[:, 1].astype(np.int32) << 8 | rgb[:, 2]
    )
    assert len(colours) > 200, f"only {len(colours)} colours: blank?"

    def seen(hex_colour: str, tolerance: int = 24) -> int:
        want = np.array([int(hex_colour[i : i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb.astype(np.int32) - want).max(axis=1) <= tolerance).sum())

    # The readings' blue, the window means' orange and the alert's red are all drawn.
    assert seen("#2563eb") > 500
    assert seen("#ea580c") > 100
    assert seen("#dc2626") > 20
