"""The client's byte stream, between the socket and the units.

Owns (as a part of ClientSession): framing the client's bytes a batch of messages at a
time, holding the bytes that wait (for a route, for the units in flight, for a cutover's
pause), gathering a message that arrives in pieces, passing a long CopyData (or the rest of
a long Bind, proxy.session.forward) through as it arrives, dropping a group after an error
the proxy answered, and the session's lifecycle
`State`.
Must not know: routing, SQL, the process.
"""

from __future__ import annotations

import enum

from proxy import wire
from proxy.errors import ProtocolViolation
from proxy.session.units import FRAME_BATCH

CLIENT_TYPES = wire.FRONTEND_TYPES
STASH_PAUSE = 4 << 20  # stop reading the client while this much waits for a route
GATHER_MIN = 64 << 10  # a message still missing more than this is gathered in pieces


class State(enum.Enum):
    HANDSHAKE = "handshake"
    READY = "ready"
    CONSOLE = "console"  # an admin console session (proxy.admin.console): its input goes to the inbox
    CLOSED = "closed"


_READY = State.READY


class ByteStream:
    """Part of ClientSession (proxy.session.client), which holds the fields."""

    def _pass_long(self, data: bytes) -> bytes:
        """Forward the rest of a long client message (CopyData) already partly sent."""
        n = min(self._skip, len(data))
        server = self.server
        if server is not None and server is self._skip_to and not server.closed:
            server.pass_through(data[:n] if n < len(data) else data)
        # (else the connection that has the message's head is gone: the rest is dropped)
        self._skip -= n
        return data[n:]

    def _process(self, buf: bytes) -> None:
        """Route new units and forward messages, until the bytes run out or must wait.

        The bytes are framed once, a batch of messages at a time, and every step below
        walks the frames by index: the work per message stays constant however many
        messages the client pipelined (re-framing the rest after each unit made a long
        pipeline cost the square of its length)."""
        pos = 0
        n = len(buf)
        while pos < n and self.state is _READY and self._routing is None:
            try:
                frames, complete = wire.split_messages(buf, pos, valid_types=CLIENT_TYPES, limit=FRAME_BATCH)
            except wire.ProtocolViolation as exc:
                self.fail(ProtocolViolation(str(exc)))
                return
            if not frames:
                if (self.server is not None and self._stream_long(buf, pos)) or self._stream_bind(buf, pos):
                    return
                break
            i = self._walk(buf, frames)
            if i < len(frames):
                pos = frames[i][1]
                break
            pos = complete
        if pos < n and self.state is _READY:
            self._hold(buf, pos)

    def _hold(self, buf: bytes, pos: int) -> None:
        """Keep the bytes from `pos` until they can go on. A message that has not fully
        arrived is gathered in pieces (`_gather`: linear in its size, and reading goes on
        until it is whole); complete messages that wait for a route or for the units in
        flight stop the reading once they pass STASH_PAUSE."""
        rest = buf[pos:] if pos else buf
        n = len(rest)
        missing = 1 + wire.header_length(rest, 0) - n if n >= 5 else 0  # of its first message
        self._stash = rest
        if missing > GATHER_MIN:
            self._parts = [rest]
            self._missing = missing
        elif n > STASH_PAUSE and missing <= 0:
            self.pause_reading("stash")

    def _gather(self, data: bytes) -> bytes | None:
        """More of a message that has not fully arrived; the whole of what is held once it
        has (None until then)."""
        self._parts.append(data)
        self._missing -= len(data)
        if self._missing > 0:
            return None
        data = b"".join(self._parts)
        self._parts = []
        self._missing = 0
        self._stash = b""
        return data

    def _requeue(self, data: bytes) -> None:
        """A unit to run again, ahead of the bytes that wait."""
        if self._missing:
            self._parts[0] = data + self._parts[0]
        self._stash = data + self._stash

    def _skip_group(self, frames: list, i: int) -> int:
        """After an error the proxy answered for a group still arriving: drop messages up
        to its Sync, then answer that Sync, as a server skips after an error. An error
        kept for the group's next message (its server was lost while the client waited
        for nothing) goes first."""
        if self._group_error is not None:
            self.transport.write(self._group_error)
            self._group_error = None
        for j in range(i, len(frames)):
            if frames[j][0] == wire.F_SYNC:
                self._skip_to_sync = False
                self.transport.write(wire.ready_for_query(self.tx.status))
                return j + 1
        return len(frames)

    def _stream_long(self, buf: bytes, pos: int) -> bool:
        """A CopyData too large to wait for whole is passed through as it arrives."""
        if len(buf) - pos < 5 or buf[pos] != wire.F_COPY_DATA:
            return False
        length = wire.header_length(buf, pos)
        if length < 64 * 1024:
            return False
        self.server.send(buf[pos:] if pos else buf)
        self._skip = 1 + length - (len(buf) - pos)
        self._skip_to = self.server
        return True

    def resume(self) -> None:
        """Bytes held while a route was chosen or units drained: process them now."""
        if self._routing is not None or self.state is not _READY:
            return
        if self._pause_reasons:
            self.resume_reading("stash")
        if self._stash and not self._missing:
            data, self._stash = self._stash, b""
            self._process(data)
