"""paho-mqtt 2.x driven by the asyncio event loop: the glue the MQTT input, the MQTT upstream
and the MQTT action share.

As in aiomqtt, only `connect()` (DNS, TCP and the TLS handshake block) runs in an executor
thread; once it returns the loop takes the socket over: `watch` registers it, paho's socket
callbacks (`SocketHooks`) keep the loop's registrations in step with what paho wants, and
`keep_alive` calls `loop_misc` for PINGREQs. No paho network thread exists, so paho is never
touched from two threads at once. What reads the socket, and what a lost connection means, stay
with each caller.

paho itself is imported only where a client is running: the MQTT action's module is imported
by every agent, and most configure no MQTT part (issue 7: paho costs about 1 MiB of RSS).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVarTuple

if TYPE_CHECKING:
    import paho.mqtt.client as mqtt
    from paho.mqtt.client import SocketLike

_Args = TypeVarTuple("_Args")


class SocketHooks:
    """paho's socket callbacks for a client whose socket the event loop watches.

    paho calls them from whichever thread touches the client: the executor thread during
    `connect()`, when the loop does not know the socket yet (`watch` registers what was queued
    then), the loop thread afterwards, and any thread that collects the client (its `__del__`
    closes the socket). They touch the loop only on the thread that made them, the loop's: make
    one per client, on the loop, and `install` it before `connect()`.
    """

    __slots__ = ("_thread",)

    def __init__(self) -> None:
        self._thread = threading.get_ident()

    def install(self, client: mqtt.Client) -> None:
        """Set the client's socket callbacks to these."""
        client.on_socket_close = self.on_socket_close
        client.on_socket_register_write = self.on_register_write
        client.on_socket_unregister_write = self.on_unregister_write

    def on_loop_thread(self) -> bool:
        """Whether paho calls from the event loop's thread (the one that made the hooks)."""
        return threading.get_ident() == self._thread

    # Each lets RuntimeError (no running loop) pass: paho calls them on the loop's thread
    # after the loop ended too, when a client is collected (Client.__del__ closes the socket).
    # Raised there, paho logged it as a callback's error and Python as one "ignored in
    # __del__" (the MQTT action's hooks once did so).

    def on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.on_loop_thread():
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                loop = asyncio.get_running_loop()
                loop.remove_reader(sock)
                loop.remove_writer(sock)

    def on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        # During connect() (executor thread) `watch` registers what is queued afterwards.
        if self.on_loop_thread() and sock.fileno() != -1:
            with contextlib.suppress(RuntimeError):
                asyncio.get_running_loop().add_writer(sock, client.loop_write)

    def on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self.on_loop_thread():
            with contextlib.suppress(ValueError, OSError, RuntimeError):
                asyncio.get_running_loop().remove_writer(sock)


def watch(
    client: mqtt.Client,
    sock: SocketLike,
    read: Callable[[*_Args], object],
    *args: *_Args,
) -> None:
    """Once `connect()` returned: have the running loop call `read(*args)` whenever `sock` is
    readable, and paho's `loop_write` now if paho has output queued (the CONNECT, queued in the
    executor thread, where the hooks do not register it); the hooks keep the writer after.

    `read` is the caller's own: it runs for every wake-up of the socket.
    """
    loop = asyncio.get_running_loop()
    loop.add_reader(sock, read, *args)
    if client.want_write():
        loop.add_writer(sock, client.loop_write)


async def keep_alive(client: mqtt.Client, tick: float) -> None:
    """Call paho's `loop_misc` every `tick` seconds, as its network thread would: it sends a
    PINGREQ when the connection has been quiet for the keepalive, and closes a connection whose
    broker answered none in time (calling `on_disconnect`). Returns once the connection is
    gone; cancel it to stop before."""
    import paho.mqtt.client as mqtt  # deferred: see the module docstring

    while client.loop_misc() == mqtt.MQTT_ERR_SUCCESS:  # noqa: ASYNC110 (close cancels it)
        await asyncio.sleep(tick)


def close_socket(client: mqtt.Client) -> None:
    """Unregister and close the client's socket when paho has not closed it itself (a connect
    given up on, a DISCONNECT that could not be sent); nothing when it has."""
    sock = client.socket()
    if sock is None:
        return
    # RuntimeError: no running loop, so never registered; ValueError: closed already.
    with contextlib.suppress(RuntimeError, ValueError):
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock)
        loop.remove_writer(sock)
    with contextlib.suppress(OSError):
        sock.close()
