"""Accepting clients: SSLRequest/GSSENCRequest, CancelRequest, the startup packet and the
SCRAM-SHA-256 exchange, up to the first ReadyForQuery.

Owns: everything a client sends before it is authenticated. No byte of it reaches a
backend: only after SCRAM succeeds does the proxy borrow a server connection (to learn the
parameter set and apply the client's startup settings). A client asking for the admin
console's database ([admin] console_database, while [admin] console_users is not empty)
must be in console_users (refused after [[access]] and the password otherwise, so that
who is an admin is not told to anyone else); once authenticated it is answered by the console
(proxy.admin.console, through the host) and never reaches a backend. Must not know:
units, routing, the console's commands.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shlex
import ssl
from typing import Protocol

from proxy import wire
from proxy.auth import SCRAM
from proxy.errors import (
    FeatureNotSupported, InvalidAuthorization, ProtocolViolation, ProxyError, QueryCanceled, TooManyConnections,
)
from proxy.auth import ScramExchange, Verifiers
from proxy.scram import Verifier
from proxy.session.client import ClientSession
from proxy.session.host import SessionHost
from proxy.session.stream import State

log = logging.getLogger("pgsplit.listener")

MAX_AUTH_MESSAGE = 10000


class Inbox:
    """Bytes a client sent during the handshake, read as packets or messages."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.closed = False
        self._waiter: asyncio.Future | None = None

    def feed(self, data: bytes) -> None:
        self.buf += data
        self._wake()

    def close(self) -> None:
        self.closed = True
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)

    async def _more(self) -> None:
        if self.closed:
            raise EOFError
        self._waiter = asyncio.get_running_loop().create_future()
        await self._waiter
        self._waiter = None

    async def packet(self) -> wire.StartupPacket:
        while True:
            try:
                packet, used = wire.read_startup_packet(self.buf)
            except wire.UnsupportedProtocol as exc:
                raise FeatureNotSupported(str(exc)) from None
            except wire.ProtocolViolation as exc:
                raise ProtocolViolation(str(exc)) from None
            if packet is not None:
                del self.buf[:used]
                return packet
            await self._more()

    async def message(self, limit: int = MAX_AUTH_MESSAGE, during: str = "during authentication") -> tuple[int, bytes]:
        while True:
            if len(self.buf) >= 5:
                length = wire.header_length(self.buf, 0)
                if length < 4 or length > limit:
                    raise ProtocolViolation(f"invalid message length {length} {during}")
                if len(self.buf) >= 1 + length:
                    t = self.buf[0]
                    body = bytes(self.buf[5 : 1 + length])
                    del self.buf[: 1 + length]
                    return t, body
            await self._more()

    def rest(self) -> bytes:
        rest = bytes(self.buf)
        self.buf.clear()
        return rest


def parse_options(options: str) -> dict[str, str]:
    """The startup parameter `options`: "-c name=value" / "--name=value" pairs."""
    out: dict[str, str] = {}
    try:
        words = shlex.split(options.replace("\\ ", "\0"), posix=True)
    except ValueError as exc:
        raise ProtocolViolation(f"invalid options in startup packet: {exc}") from None
    words = [w.replace("\0", " ") for w in words]
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            pair, i = words[i + 1], i + 2
        elif word.startswith("-c"):
            pair, i = word[2:], i + 1
        elif word.startswith("--"):
            pair, i = word[2:], i + 1
        else:
            raise FeatureNotSupported(f"unsupported option in startup packet: {word!r} (only -c name=value)")
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InvalidAuthorization(f"invalid option in startup packet: {pair!r}")
        out[name.replace("-", "_")] = value
    return out


class ListenerHost(SessionHost, Protocol):
    """What accepting a client asks of the process (proxy.app.Proxy), besides what its
    session will."""

    ssl_context: ssl.SSLContext | None
    verifiers: Verifiers

    def too_many_clients(self) -> bool: ...
    def console_parameters(self, params: dict[str, str]) -> dict[str, str]: ...
    async def run_console(self, session: ClientSession) -> None: ...
    def refusal(self, user: str, database: str, host: str) -> ProxyError | None: ...
    async def look_up(self, user: str) -> Verifier | None: ...
    def logged_in(self, user: str, exchange: ScramExchange) -> None: ...
    def admit(self, session: ClientSession) -> None: ...
    def cancel(self, process_id: int, secret_key: bytes) -> asyncio.Task | None: ...
    async def first_contact(self, session: ClientSession) -> dict[str, str]: ...
    def register_session(self, session: ClientSession) -> tuple[int, bytes]: ...


class Listener:
    """The client-facing socket; one ClientSession per connection."""

    def __init__(self, app: "ListenerHost"):
        self.app = app
        self.server: asyncio.AbstractServer | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> None:
        """`reuse_port`: one of several workers on the port (SO_REUSEPORT: the kernel spreads
        new connections over them)."""
        loop = asyncio.get_running_loop()
        self.server = await loop.create_server(self._new_session, host, port, reuse_address=True, backlog=1024,
                                               reuse_port=reuse_port or None)

    @property
    def port(self) -> int:
        return self.server.sockets[0].getsockname()[1]

    def _new_session(self) -> ClientSession:
        session = ClientSession(self.app)
        session.begin_handshake(Inbox(), self._handshake(session))
        return session

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handshake(self, session: ClientSession) -> None:
        app = self.app
        try:
            async with asyncio.timeout(app.config.listen.startup_timeout_s):
                console = await self._authenticate(session)
            if console:
                await app.run_console(session)  # (bounded by the client: its leaving ends it)
        except TimeoutError:
            session.fail(QueryCanceled("canceling authentication due to timeout").as_fatal())
        except EOFError:
            session.close("client disconnected during startup")
        except ProxyError as exc:
            session.fail(exc.as_fatal())
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # pragma: no cover - a bug must not take the listener down
            log.exception("handshake failed")
            session.fail(ProtocolViolation(f"internal error during startup: {exc}"))

    async def _authenticate(self, session: ClientSession) -> bool:
        """True: the client is an admin of the console (proxy.admin.console), which
        answers it from here on; False: it was handed to its session."""
        app = self.app
        inbox: Inbox = session.inbox
        while True:
            packet = await inbox.packet()
            if isinstance(packet, wire.SSLRequest):
                if app.ssl_context is not None and not session.tls:
                    if inbox.buf:
                        # Bytes sent before the TLS handshake would be trusted as if they
                        # had come encrypted (CVE-2021-23214): refuse.
                        raise ProtocolViolation("received unencrypted data after SSL request")
                    session.transport.write(b"S")
                    await self._start_tls(session)
                else:
                    session.transport.write(b"N")
                continue
            if isinstance(packet, wire.GSSENCRequest):
                session.transport.write(b"N")
                continue
            if isinstance(packet, wire.CancelRequest):
                forwarded = app.cancel(packet.process_id, packet.secret_key)
                if forwarded is not None:
                    # The client's cancel connection ends when the server has taken the
                    # request, as PostgreSQL's does: a driver that waits for that before
                    # its next statement (asyncpg) must not see that statement cancelled.
                    with contextlib.suppress(Exception):
                        await asyncio.shield(forwarded)
                session.close("cancel request handled")
                return False
            break
        if app.too_many_clients():
            raise TooManyConnections("sorry, too many clients already")
        if packet.minor > 0 or packet.unknown_options:
            session.transport.write(wire.negotiate_protocol_version(wire.PROTOCOL_3_0, packet.unknown_options))
        params = dict(packet.params)
        replication = params.pop("replication", None)
        if replication is not None and replication.lower() not in ("false", "0", "off", "no"):
            raise FeatureNotSupported(
                "replication connections are not supported by pgsplit; connect to the server directly"
            )
        user = params.pop("user", "")
        if not user:
            raise InvalidAuthorization("no PostgreSQL user name specified in startup packet")
        database = params.pop("database", "") or user
        # [[access]] decides before the password is asked, as pg_hba.conf does: a refused
        # client learns nothing of the password, and no byte reaches a backend.
        refused = app.refusal(user, database, _peer_host(session))
        if refused is not None:
            raise refused
        # The console's database is the console's only while it has admins: without
        # console_users a backend database of that name is reached as any other.
        admin = app.config.admin
        console = bool(admin.console_users) and database == admin.console_database
        options = params.pop("options", "")
        if options:
            params.update(parse_options(options))
        session.application_name = params.get("application_name", "")  # (as it logged in: SHOW CLIENTS)
        # A user not in [[users]]: [auth_query] reads its verifier on the server (bounded
        # in time), before the client is asked a password it would type in vain.
        looked_up = await app.look_up(user)
        # SCRAM-SHA-256 (RFC 7677) before anything else happens for this client.
        session.transport.write(wire.auth_sasl([SCRAM]))
        body = await self._expect_password_message(inbox)
        mechanism, client_first = wire.parse_sasl_initial(body) if body else ("", b"")
        exchange = app.verifiers.server_exchange(user, looked_up)
        session.transport.write(wire.auth_request(wire.AUTH_SASL_CONTINUE, exchange.first(mechanism, client_first)))
        final = exchange.final(await self._expect_password_message(inbox))
        app.logged_in(user, exchange)
        session.transport.write(wire.auth_request(wire.AUTH_SASL_FINAL, final))
        if console and user not in admin.console_users:
            # After the password, as for anyone (a decoy exchange for an unknown name): who
            # is an admin is told only to a client that has authenticated.
            raise InvalidAuthorization(
                f'user "{user}" may not use the pgsplit admin console (database "{database}"): '
                "it is not in [admin] console_users")
        session.user = user
        session.database = database
        # The limits count authenticated sessions (as PostgreSQL's CONNECTION LIMIT does,
        # after authentication), before the first server contact.
        app.admit(session)
        if console:
            reported = app.console_parameters(params)  # no server contact, ever
        else:
            session.set_startup_settings(params)
            reported = await app.first_contact(session)
        session.process_id, session.secret_key = app.register_session(session)
        out = [wire.auth_ok()]
        out += [wire.parameter_status(k, v) for k, v in sorted(reported.items())]
        out.append(wire.backend_key_data(session.process_id, session.secret_key))
        out.append(wire.ready_for_query(wire.TX_IDLE))
        session.transport.write(b"".join(out))
        log.debug("session %s: %s@%s from %s", session.process_id, user, database, session.peer)
        if console:
            session.state = State.CONSOLE  # its input stays in the inbox, for the console
            return True
        session.start(inbox.rest())
        return False

    async def _expect_password_message(self, inbox: Inbox) -> bytes:
        try:
            t, body = await inbox.message()
        except wire.ProtocolViolation as exc:
            raise ProtocolViolation(str(exc)) from None
        if t == wire.F_TERMINATE:
            raise EOFError
        if t != wire.F_PASSWORD:
            raise ProtocolViolation(f"expected SASL response, got message type {t}")
        return body

    async def _start_tls(self, session: ClientSession) -> None:
        loop = asyncio.get_running_loop()
        transport = await loop.start_tls(session.transport, session, self.app.ssl_context, server_side=True)
        session.transport = transport
        session.tls = True


def _peer_host(session: ClientSession) -> str:
    peer = session.transport.get_extra_info("peername") if session.transport is not None else None
    return str(peer[0]) if isinstance(peer, tuple) else str(peer or "")


def new_cancel_key(worker: int | None = None) -> tuple[int, bytes]:
    """A random BackendKeyData key; a worker's number (0-255) is its process id's low byte,
    so that a CancelRequest reaching any worker finds the one holding the session."""
    process_id = int.from_bytes(os.urandom(4), "big") & 0x7FFFFFFF
    if worker is not None:
        process_id = (process_id & ~0xFF) | worker
    return process_id, os.urandom(4)
