"""A small HTTP/1.1 client on asyncio streams, for the one request the HTTP upstream makes.

The upstream POSTs a body to one URL with fixed headers and reads the status, a few headers
and a little of the body. aiohttp's client does that and much more, and importing it costs
about 9 MiB of resident memory for the agent's whole life (issue 7: under 60 MiB on a Pi), so
this module does just that request, carefully:

- one keep-alive connection to the URL's origin (http or https), opened when first needed;
  a connection that failed, timed out, was cancelled, or whose answer cannot be framed for
  reuse is closed, never reused;
- the whole attempt (connect, TLS handshake, send, answer) is bounded by `timeout`;
- a reused connection the server closed while it was idle (it fails before any byte of the
  answer) is replaced once by a fresh one within the same deadline: the requests sent this
  way must be idempotent (the upstream's are: the receiver drops events it already has);
- the answer is read strictly (status line, at most `MAX_HEADERS` fields of at most
  `MAX_LINE` bytes, Content-Length or chunked framing, 1xx interim answers skipped) and at
  most `max_body` bytes of its body are kept.

Errors: `TimeoutError`; the ssl module's own errors (`ssl.SSLCertVerificationError` and so
on, so their verify codes can be read); `CannotConnect`; `ServerDisconnected`;
`HttpProtocolError`; other `OSError`s as the socket raised them.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import ssl
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import quote, unquote, urlsplit

__all__ = [
    "MAX_BODY",
    "MAX_HEADERS",
    "MAX_LINE",
    "CannotConnect",
    "Headers",
    "HttpClient",
    "HttpProtocolError",
    "Response",
    "ServerDisconnected",
]

log = logging.getLogger(__name__)

#: The longest status line, header field or chunk-size line accepted, in bytes.
MAX_LINE = 8192
#: The most header fields (or trailer fields) one answer may have.
MAX_HEADERS = 100
#: The body kept by default; past it the rest is not read and the connection is closed.
MAX_BODY = 1024 * 1024
#: Interim (1xx) answers skipped before the final one, at most.
MAX_INTERIM = 10
#: How long `close` waits for a clean close (TLS close_notify) before cutting the connection.
CLOSE_GRACE = 0.5

_DEFAULT_PORTS = {"http": 80, "https": 443}
# RFC 9110 §5.6.2: a field name is a token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# Control characters other than HTAB (RFC 9110 §5.5), in a field value we send.
_CTL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_DIGITS = re.compile(r"[0-9]{1,18}")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: (.*))?")
# The client frames the body itself and never waits for 100-continue.
_RESERVED = frozenset({"content-length", "transfer-encoding", "expect"})


class CannotConnect(ConnectionError):
    """The connection could not be opened (refused, unreachable, name not found).

    TLS errors are not wrapped: they come as the ssl module raised them.
    """


class ServerDisconnected(ConnectionError):
    """The server closed (or reset) the connection before its answer was complete.

    `midway` is False when not a byte of the answer had arrived: the request may or may not
    have been processed, and nothing says why the server gave up on it.
    """

    def __init__(self, message: str, *, midway: bool) -> None:
        super().__init__(message)
        self.midway = midway


class HttpProtocolError(Exception):
    """The server's answer is not well-formed HTTP/1.1 (or exceeds a bound); says what."""


class Headers(Mapping[str, str]):
    """Header fields looked up without regard to case.

    A field received more than once reads as its values joined with ", " (RFC 9110 §5.3).
    Iterating gives the names as the server spelled them.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: dict[str, tuple[str, str]] = {}
        for name, value in fields:
            self._add(name, value)

    def _add(self, name: str, value: str) -> None:
        key = name.lower()
        if key in self._fields:
            first, earlier = self._fields[key]
            self._fields[key] = (first, f"{earlier}, {value}")
        else:
            self._fields[key] = (name, value)

    def __getitem__(self, name: str) -> str:
        return self._fields[name.lower()][1]

    def __iter__(self) -> Iterator[str]:
        return (name for name, _ in self._fields.values())

    def __len__(self) -> int:
        return len(self._fields)

    def __repr__(self) -> str:
        return f"Headers({list(self._fields.values())!r})"


@dataclass(frozen=True, slots=True)
class Response:
    """A final answer: status, reason, headers and (at most `max_body` bytes of) body.

    `truncated` says the body was longer than that and the rest was left unread.
    """

    status: int
    reason: str
    headers: Headers
    body: bytes
    version: str = "HTTP/1.1"
    truncated: bool = False

    def text(self) -> str:
        """The body decoded with the charset of its Content-Type (UTF-8 when it names none
        or one Python does not know), undecodable bytes replaced."""
        charset = "utf-8"
        for param in self.headers.get("Content-Type", "").split(";")[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "charset" and value.strip():
                charset = value.strip().strip('"')
        try:
            return self.body.decode(charset, errors="replace")
        except LookupError:
            return self.body.decode("utf-8", errors="replace")


@dataclass(slots=True)
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    def idle_and_open(self) -> bool:
        """Whether nothing says the server has closed it (it may still have, unseen)."""
        return not (
            self.writer.is_closing() or self.reader.at_eof() or self.reader.exception() is not None
        )

    def abort(self) -> None:
        self.writer.transport.abort()


class HttpClient:
    """POSTs to one URL over one keep-alive HTTP/1.1 connection.

    `ssl_context` is used for an https:// URL (None: the system's default context, which
    verifies the server); it must be None for http://. `headers` go with every request
    (User-Agent, Authorization, ...); Host and Content-Length are the client's own. User and
    password in the URL become a Basic Authorization header. Raises ValueError for a URL or
    header it cannot send.

    Requests are serialised: `post` may be called from several tasks, and each request waits
    for the one before to finish. `close` waits for a request in progress (cancel it first
    not to wait) and never overlaps one; a request after `close` opens a new connection.
    """

    def __init__(
        self,
        url: str,
        *,
        ssl_context: ssl.SSLContext | None = None,
        headers: Mapping[str, str] | None = None,
        timeout: float,
        max_body: int = MAX_BODY,
    ) -> None:
        parts = urlsplit(url)
        # The url as errors and logs show it: a password in it is not repeated.
        shown = url if parts.password is None else url.replace(f":{parts.password}@", ":***@")
        scheme = parts.scheme.lower()
        if scheme not in _DEFAULT_PORTS:
            raise ValueError(f"url {shown!r}: the scheme must be http or https")
        try:
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"url {shown!r}: {exc}") from None
        if not parts.hostname:
            raise ValueError(f"url {shown!r} names no host")
        if ssl_context is not None and scheme != "https":
            raise ValueError(f"url {shown!r}: a TLS context is for https:// urls")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, not {timeout}")
        host = parts.hostname
        if not host.isascii():
            host = host.encode("idna").decode("ascii")
        self.url = shown
        self.timeout = timeout
        self.max_body = max_body
        self._host = host
        self._port = port or _DEFAULT_PORTS[scheme]
        self._ssl = (ssl_context or ssl.create_default_context()) if scheme == "https" else None
        authority = f"[{host}]" if ":" in host else host
        if port is not None and port != _DEFAULT_PORTS[scheme]:
            authority += f":{port}"
        self.authority = authority
        # The request target: what is not allowed raw in it is percent-encoded, escapes
        # already in the URL are kept (as yarl does for aiohttp).
        target = quote(parts.path or "/", safe="/%:@!$&'()*+,;=~")
        if parts.query:
            target += "?" + quote(parts.query, safe="/?%:@!$&'()*+,;=~")
        self._request_line = f"POST {target} HTTP/1.1\r\n".encode("ascii")
        fields = {"host": ("Host", authority)}
        if parts.username is not None:
            user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
            token = base64.b64encode(user_pass.encode("utf-8")).decode("ascii")
            fields["authorization"] = ("Authorization", f"Basic {token}")
        for name, value in _checked(headers or {}).items():
            if name.lower() == "authorization" and "authorization" in fields:
                raise ValueError("give credentials in the url or an Authorization header")
            fields[name.lower()] = (name, value)
        self._fields = fields
        self._conn: _Connection | None = None
        self._lock = asyncio.Lock()
        #: Connections opened so far (for status and tests).
        self.connections = 0

    async def __aenter__(self) -> HttpClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def post(self, body: bytes, headers: Mapping[str, str] | None = None) -> Response:
        """POST `body` with the client's headers and `headers` (which take precedence);
        the final answer, whatever its status.

        Raises TimeoutError when the whole attempt takes longer than `timeout`, ValueError
        for a header it cannot send, and the errors listed in the module's docstring.
        """
        fields = dict(self._fields)
        for name, value in _checked(headers or {}).items():
            fields[name.lower()] = (name, value)
        head = b"".join(
            [
                self._request_line,
                *(f"{name}: {value}\r\n".encode() for name, value in fields.values()),
                b"Content-Length: %d\r\n\r\n" % len(body),
            ]
        )
        async with self._lock:
            try:
                async with asyncio.timeout(self.timeout):
                    return await self._send(head, body)
            except BaseException:
                # Timed out, cancelled or failed half-way: what the connection holds now is
                # unknown, so it is never used again.
                self._drop()
                raise

    async def close(self) -> None:
        """Close the connection (if one is open); the client stays usable."""
        async with self._lock:
            conn, self._conn = self._conn, None
            if conn is None:
                return
            conn.writer.close()
            try:
                # A TLS close waits for the server's close_notify, which a dead server may
                # never send.
                async with asyncio.timeout(CLOSE_GRACE):
                    await conn.writer.wait_closed()
            except (OSError, TimeoutError):
                conn.abort()

    # ------------------------------------------------------------------ the exchange

    async def _send(self, head: bytes, body: bytes) -> Response:
        conn = self._conn
        if conn is not None and not conn.idle_and_open():
            self._drop()
            conn = None
        if conn is not None:
            try:
                return await self._exchange(conn, head, body)
            except ServerDisconnected as exc:
                if exc.midway:
                    raise
                # Closed while idle (keep-alive timeout, restart): the server never saw this
                # request, or dropped it unanswered; the request is idempotent, so again once.
                log.debug("%s: a reused connection was closed (%s); a new one", self.url, exc)
                self._drop()
        conn = self._conn = await self._connect()
        return await self._exchange(conn, head, body)

    async def _connect(self) -> _Connection:
        try:
            reader, writer = await asyncio.open_connection(
                self._host,
                self._port,
                ssl=self._ssl,
                server_hostname=self._host if self._ssl else None,
                limit=MAX_LINE,
            )
        except ssl.SSLError:
            raise  # as the ssl module says it: the verify code tells what to check
        except OSError as exc:
            raise CannotConnect(
                f"cannot connect to {self.authority}: {exc.strerror or exc}"
            ) from exc
        self.connections += 1
        return _Connection(reader, writer)

    async def _exchange(self, conn: _Connection, head: bytes, body: bytes) -> Response:
        # One write, so the head and a small body leave in one segment (and TLS record). The
        # answer is read at once, without waiting for the body to drain: a server may answer
        # (413, 401) before it has read the body, or without ever reading it. The transport
        # sends the rest meanwhile, and a failure to send reaches the reader as the error.
        conn.writer.write(head + body)
        response, reusable = await _read_response(conn.reader, self.max_body)
        if conn.writer.transport.get_write_buffer_size():
            reusable = False  # answered before the whole body went: the framing is lost
        if not reusable:
            self._drop()
        return response

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.abort()


# ---------------------------------------------------------------------- reading an answer


async def _read_response(reader: asyncio.StreamReader, max_body: int) -> tuple[Response, bool]:
    """The final answer on `reader`, and whether the connection may carry another request."""
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise ServerDisconnected(
            "the server closed the connection without an answer", midway=bool(exc.partial)
        ) from exc
    except ConnectionError as exc:
        raise ServerDisconnected(
            f"the server closed the connection without an answer ({exc})", midway=False
        ) from exc
    except asyncio.LimitOverrunError as exc:
        raise HttpProtocolError(f"a status line longer than {MAX_LINE} bytes") from exc
    interim = 0
    while True:
        # RFC 9112 §2.2: an empty line before the status line is tolerated.
        while line in (b"\r\n", b"\n") and interim <= MAX_INTERIM:
            interim += 1
            line = await _readline(reader, "the status line")
        version, status, reason = _status_line(line)
        headers = await _read_fields(reader, "header")
        if status >= 200:
            break
        if status == 101:
            raise HttpProtocolError("101 Switching Protocols, to a request that asked for none")
        interim += 1
        if interim > MAX_INTERIM:
            raise HttpProtocolError(f"more than {MAX_INTERIM} interim (1xx) answers")
        line = await _readline(reader, "the status line")

    tokens = {t.strip().lower() for t in headers.get("Connection", "").split(",")}
    reusable = "keep-alive" in tokens if version == "HTTP/1.0" else "close" not in tokens
    body = b""
    truncated = False
    if status in (204, 304):
        pass  # RFC 9112 §6.3: never a body, whatever the headers say
    elif "Transfer-Encoding" in headers:
        codings = [c.strip().lower() for c in headers["Transfer-Encoding"].split(",")]
        if codings != ["chunked"]:
            raise HttpProtocolError(
                f"unsupported Transfer-Encoding {headers['Transfer-Encoding']!r}"
            )
        if "Content-Length" in headers:
            reusable = False  # RFC 9112 §6.1: framed by chunks, but never trusted again
        body, truncated = await _read_chunked(reader, max_body)
    elif "Content-Length" in headers:
        length = _content_length(headers["Content-Length"])
        body, truncated = await _read_length(reader, length, max_body)
    else:
        reusable = False  # the body ends when the connection does
        body, truncated = await _read_to_eof(reader, max_body)
    if truncated:
        reusable = False
    return Response(status, reason, headers, body, version, truncated), reusable


async def _readline(reader: asyncio.StreamReader, what: str) -> bytes:
    try:
        return await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        raise ServerDisconnected(
            f"the server closed the connection in the middle of {what}", midway=True
        ) from exc
    except ConnectionError as exc:
        raise ServerDisconnected(
            f"the server closed the connection in the middle of {what} ({exc})", midway=True
        ) from exc
    except asyncio.LimitOverrunError as exc:
        raise HttpProtocolError(f"a line of {what} longer than {MAX_LINE} bytes") from exc


def _status_line(line: bytes) -> tuple[str, int, str]:
    match = _STATUS_LINE.fullmatch(line.rstrip(b"\r\n"))
    if match is None:
        raise HttpProtocolError(f"not an HTTP/1.x status line: {line[:100]!r}")
    minor, status, reason = match.groups()
    if status.startswith(b"0"):
        raise HttpProtocolError(f"status {status.decode()} out of range: {line[:100]!r}")
    return f"HTTP/1.{minor.decode()}", int(status), (reason or b"").decode("latin-1").strip()


async def _read_fields(reader: asyncio.StreamReader, what: str) -> Headers:
    """Header (or trailer) fields up to the empty line that ends them."""
    fields: list[list[str]] = []
    lines = 0
    while True:
        raw = await _readline(reader, f"the {what}s")
        line = raw.rstrip(b"\r\n")
        if not line:
            return Headers((name, value) for name, value in fields)
        lines += 1  # folded lines too: they would grow a field without bound
        if lines > MAX_HEADERS:
            raise HttpProtocolError(f"more than {MAX_HEADERS} {what} fields")
        text = line.decode("latin-1")
        if "\r" in text or "\x00" in text:
            raise HttpProtocolError(f"a {what} line with a CR or NUL in it: {raw[:100]!r}")
        if text[0] in " \t":
            # Obsolete line folding (RFC 9112 §5.2): a client replaces it with a space.
            if not fields:
                raise HttpProtocolError(f"a folded {what} line with no field before it")
            fields[-1][1] += " " + text.strip(" \t")
            continue
        name, colon, value = text.partition(":")
        if not colon or not _TOKEN.fullmatch(name):
            raise HttpProtocolError(f"a malformed {what} line: {raw[:100]!r}")
        fields.append([name, value.strip(" \t")])


def _content_length(value: str) -> int:
    # "42, 42" (a field repeated by a proxy) is one length; "42, 43" is no length at all.
    values = {v.strip() for v in value.split(",")}
    if len(values) != 1 or not _DIGITS.fullmatch(length := values.pop()):
        raise HttpProtocolError(f"an invalid Content-Length {value!r}")
    return int(length)


async def _read_length(
    reader: asyncio.StreamReader, length: int, max_body: int
) -> tuple[bytes, bool]:
    """`length` bytes, of which at most `max_body` are read; whether some were left."""
    body = bytearray()
    want = min(length, max_body)
    while len(body) < want:
        try:
            chunk = await reader.read(min(want - len(body), 65536))
        except ConnectionError as exc:
            raise _cut_body(len(body), length) from exc
        if not chunk:
            raise _cut_body(len(body), length)
        body += chunk
    return bytes(body), length > max_body


def _cut_body(got: int, length: int) -> ServerDisconnected:
    return ServerDisconnected(
        f"the server closed the connection after {got} of {length} body bytes", midway=True
    )


async def _read_chunked(reader: asyncio.StreamReader, max_body: int) -> tuple[bytes, bool]:
    body = bytearray()
    while True:
        line = await _readline(reader, "a chunk size")
        # Chunk extensions (";name=value") carry nothing this client uses.
        size_text = line.split(b";", 1)[0].strip()
        if not _HEX.fullmatch(size_text):
            raise HttpProtocolError(f"an invalid chunk size line: {line[:100]!r}")
        size = int(size_text, 16)
        if size == 0:
            await _read_fields(reader, "trailer")
            return bytes(body), False
        if len(body) + size > max_body:
            # Keep what fits; the rest is never read and the connection is closed.
            rest, _ = await _read_length(reader, max_body - len(body), max_body)
            return bytes(body + rest), True
        try:
            data = await reader.readexactly(size + 1)
        except asyncio.IncompleteReadError as exc:
            raise ServerDisconnected(
                "the server closed the connection in the middle of a chunk", midway=True
            ) from exc
        except ConnectionError as exc:
            raise ServerDisconnected(
                f"the server closed the connection in the middle of a chunk ({exc})",
                midway=True,
            ) from exc
        body += memoryview(data)[:size]
        end = data[size:] + await _readline(reader, "a chunk")
        if end not in (b"\r\n", b"\n"):
            raise HttpProtocolError(f"a chunk longer than its size ({size} bytes)")


async def _read_to_eof(reader: asyncio.StreamReader, max_body: int) -> tuple[bytes, bool]:
    body = bytearray()
    while len(body) < max_body:
        try:
            chunk = await reader.read(min(max_body - len(body), 65536))
        except ConnectionError as exc:
            raise ServerDisconnected(
                f"the server reset the connection in the middle of the body ({exc})",
                midway=True,
            ) from exc
        if not chunk:
            return bytes(body), False
        body += chunk
    # As much as is kept was read: more than that is left unread if the server has it.
    return bytes(body), not reader.at_eof()


def _checked(headers: Mapping[str, str]) -> dict[str, str]:
    """`headers` if every name and value can be sent as they are; ValueError saying which
    cannot (a CR or LF in a value would let it write further fields: header injection)."""
    for name, value in headers.items():
        if not isinstance(name, str) or not _TOKEN.fullmatch(name):
            raise ValueError(f"header name {name!r} is not a valid HTTP field name")
        if name.lower() in _RESERVED:
            raise ValueError(f"header {name} is set by the client itself, not by the caller")
        if not isinstance(value, str) or _CTL.search(value):
            raise ValueError(
                f"header {name}: the value {value!r} has a control character (CR, LF, ...)"
            )
    return dict(headers)
