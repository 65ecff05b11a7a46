"""The upstream's HTTP/1.1 client against real local servers: raw-socket servers scripted per
test (for what a well-behaved framework would never send), TLS with certificates made by
trustme, and the promise it exists for: importing the HTTP upstream leaves aiohttp out."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import ssl
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.httpclient import (
    MAX_HEADERS,
    MAX_LINE,
    CannotConnect,
    HttpClient,
    HttpProtocolError,
    Response,
    ServerDisconnected,
)
from agent.upstream import describe_tls_error
from tests.conftest import eventually, free_port, make_pki

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@dataclass
class Request:
    """A request as the server read it."""

    line: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k.lower() == name.lower()]
        assert len(values) <= 1, f"{name} sent {len(values)} times"
        return values[0] if values else None


@dataclass
class Conn:
    """One accepted connection, handed to the test's script."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    number: int
    server: RawServer

    async def request(self) -> Request | None:
        """The next request on this connection (framed by Content-Length); None at EOF."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
        line, *fields = head[:-4].decode("latin-1").split("\r\n")
        headers = [(k, v.strip()) for k, _, v in (f.partition(":") for f in fields)]
        length = int(dict((k.lower(), v) for k, v in headers).get("content-length", "0"))
        request = Request(line, headers, await self.reader.readexactly(length))
        self.server.requests.append(request)
        return request

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


Script = Callable[[Conn], Awaitable[None]]


@dataclass
class RawServer:
    """`asyncio.start_server` on a free loopback port; every connection runs `script`. It
    counts the connections accepted and keeps the requests read; a script that raises fails
    the test when the block ends."""

    script: Script
    ssl_context: ssl.SSLContext | None = None
    host: str = "127.0.0.1"
    path: str = "/ingest"
    accepts: int = 0
    requests: list[Request] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    url: str = ""
    _server: asyncio.Server | None = None
    _tasks: set[asyncio.Task[None]] = field(default_factory=set)
    _writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def __aenter__(self) -> RawServer:
        self._server = await asyncio.start_server(self._accept, self.host, 0, ssl=self.ssl_context)
        port = self._server.sockets[0].getsockname()[1]
        host = f"[{self.host}]" if ":" in self.host else self.host
        scheme = "https" if self.ssl_context else "http"
        self.url = f"{scheme}://{host}:{port}{self.path}"
        return self

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
        if exc_type is None and self.errors:
            raise self.errors[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepts += 1
        self._writers.append(writer)
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self.script(Conn(reader, writer, self.accepts, self))
        except (ConnectionError, asyncio.CancelledError):
            pass  # the client went away: that is what some tests do
        except Exception as exc:
            self.errors.append(exc)
        finally:
            writer.transport.abort()
            self._tasks.discard(task)


def answering(*answers: bytes) -> Script:
    """A script answering each request with the next of `answers` (the last one repeats),
    counted across the connections it runs on."""
    n = 0

    async def script(conn: Conn) -> None:
        nonlocal n
        while await conn.request() is not None:
            answer = answers[min(n, len(answers) - 1)]
            n += 1
            await conn.send(answer)

    return script


async def post_once(answer: bytes) -> Response:
    async with (
        RawServer(answering(answer)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        return await client.post(b"{}")


# --------------------------------------------------------------------------- the request


async def test_the_request_on_the_wire() -> None:
    async with (
        RawServer(answering(OK)) as server,
        HttpClient(
            server.url + "?tenant=a b",
            timeout=5,
            headers={"User-Agent": "edge-agent/t", "X-Device": "pi-1", "content-type": "a/b"},
        ) as client,
    ):
        response = await client.post(b'{"x":1}', {"Content-Type": "application/json"})
    assert (response.status, response.reason, response.body) == (200, "OK", b"ok")
    (request,) = server.requests
    port = server.url.split(":")[2].split("/")[0]
    assert request.line == "POST /ingest?tenant=a%20b HTTP/1.1"
    assert request.headers[0] == ("Host", f"127.0.0.1:{port}")
    assert request.header("User-Agent") == "edge-agent/t"
    assert request.header("X-Device") == "pi-1"
    # The request's own header replaced the client's one of the same name, whatever its case.
    assert request.header("Content-Type") == "application/json"
    assert request.header("Content-Length") == "7"
    assert request.header("Expect") is None and request.header("Transfer-Encoding") is None
    assert request.body == b'{"x":1}'


@pytest.mark.parametrize(
    ("url", "authority"),
    [
        ("http://example.com/i", "example.com"),
        ("http://example.com:80/i", "example.com"),
        ("https://example.com:443/i", "example.com"),
        ("https://example.com:8443/i", "example.com:8443"),
        ("http://[::1]:8080/i", "[::1]:8080"),
        ("https://[fe80::1]/i", "[fe80::1]"),
    ],
)
def test_the_host_field_names_the_port_only_when_it_is_not_the_default(
    url: str, authority: str
) -> None:
    assert HttpClient(url, timeout=1).authority == authority


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Evil": "a\r\nX-Admin: yes"}, "control character"),
        ({"X-Evil": "a\nb"}, "control character"),
        ({"X-Evil": "a\x00b"}, "control character"),
        ({"X-Evil": "a\x1bb"}, "control character"),
        ({"X Evil": "a"}, "not a valid HTTP field name"),
        ({"X-Evil:": "a"}, "not a valid HTTP field name"),
        ({"": "a"}, "not a valid HTTP field name"),
        ({"Content-Length": "5"}, "set by the client itself"),
        ({"Transfer-Encoding": "chunked"}, "set by the client itself"),
        ({"Expect": "100-continue"}, "set by the client itself"),
    ],
)
async def test_header_injection_is_refused_before_anything_is_sent(
    headers: dict[str, str], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        HttpClient("http://127.0.0.1:1/i", timeout=1, headers=headers)
    async with RawServer(answering(OK)) as server, HttpClient(server.url, timeout=5) as client:
        with pytest.raises(ValueError, match=message):
            await client.post(b"{}", headers)
    assert server.accepts == 0


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://h/x", "scheme must be http or https"),
        ("http:///x", "names no host"),
        ("http://h:99999/x", "out of range"),
    ],
)
def test_urls_it_cannot_use_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        HttpClient(url, timeout=1)


async def test_credentials_in_the_url_become_basic_auth() -> None:
    async with RawServer(answering(OK)) as server:
        url = server.url.replace("http://", "http://dev%40x:s3cret@")
        async with HttpClient(url, timeout=5) as client:
            await client.post(b"{}")
    assert server.requests[0].header("Authorization") == "Basic ZGV2QHg6czNjcmV0"


# --------------------------------------------------------------------------- answers


async def test_content_length_and_case_insensitive_headers() -> None:
    response = await post_once(
        b"HTTP/1.1 429 Too Many Requests\r\nretry-AFTER: 3\r\nX-A: 1\r\nx-a: 2\r\n"
        b"Content-Type: text/plain; charset=latin-1\r\nContent-Length: 4\r\n\r\ncaf\xe9"
    )
    assert (response.status, response.reason) == (429, "Too Many Requests")
    assert response.headers["Retry-After"] == response.headers.get("retry-after") == "3"
    assert response.headers["X-A"] == "1, 2"
    assert "CONTENT-LENGTH" in response.headers and "Nope" not in response.headers
    assert response.text() == "café"


async def test_text_replaces_what_it_cannot_decode() -> None:
    response = await post_once(b"HTTP/1.1 500 \r\nContent-Length: 3\r\n\r\nx\xff\xfe")
    assert (response.status, response.reason) == (500, "")
    assert response.text() == "x\ufffd\ufffd"
    response = await post_once(
        b"HTTP/1.1 500 X\r\nContent-Type: text/plain; charset=klingon\r\n"
        b"Content-Length: 2\r\n\r\nhi"
    )
    assert response.text() == "hi"


async def test_chunked_with_extensions_and_trailers_then_reuse() -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b'1;a;b="c"\r\n \r\n'
        b"00005\r\nworld\r\n"
        b"0;last\r\nX-Checksum: abc\r\nX-Other: 1\r\n\r\n"
    )
    async with (
        RawServer(answering(chunked, OK)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        first = await client.post(b"1")
        second = await client.post(b"2")
    assert first.body == b"hello world"
    assert second.body == b"ok"
    assert server.accepts == 1, "the trailers were read to the end: the connection was reused"


async def test_a_body_read_until_the_server_closes() -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        conn.writer.close()

    async with RawServer(script) as server, HttpClient(server.url, timeout=5) as client:
        response = await client.post(b"{}")
        await client.post(b"{}")
    assert response.body == b"until the end"
    assert server.accepts == 2, "a body framed by the close: the connection is not reused"


async def test_interim_answers_are_skipped() -> None:
    answer = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n"
    )
    async with (
        RawServer(answering(answer)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        first = await client.post(b"{}")
        second = await client.post(b"{}")
    assert (first.status, second.status, first.body) == (201, 201, b"")
    assert "Link" not in first.headers
    assert server.accepts == 1


async def test_no_content_has_no_body_whatever_it_says() -> None:
    # A 204 with a Content-Length (wrong, and seen in the wild): the next answer is not eaten.
    async with (
        RawServer(answering(b"HTTP/1.1 204 No Content\r\nContent-Length: 2\r\n\r\n", OK)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        first = await client.post(b"{}")
        second = await client.post(b"{}")
    assert (first.status, first.body) == (204, b"")
    assert (second.status, second.body) == (200, b"ok")


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nConnection: Keep-Alive, CLOSE\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", True),
    ],
)
async def test_keep_alive_reuses_one_connection_unless_told_to_close(
    answer: bytes, reused: bool
) -> None:
    # The server would keep every connection open: only the client decides here.
    async with (
        RawServer(answering(answer)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        for _ in range(3):
            assert (await client.post(b"{}")).body == b"ok"
    assert server.accepts == (1 if reused else 3)
    assert client.connections == server.accepts


async def test_a_large_body_is_cut_and_its_connection_not_reused() -> None:
    big = b"x" * 100_000
    answers = [
        b"HTTP/1.1 500 E\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
        b"HTTP/1.1 500 E\r\nTransfer-Encoding: chunked\r\n\r\n%x\r\n%s\r\n0\r\n\r\n"
        % (len(big), big),
        b"HTTP/1.1 500 E\r\n\r\n" + big,
    ]
    for answer in answers:
        async with (
            RawServer(answering(answer)) as server,
            HttpClient(server.url, timeout=5, max_body=1000) as client,
        ):
            first = await client.post(b"{}")
            second = await client.post(b"{}")
        assert (first.body, first.truncated) == (b"x" * 1000, True)
        assert second.body == b"x" * 1000
        assert server.accepts == 2


# --------------------------------------------------------------------------- closed, hung


async def test_an_idle_connection_the_server_closed_is_replaced_transparently() -> None:
    closed = asyncio.Event()

    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK)
        if conn.number == 1:
            conn.writer.close()  # its keep-alive timeout, say
            closed.set()
            return
        await answering(OK)(conn)

    async with RawServer(script) as server, HttpClient(server.url, timeout=5) as client:
        await client.post(b"1")
        await closed.wait()
        assert (await client.post(b"2")).status == 200
    assert server.accepts == 2


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_a_reused_connection_closed_before_any_answer_is_retried_once(how: str) -> None:
    """The race the idle check cannot see: the server closes just as the request arrives."""

    async def script(conn: Conn) -> None:
        if conn.number == 1:
            await conn.request()
            await conn.send(OK)
            await conn.request()
            conn.reset() if how == "reset" else conn.writer.close()
            return
        await answering(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh")(conn)

    async with RawServer(script) as server, HttpClient(server.url, timeout=5) as client:
        await client.post(b"1")
        response = await client.post(b"2")
    assert response.body == b"fresh"
    assert server.accepts == 2
    assert [r.body for r in server.requests] == [b"1", b"2", b"2"]


async def test_a_fresh_connection_closed_without_an_answer_is_an_error() -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        conn.writer.close()

    async with RawServer(script) as server, HttpClient(server.url, timeout=5) as client:
        with pytest.raises(ServerDisconnected, match="without an answer") as err:
            await client.post(b"{}")
    assert not err.value.midway
    assert server.accepts == 1, "a fresh connection is not retried"


@pytest.mark.parametrize(
    "partial",
    [
        b"HTTP/1.1 200 OK\r\nContent-Le",
        b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab",
        b"HTTP/1",
    ],
)
async def test_a_server_closing_mid_answer_is_a_disconnect_even_on_reuse(partial: bytes) -> None:
    async def script(conn: Conn) -> None:
        await conn.request()
        await conn.send(OK)
        await conn.request()
        await conn.send(partial)
        conn.writer.close()

    async with RawServer(script) as server, HttpClient(server.url, timeout=5) as client:
        await client.post(b"1")
        with pytest.raises(ServerDisconnected) as err:
            await client.post(b"2")
    assert err.value.midway
    assert server.accepts == 1, "part of an answer came: not retried"


async def test_a_server_that_never_answers_times_out_and_its_connection_is_dropped() -> None:
    async def script(conn: Conn) -> None:
        if conn.number == 1:
            await conn.request()
            await asyncio.Event().wait()  # hung
        await answering(OK)(conn)

    async with RawServer(script) as server, HttpClient(server.url, timeout=0.3) as client:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await client.post(b"{}")
        assert 0.29 <= time.monotonic() - t0 < 1.5
        assert (await client.post(b"{}")).status == 200
    assert server.accepts == 2


async def test_a_cancelled_request_leaves_no_connection_behind() -> None:
    async def script(conn: Conn) -> None:
        if conn.number == 1:
            await conn.request()
            await asyncio.Event().wait()
        await answering(OK)(conn)

    async with RawServer(script) as server, HttpClient(server.url, timeout=30) as client:
        post = asyncio.create_task(client.post(b"{}"))
        await eventually(lambda: len(server.requests) == 1, what="the request")
        post.cancel()
        with pytest.raises(asyncio.CancelledError):
            await post
        assert (await client.post(b"{}")).status == 200
    assert server.accepts == 2


async def test_nothing_listening_is_cannot_connect() -> None:
    port = free_port()
    async with HttpClient(f"http://127.0.0.1:{port}/i", timeout=5) as client:
        with pytest.raises(CannotConnect, match=f"cannot connect to 127.0.0.1:{port}: Connect"):
            await client.post(b"{}")


async def test_requests_from_several_tasks_take_turns_on_the_one_connection() -> None:
    async with (
        RawServer(answering(OK)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        answers = await asyncio.gather(*(client.post(b"%d" % i) for i in range(10)))
    assert {a.status for a in answers} == {200}
    assert server.accepts == 1 and len(server.requests) == 10


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"HTTP/2 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"ICY 200 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 2000 OK\r\n\r\n", "not an HTTP/1.x status line"),
        (b"HTTP/1.1 099 Low\r\n\r\n", "out of range"),
        (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "101 Switching Protocols"),
        (b"HTTP/1.1 200 OK\r\nNo colon here\r\n\r\n", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\nBad Name: x\r\n\r\n", "a malformed header line"),
        (b"HTTP/1.1 200 OK\r\n folded: first\r\n\r\n", "no field before it"),
        (b"HTTP/1.1 200 OK\r\nX: a\rb\r\n\r\n", "CR or NUL"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: abc\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2, 3\r\n\r\nok", "invalid Content-Length"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", "Transfer-Encoding"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", "invalid chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0x2\r\nok\r\n", "chunk size"),
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1\r\nok\r\n", "longer than its"),
        (b"HTTP/1.1 200 OK\r\n" + b"X-Big: " + b"x" * MAX_LINE + b"\r\n\r\n", "longer than"),
        (b"HTTP/1.1 200 " + b"x" * MAX_LINE + b"\r\n\r\n", "status line longer than"),
        (
            b"HTTP/1.1 200 OK\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n",
            f"more than {MAX_HEADERS} header fields",
        ),
        (
            b"HTTP/1.1 200 OK\r\nX: 1\r\n" + b" more\r\n" * MAX_HEADERS + b"\r\n",
            f"more than {MAX_HEADERS} header fields",
        ),
        (
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n"
            + b"X: 1\r\n" * (MAX_HEADERS + 1),
            f"more than {MAX_HEADERS} trailer fields",
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\n" * 20, "interim (1xx) answers"),
    ],
)
async def test_a_malformed_answer_says_what_is_wrong(answer: bytes, message: str) -> None:
    async with (
        RawServer(answering(answer, OK)) as server,
        HttpClient(server.url, timeout=5) as client,
    ):
        with pytest.raises(HttpProtocolError, match=re.escape(message)):
            await client.post(b"{}")
        # The connection it came on is not trusted again.
        assert (await client.post(b"{}")).body == b"ok"
    assert server.accepts == 2


async def test_lenient_where_the_rfc_allows_it() -> None:
    """Bare LF line ends, folded fields, a repeated equal Content-Length, blank lines before
    the status line, no reason phrase."""
    answer = b"\r\nHTTP/1.1 200\nX-Folded: one\n\t two\nContent-Length: 2, 2\nX-Empty:\n\nok"
    response = await post_once(answer)
    assert (response.status, response.reason, response.body) == (200, "", b"ok")
    assert response.headers["X-Folded"] == "one two"
    assert response.headers["X-Empty"] == ""


# --------------------------------------------------------------------------- TLS


@dataclass
class Pki:
    ca_file: Path
    other_ca_file: Path
    servers: dict[str, ssl.SSLContext]
    client_cert: tuple[Path, Path]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A CA of the test's own (trustme) and server contexts: good, for another host name,
    expired, and good but wanting a client certificate."""
    certs = make_pki(tmp_path_factory.mktemp("httpclient-pki"))
    servers = {
        "good": certs.server_context("127.0.0.1", "::1", "localhost"),
        "wrong-name": certs.server_context("other.example"),
        "expired": certs.server_context("127.0.0.1", expired=True),
        "client-cert": certs.server_context("127.0.0.1", client_cert=True),
    }
    return Pki(certs.ca_file, certs.other_ca_file, servers, (certs.cert_file, certs.key_file))


def client_context(ca_file: Path, cert: tuple[Path, Path] | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(ca_file))
    if cert:
        ctx.load_cert_chain(*map(str, cert))
    return ctx


async def test_https_verified_and_kept_alive(pki: Pki) -> None:
    async with (
        RawServer(answering(OK), ssl_context=pki.servers["good"]) as server,
        HttpClient(server.url, ssl_context=client_context(pki.ca_file), timeout=5) as client,
    ):
        for _ in range(3):
            assert (await client.post(b"{}")).body == b"ok"
    assert server.accepts == 1


@pytest.mark.parametrize(
    ("server_cert", "ca", "verify_code", "hint"),
    [
        ("good", "other", 20, "is ca_file the CA that signed"),  # no local issuer
        ("wrong-name", "ca", 64, "does not name the host of the url"),  # IP address mismatch
        ("expired", "ca", 10, "out of date"),
    ],
)
async def test_https_refuses_what_it_cannot_trust(
    pki: Pki, server_cert: str, ca: str, verify_code: int, hint: str
) -> None:
    ca_file = pki.ca_file if ca == "ca" else pki.other_ca_file
    async with (
        RawServer(answering(OK), ssl_context=pki.servers[server_cert]) as server,
        HttpClient(server.url, ssl_context=client_context(ca_file), timeout=5) as client,
    ):
        with pytest.raises(ssl.SSLCertVerificationError) as err:
            await client.post(b"{}")
    assert err.value.verify_code == verify_code
    assert hint in (describe_tls_error(err.value) or "")
    assert not server.requests


async def test_https_a_wrong_host_name_is_refused(pki: Pki) -> None:
    async with RawServer(answering(OK), ssl_context=pki.servers["wrong-name"]) as server:
        url = server.url.replace("127.0.0.1", "localhost")
        async with HttpClient(url, ssl_context=client_context(pki.ca_file), timeout=5) as client:
            with pytest.raises(ssl.SSLCertVerificationError) as err:
                await client.post(b"{}")
    assert err.value.verify_code == 62  # X509_V_ERR_HOSTNAME_MISMATCH


async def test_https_a_client_certificate(pki: Pki) -> None:
    async with RawServer(answering(OK), ssl_context=pki.servers["client-cert"]) as server:
        with_cert = client_context(pki.ca_file, pki.client_cert)
        async with HttpClient(server.url, ssl_context=with_cert, timeout=5) as client:
            assert (await client.post(b"{}")).status == 200
        # TLS 1.3: without one, the server cuts the connection after the handshake.
        async with HttpClient(
            server.url, ssl_context=client_context(pki.ca_file), timeout=5
        ) as client:
            with pytest.raises((ServerDisconnected, ssl.SSLError)):
                await client.post(b"{}")


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback here")
async def test_an_ipv6_literal_host_over_tls(pki: Pki) -> None:
    async with (
        RawServer(answering(OK), ssl_context=pki.servers["good"], host="::1") as server,
        HttpClient(server.url, ssl_context=client_context(pki.ca_file), timeout=5) as client,
    ):
        assert (await client.post(b"{}")).status == 200
    assert server.requests[0].header("Host") == server.url.split("/")[2]


def test_an_http_url_takes_no_tls_context(pki: Pki) -> None:
    with pytest.raises(ValueError, match="TLS context is for https"):
        HttpClient("http://h/i", ssl_context=client_context(pki.ca_file), timeout=1)


# --------------------------------------------------------------------------- memory


def test_importing_the_http_upstream_leaves_aiohttp_out() -> None:
    """Issue 7: aiohttp's client costs the agent about 9 MiB for its whole life."""
    probe = (
        "import json, sys, agent.upstream_http\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('aiohttp', 'yarl', 'multidict', 'agent'))))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    modules = json.loads(out.stdout)
    assert "agent.httpclient" in modules, "the probe sees what was imported"
    assert [m for m in modules if not m.startswith("agent")] == []


async def test_an_answer_before_the_body_was_read_is_taken() -> None:
    """A server that refuses on the head alone (413) and never reads the body: the answer
    comes through instead of a send blocked until the timeout."""

    async def script(conn: Conn) -> None:
        if conn.number == 1:
            await conn.reader.readuntil(b"\r\n\r\n")
            await conn.send(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\n\r\nbig")
            await asyncio.Event().wait()  # reads nothing more, keeps the connection open
        await answering(OK)(conn)

    async with RawServer(script) as server, HttpClient(server.url, timeout=5) as client:
        response = await client.post(b"x" * (32 * 1024 * 1024))
        assert (response.status, response.body) == (413, b"big")
        assert (await client.post(b"{}")).status == 200
    assert server.accepts == 2, "half a body was left unsent: the connection is not reused"


def test_a_password_in_the_url_is_not_repeated_in_errors() -> None:
    with pytest.raises(ValueError) as err:
        HttpClient("http://dev:s3cret@h:99999/x", timeout=1)
    assert "s3cret" not in str(err.value) and "dev:***@h" in str(err.value)
    assert "s3cret" not in HttpClient("http://dev:s3cret@h/x", timeout=1).url
