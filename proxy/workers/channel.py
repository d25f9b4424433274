"""The control channel between the supervisor and one worker: requests both ways over a
Unix socket pair, each answered once, each with a deadline.

Owns: the framing (a 4-byte length, then a pickled tuple), request ids, the futures of
requests in flight and their deadlines, and the end of the channel (every request in
flight fails with ChannelClosed). Both ends are processes of one pgsplit started by the
same user from the same installation, so pickle is the right codec: it carries the
Topology snapshots and the Config as they are.
Must not know: what the operations mean (the handlers passed in do).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import pickle
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

log = logging.getLogger("pgsplit.workers")

_HEADER = struct.Struct("!I")
MAX_FRAME = 64 * 1024 * 1024  # a metrics snapshot or a Config is far smaller; more is a bug

Handler = Callable[..., Awaitable[Any] | Any]


class ChannelClosed(ConnectionError):
    """The other end went away (or this end was closed) before answering."""


class RemoteError(RuntimeError):
    """The other end's handler raised; the message is its exception's text."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


def frame(message: tuple) -> bytes:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class Channel:
    """One end. `request` asks the other end and waits (at most `timeout` seconds);
    `notify` asks without waiting for the answer; the handlers answer the other end."""

    def __init__(self, sock: socket.socket, handlers: Mapping[str, Handler], *, name: str):
        self.name = name  # for log lines: "worker 1", "supervisor"
        self._sock = sock
        self._handlers = handlers
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task | None = None
        self._handling: set[asyncio.Task] = set()
        self.closed = asyncio.Event()

    async def start(self) -> None:
        self._reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
        self._task = asyncio.get_running_loop().create_task(self._read_loop(), name=f"pgsplit-channel-{self.name}")

    @property
    def is_open(self) -> bool:
        """False as soon as the transport is closing (the other end died and a write or a
        read found out), not only once the read loop has seen the end."""
        if self._writer is None or self.closed.is_set():
            return False
        if self._writer.transport.is_closing():
            self._close()
            return False
        return True

    async def request(self, op: str, *args: Any, timeout: float) -> Any:
        if not self.is_open:
            raise ChannelClosed(f"{self.name}: the control channel is closed")
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._waiting[request_id] = future
        try:
            if not self._send(("req", request_id, op, args)):
                raise ChannelClosed(f"{self.name}: the control channel is closed")
            async with asyncio.timeout(timeout):
                return await future
        except TimeoutError:
            raise TimeoutError(f"{self.name} did not answer {op!r} within {timeout:g} s") from None
        finally:
            self._waiting.pop(request_id, None)

    def notify(self, op: str, *args: Any) -> bool:
        """Send without an answer (in order with every other message of this end); False
        when the channel is closed (never raises: a fan-out goes on to the next worker)."""
        return self._send(("req", 0, op, args))

    def _send(self, message: tuple) -> bool:
        if not self.is_open:
            return False
        try:
            self._writer.write(frame(message))
        except (RuntimeError, OSError):  # (the transport closed under us)
            self._close()
            return False
        return True

    async def _read_loop(self) -> None:
        assert self._reader is not None
        try:
            while True:
                header = await self._reader.readexactly(_HEADER.size)
                (length,) = _HEADER.unpack(header)
                if length > MAX_FRAME:
                    raise ValueError(f"a control message of {length} bytes")
                message = pickle.loads(await self._reader.readexactly(length))
                self._dispatch(message)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001  a broken channel ends; the supervisor restarts the worker
            log.exception("%s: control channel broken", self.name)
        finally:
            self._close()

    def _dispatch(self, message: tuple) -> None:
        kind, request_id = message[0], message[1]
        if kind == "req":
            task = asyncio.get_running_loop().create_task(self._answer(request_id, message[2], message[3]))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)
            return
        future = self._waiting.get(request_id)
        if future is None or future.done():
            return  # (answered after its deadline)
        if kind == "ok":
            future.set_result(message[2])
        else:
            future.set_exception(RemoteError(message[2], message[3]))

    async def _answer(self, request_id: int, op: str, args: tuple) -> None:
        try:
            handler = self._handlers[op]
            result = handler(*args)
            if asyncio.iscoroutine(result) or isinstance(result, asyncio.Future):
                result = await result
            reply = ("ok", request_id, result)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001  the asker gets it as RemoteError
            if request_id == 0:
                log.warning("%s: %s failed: %s", self.name, op, exc)
            reply = ("err", request_id, type(exc).__name__, str(exc))
        if request_id:
            self._send(reply)

    def _close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        for future in self._waiting.values():
            if not future.done():
                future.set_exception(ChannelClosed(f"{self.name} went away"))
        if self._writer is not None:
            self._writer.close()

    async def aclose(self) -> None:
        self._close()
        for task in list(self._handling):
            task.cancel()
        if self._task is not None and self._task is not asyncio.current_task():
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
