"""Fast MQTT 3.1.1 QoS 1 clients on a raw socket: the load generator of `bench/e2e.py`, and
the subscriber that counts what arrives.

paho tops out near 6,400 QoS 1 messages/s published on the 2-core test machine (a core of
Python per 6.4k messages: a message object, a lock and a system call per PUBLISH and per
PUBACK), and near 12,000 received, below the 15,000 readings/s the agent is asked for with one
reading per message. These clients do only what MQTT asks of them, in bulk.

`FastPublisher`:

- CONNECT with a clean session and no keepalive (a bench run is short and the connection is
  never idle long: nothing needs PINGREQ), then the CONNACK;
- PUBLISH packets built a chunk at a time from a per-run prefix (the fixed header byte and the
  topic with its length), packet ids 1..65535 wrapping, and written with one `sendall` per
  chunk;
- PUBACKs read in bulk and parsed out of a buffer (4 bytes each), at most `window` messages
  unacknowledged, and an id never reused while it is;
- DISCONNECT at the end.

Anything else is an error, never a silent low figure: mosquitto closes the connection on a
protocol error (3.1.1 has no way to say why), so an end of stream, an unexpected packet, a
PUBACK for an id not in flight or no PUBACK for `stall` seconds raises `LoadError`.

A payload carries the time it was built in (the `ts` of a reading), so it is built when its
chunk goes out, not before the run: latencies count from then. A chunk is at most `CHUNK`
messages and what the window and the rate allow, so the stamp is late by a chunk's build time
(some 100 us for 64 messages of one reading).

`FastSubscriber`: the same CONNECT, a SUBSCRIBE at QoS 1 and its SUBACK; then a thread reads
PUBLISH packets in large chunks, hands each message to a callback, and writes the PUBACKs of a
chunk with one `sendall`. An error there (an end of stream, a packet other than PUBLISH) is kept
in `error` for the caller to check.
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

#: Messages built and written per `sendall`: large enough that system calls are few, small
#: enough that the window refills as PUBACKs come and a payload's `ts` is near its send time.
CHUNK = 64
#: Packet ids are 16 bits and 0 is not one.
MAX_ID = 65535
_CONNACK = b"\x20\x02"
_SUBSCRIBE = 0x82  # type 8 with the flags 3.1.1 requires
_SUBACK = 0x90
_DISCONNECT = b"\xe0\x00"
#: A 4-byte PUBACK as a big-endian uint32: type 4 and remaining length 2, then the id.
_PUBACK_HEAD = 0x4002
_PAIR = struct.Struct(">HH")

#: The payload of message `i` of a run, given the time its chunk is built (`repr(time.time())`).
Body = Callable[[int, str], bytes]
#: What a subscriber hands on: the wall-clock time a message's chunk was read, its topic and
#: payload. Called on the subscriber's thread.
OnMessage = Callable[[float, str, bytes], None]


class LoadError(RuntimeError):
    """The broker refused or dropped the connection, or broke the protocol."""


@dataclass(frozen=True, slots=True)
class Published:
    """What a run of `FastPublisher.publish` did: wall-clock start and end (the end is the last
    PUBACK), the messages sent and acknowledged."""

    start: float
    end: float
    sent: int
    acked: int


def remaining_length(size: int) -> bytes:
    """MQTT's variable-length integer: 7 bits a byte, the lowest first, up to 4 bytes."""
    if not 0 <= size < 1 << 28:
        raise ValueError(f"an MQTT packet cannot hold {size} bytes")
    out = bytearray()
    while True:
        size, digit = size >> 7, size & 0x7F
        out.append(digit | (0x80 if size else 0))
        if not size:
            return bytes(out)


def _utf8(text: str) -> bytes:
    """An MQTT string: its length in two bytes, then its UTF-8."""
    raw = text.encode()
    return len(raw).to_bytes(2, "big") + raw


def connect_packet(client_id: str) -> bytes:
    """CONNECT, MQTT 3.1.1: clean session, keepalive 0 (none), no will, no credentials."""
    body = _utf8("MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + _utf8(client_id)
    return b"\x10" + remaining_length(len(body)) + body


def _packet_at(buf: bytearray, pos: int) -> tuple[int, int] | None:
    """Where the packet at `pos` goes on after its remaining length, and where it ends; None
    while it is not all in `buf`."""
    start, length, shift = pos + 1, 0, 0
    while True:  # the remaining length: up to 4 bytes of 7 bits, the lowest first
        if start >= len(buf):
            return None
        byte = buf[start]
        start += 1
        length |= (byte & 0x7F) << shift
        if byte < 0x80:
            break
        shift += 7
        if shift == 28:
            raise LoadError("a packet from the broker with a 5-byte remaining length")
    end = start + length
    return (start, end) if end <= len(buf) else None


def subscribe_packet(topics: list[str], mid: int = 1) -> bytes:
    """SUBSCRIBE, MQTT 3.1.1: each topic filter at QoS 1."""
    body = mid.to_bytes(2, "big") + b"".join(_utf8(t) + b"\x01" for t in topics)
    return bytes([_SUBSCRIBE]) + remaining_length(len(body)) + body


class _Client:
    """A connected MQTT 3.1.1 session (clean, no keepalive) and its read buffer."""

    def __init__(self, host: str, port: int, client_id: str, stall: float) -> None:
        self.stall = stall
        self._buf = bytearray()
        self._sock = socket.create_connection((host, port), timeout=stall)
        try:
            # Writes are large already; the last small one must not wait for a TCP ACK.
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._sock.sendall(connect_packet(client_id))
            ack = self._recv_exactly(4)
            if ack[:2] != _CONNACK or ack[3] != 0:
                raise LoadError(f"the broker refused the connection: CONNACK {ack.hex()}")
        except BaseException:
            self._sock.close()
            raise

    def _recv_exactly(self, size: int) -> bytes:
        while len(self._buf) < size:
            self._fill()
        out = bytes(self._buf[:size])
        del self._buf[:size]
        return out

    def _fill(self) -> None:
        try:
            data = self._sock.recv(1 << 16)
        except TimeoutError as exc:
            raise LoadError(f"no answer from the broker for {self.stall:g}s") from exc
        except OSError as exc:  # a reset: mosquitto gave up on us
            raise LoadError(f"reading from the broker: {exc}") from exc
        if not data:
            # mosquitto closes on a protocol error: MQTT 3.1.1 has no packet to say why.
            raise LoadError("the broker closed the connection (a protocol error?)")
        self._buf += data

    def _write(self, data: bytes) -> None:
        try:
            self._sock.sendall(data)
        except OSError as exc:  # a reset, a broken pipe, or no room for `stall` seconds
            raise LoadError(f"writing to the broker: {exc}") from exc

    def close(self) -> None:
        """DISCONNECT and close the socket (quietly if the broker is gone already)."""
        try:
            self._sock.sendall(_DISCONNECT)
        except OSError:
            pass
        finally:
            self._sock.close()


class FastPublisher(_Client):
    """One connection to a broker, publishing at QoS 1 (see the module docstring).

    Not thread-safe: one thread calls `publish`, one run at a time, and then `close`.
    """

    def __init__(self, host: str, port: int, client_id: str, *, stall: float = 30.0) -> None:
        super().__init__(host, port, client_id, stall)
        # Per packet id: 1 while its PUBLISH awaits its PUBACK.
        self._pending = bytearray(MAX_ID + 1)
        self._next_id = 1

    def _take_pubacks(self) -> int:
        """Release the ids of the whole PUBACKs in the buffer; how many there were."""
        buf, pending = self._buf, self._pending
        whole = len(buf) & ~3
        count = 0
        for head, mid in _PAIR.iter_unpack(memoryview(buf)[:whole]):
            if head != _PUBACK_HEAD:
                raise LoadError(f"expected a PUBACK from the broker, not packet 0x{head:04x}")
            if not pending[mid]:
                raise LoadError(f"the broker acknowledged packet id {mid}, which is not in flight")
            pending[mid] = 0
            count += 1
        del buf[:whole]
        return count

    def publish(
        self, topic: str, count: int, body: Body, *, window: int, rate: float = 0.0
    ) -> Published:
        """Publish `count` messages to `topic` at QoS 1, message `i`'s payload `body(i, ts)`,
        with at most `window` unacknowledged, at `rate` messages/s (0: as fast as the window
        lets it); return once every one is acknowledged. Raises LoadError (see the class)."""
        if not 1 <= window <= MAX_ID:
            raise ValueError(f"window must be between 1 and {MAX_ID}")
        prefix = _utf8(topic)
        sent = acked = 0
        start = time.time()
        while acked < count:
            now = time.time()
            due = count if rate <= 0 else min(count, int((now - start) * rate) + 1)
            want = min(window - (sent - acked), due - sent, CHUNK)
            went = self._send(prefix, sent, want, body, repr(now)) if want > 0 else 0
            sent += went
            if sent - acked >= window or sent == count or went < want:
                wait = self.stall  # only a PUBACK lets more go out
            elif sent >= due:  # paced: until the next message is due
                wait = max(0.0, start + sent / rate - time.time())
            else:
                wait = 0.0  # more may go out now: just take the PUBACKs already here
            readable, _, _ = select.select([self._sock], [], [], wait)
            if readable:
                self._fill()
                acked += self._take_pubacks()
            elif wait == self.stall:
                raise LoadError(
                    f"no PUBACK for {self.stall:g}s with {sent - acked} messages in flight"
                )
        return Published(start, time.time(), sent, acked)

    def _send(self, prefix: bytes, first: int, count: int, body: Body, ts: str) -> int:
        """Build and write messages `first`.. (up to `count`) as one chunk; how many went
        (fewer when the next packet id is still in flight: PUBACKs came out of order)."""
        pending, mid = self._pending, self._next_id
        packets = []
        for i in range(first, first + count):
            if pending[mid]:
                break
            pending[mid] = 1
            payload = body(i, ts)
            size = len(prefix) + 2 + len(payload)
            packets.append(
                b"\x32" + remaining_length(size) + prefix + mid.to_bytes(2, "big") + payload
            )
            mid = mid + 1 if mid < MAX_ID else 1
        self._next_id = mid
        if packets:
            self._write(b"".join(packets))
        return len(packets)


class FastSubscriber(_Client):
    """One connection to a broker, subscribed at QoS 1 to `topics`, reading on a thread of its
    own (see the module docstring): `on_message` is called there, one call at a time.

    `error` holds why the thread stopped early (None while it runs, or after `close`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        client_id: str,
        topics: list[str],
        on_message: OnMessage,
        *,
        stall: float = 30.0,
    ) -> None:
        super().__init__(host, port, client_id, stall)
        self.error: str | None = None
        self._on_message = on_message
        self._topics: dict[bytes, str] = {}  # a topic's text, kept: a run uses a few
        self._closing = False
        self._write_lock = threading.Lock()  # PUBACKs from the thread, DISCONNECT from `close`
        try:
            self._write(subscribe_packet(topics))
            head = self._recv_exactly(2)
            codes = self._recv_exactly(head[1])[2:] if head[0] == _SUBACK else b""
            if head[0] != _SUBACK or len(codes) != len(topics) or any(c > 2 for c in codes):
                raise LoadError(f"the broker refused the subscription: {head.hex()} {codes.hex()}")
        except BaseException:
            self._sock.close()
            raise
        self._sock.settimeout(None)  # a subscriber waits as long as the run lasts
        self._thread = threading.Thread(target=self._run, name=f"sub-{client_id}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                self._take(time.time())
                self._fill()
        except LoadError as exc:
            if not self._closing:
                self.error = str(exc)
        except Exception as exc:  # a callback's, or a bug: the caller sees it in `error`
            self.error = f"{type(exc).__name__}: {exc}"

    def _take(self, now: float) -> None:
        """Hand on the whole PUBLISH packets in the buffer and acknowledge them in one write."""
        buf, on_message = self._buf, self._on_message
        size, pos = len(buf), 0
        acks: list[bytes] = []
        topics = self._topics
        while pos < size:
            first = buf[pos]
            whole = _packet_at(buf, pos)
            if whole is None:
                break  # the rest of the packet is not here yet
            start, end = whole
            if first >> 4 != 3:
                raise LoadError(f"expected a PUBLISH from the broker, not packet 0x{first:02x}")
            qos = (first >> 1) & 3
            mark = start + 2 + ((buf[start] << 8) | buf[start + 1])
            name = bytes(buf[start + 2 : mark])
            topic = topics.get(name)
            if topic is None:
                topic = topics[name] = name.decode("utf-8", "backslashreplace")
            if qos == 1:
                acks.append(b"\x40\x02" + bytes(buf[mark : mark + 2]))
                mark += 2
            elif qos:
                raise LoadError(f"a QoS {qos} PUBLISH, though the subscription was QoS 1")
            on_message(now, topic, bytes(buf[mark:end]))
            pos = end
        del buf[:pos]
        if acks:
            with self._write_lock:
                self._write(b"".join(acks))

    def close(self) -> None:
        """DISCONNECT, end the thread and close the socket."""
        self._closing = True
        with self._write_lock, contextlib.suppress(OSError):
            self._sock.sendall(_DISCONNECT)
        with contextlib.suppress(OSError):
            # Wakes the thread's recv (closing the socket under it would not).
            self._sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(10)
        self._sock.close()
