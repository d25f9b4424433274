"""One connection to a backend server: login, the transport's callbacks, and the requests
written to it.

Owns: the startup/authentication exchange with a backend, the order in which requests go
out (`send`, `swallow`, `push`), and what the server session behind it carries
(ServerSessionState). Its replies are cut into steps by its other half,
proxy.server.replies.ReplyStream, and go to the session it is lent to, a StepOwner.

Must not know: routing, pools, the client's protocol state.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
from typing import Callable, Protocol

from proxy import wire
from proxy.auth import BackendAuth, Credential
from proxy.errors import ConnectionFailure, ProxyError, ServerError
from proxy.server.prepared import PreparedStatements
from proxy.server.replies import ReplyStream, Step, StepKind, SwallowStep
from router.tls import ServerTls, describe_failure

log = logging.getLogger("pgsplit.backend")


class ServerSessionState:
    """What the server session behind one connection carries for the clients that borrow
    it: the statements prepared there (protocol-level and SQL PREPARE) and the client
    settings it runs with. A base of ServerConnection rather than a field of it: the hot
    path reads `prepared` and `settings_key` at every unit, and a field's extra hop at
    each of those reads costs 0.8 % of loadtest.microbench's instructions per unit."""

    def __init__(self, prepared: PreparedStatements) -> None:
        self.prepared = prepared  # server-side names of statements prepared here
        self.sql_prepared: dict[str, str] = {}  # SQL PREPARE name -> statement text
        self.settings_key: tuple = ()  # the client settings this connection carries

    def forget_statements(self) -> None:
        """The server session dropped every prepared statement (a client's DISCARD ALL or
        DEALLOCATE ALL ran here): each is prepared again when next needed, other clients'
        included."""
        self.prepared.clear()
        self.sql_prepared.clear()


# The settings_key of a connection whose settings no session can rely on (a settings replay
# failed, and was undone as a whole): the next unit there replays its own.
UNKNOWN_SETTINGS = (("", "unknown"),)


class ConnectionPool(Protocol):
    """The pool a connection belongs to, as the connection sees it."""

    def by_process_id(self, process_id: int) -> ServerConnection | None: ...


class ServerConnection(ServerSessionState, ReplyStream, asyncio.Protocol):
    """A logged-in server connection; lent to one client session at a time."""

    lost_reason: str | None = None  # why the proxy cut it (its client is told)

    def __init__(self, backend: str, host: str, port: int, user: str, database: str, *,
                 pool: ConnectionPool | None = None, generation: int = 0,
                 prepared: PreparedStatements | None = None,
                 on_lost: Callable[[ServerConnection, Exception | None], None] | None = None,
                 tls: ServerTls = ServerTls()):
        ServerSessionState.__init__(self, prepared if prepared is not None else PreparedStatements())
        ReplyStream.__init__(self)
        self.backend = backend
        self.host = host
        self.port = port
        self.user = user
        self.database = database
        self.tls = tls
        self.pool = pool  # the pool that lends it (a notification's sender is looked up there)
        self.generation = generation  # the pool's generation it was opened in
        self.on_lost = on_lost  # told when the server ends it (the pool forgets an idle one)
        self.transport: asyncio.Transport | None = None
        self.process_id = 0
        self.secret_key = b""
        self.created = time.monotonic()
        self.last_used = self.created
        self.closed = False
        self.cancels = 0  # cancel requests for it in flight (proxy.server.pool.Pool.cancel)
        self.last_client_pid = 0  # the pid the client it was last lent to was given
        self.release_after_cancel = False  # given back while one was: back in the pool after it
        self.ahead = b""  # requests swallowed `ahead`, written with the next `send`
        self.after_sync = b""  # requests to write right behind the open unit's Sync (see send)
        self._login: asyncio.Future | None = None
        self._framer: wire.Framer | None = None
        self._auth: BackendAuth | None = None
        self._login_error: dict[str, str] | None = None
        self._tls_answer: asyncio.Future | None = None  # the server's answer to an SSLRequest

    # --- login -----------------------------------------------------------------------

    async def login(self, credential: Credential, params: dict[str, str], timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self._login = loop.create_future()
        self._framer = wire.Framer()
        self._auth = BackendAuth(self.user, credential)
        try:
            async with asyncio.timeout(timeout):
                await loop.create_connection(lambda: self, self.host, self.port)
                if self.tls.wanted:
                    await self._start_tls(loop)
                startup = {"user": self.user, "database": self.database, **params}
                self.transport.write(wire.startup_message(startup))
                await self._login
        except TimeoutError:
            self.close()
            raise ConnectionFailure(
                f"could not connect to backend {self.backend} ({self.host}:{self.port}): timeout after {timeout:g}s"
            ) from None
        except (ssl.SSLError, ssl.CertificateError) as exc:
            self.close()
            raise ConnectionFailure(
                f"could not connect to backend {self.backend} ({self.host}:{self.port}): {describe_failure(exc)} "
                f"(sslmode={self.tls.sslmode})"
            ) from None
        except OSError as exc:
            self.close()
            raise ConnectionFailure(
                f"could not connect to backend {self.backend} ({self.host}:{self.port}): {exc.strerror or exc}"
            ) from None
        except BaseException:
            self.close()
            raise
        finally:
            self._framer = None
            self._auth = None
        self._login = None

    async def _start_tls(self, loop: asyncio.AbstractEventLoop) -> None:
        """SSLRequest first (protocol 55.2.10): on 'S' the TLS handshake runs on this
        socket and the login goes on inside it; on 'N' the login goes on in plain text if
        the sslmode allows it, else the connection is refused."""
        self._tls_answer = loop.create_future()
        self.transport.write(wire.ssl_request())
        try:
            answer = await self._tls_answer
        finally:
            self._tls_answer = None
        if answer == b"N":
            if self.tls.required:
                raise ConnectionFailure(f"could not connect to backend {self.backend} ({self.host}:{self.port}): "
                                        f"the server does not accept TLS, and sslmode is {self.tls.sslmode}")
            return
        self.transport = await loop.start_tls(self.transport, self, self.tls.context(), server_hostname=self.host)
        self.transport.set_write_buffer_limits(high=256 * 1024)

    def _tls_answered(self, data: bytes) -> None:
        """The one byte that answers an SSLRequest. Anything after an 'S' would have been
        sent before the encryption starts, where anyone on the path could have put it:
        refused, as libpq does (CVE-2021-23222)."""
        fut = self._tls_answer
        if fut.done():
            return
        if data[:1] in (b"S", b"N") and len(data) == 1:
            fut.set_result(data)
        elif data[:1] == b"S":
            fut.set_exception(ConnectionFailure(
                f"backend {self.backend} sent unencrypted data after agreeing to TLS; refusing the connection"))
        else:
            fut.set_exception(ConnectionFailure(
                f"backend {self.backend} answered the SSLRequest with {data[:1]!r}, not S or N"))

    def _login_received(self, data: bytes) -> None:
        if self._tls_answer is not None:
            self._tls_answered(data)
            return
        fut = self._login
        try:
            for t, body in self._framer.feed(data):
                if t == wire.B_AUTH:
                    code, payload = wire.parse_auth(body)
                    reply = self._auth.respond(code, payload)
                    if reply:
                        self.transport.write(reply)
                elif t == wire.B_PARAMETER_STATUS:
                    name, value = wire.parse_parameter_status(body)
                    self.params[name] = value
                elif t == wire.B_BACKEND_KEY:
                    self.process_id, self.secret_key = wire.parse_backend_key(body)
                elif t == wire.B_ERROR:
                    raise ServerError(wire.parse_fields(body), fatal=True)
                elif t == wire.B_READY:
                    self.status = body[0]
                    rest = self._framer.take_rest()
                    if not fut.done():
                        fut.set_result(None)
                    if rest:  # nothing should follow, but never lose bytes
                        self._login = None
                        self.data_received(rest)
                    return
                # NoticeResponse and NegotiateProtocolVersion need no answer here.
        except (ProxyError, wire.ProtocolViolation, ValueError) as exc:
            if not fut.done():
                fut.set_exception(exc if isinstance(exc, ProxyError) else ProxyError(str(exc)))

    # --- asyncio.Protocol --------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        transport.set_write_buffer_limits(high=256 * 1024)

    def connection_lost(self, exc: Exception | None) -> None:
        was_closed = self.closed
        self.closed = True
        if self._tls_answer is not None and not self._tls_answer.done():
            self._tls_answer.set_exception(
                ConnectionFailure(f"backend {self.backend} closed the connection before answering the SSLRequest"))
            return
        if self._login is not None and not self._login.done():
            self._login.set_exception(
                ConnectionFailure(f"backend {self.backend} closed the connection during login")
            )
            return
        if not was_closed and self.on_lost is not None:
            self.on_lost(self, exc)
        for step in self.steps:
            if step.kind is StepKind.SWALLOW and step.callback is not None:
                step.error = step.error or {"C": "08006", "M": f"server connection to {self.backend} lost"}
                step.status = 0
                try:
                    step.callback(step)
                except Exception:  # noqa: BLE001  the owner must still hear of the loss below
                    log.exception("a step's callback failed as the connection to %s was lost", self.backend)
        owner = self.owner
        pending = [s for s in self.steps if s.kind is StepKind.FORWARD]
        self.steps.clear()
        if owner is not None:
            owner.server_lost(self, exc, pending)

    def pause_writing(self) -> None:
        if self.owner is not None:
            self.owner.pause_reading("server")

    def resume_writing(self) -> None:
        if self.owner is not None:
            self.owner.resume_reading("server")

    def close(self) -> None:
        self.closed = True
        if self.transport is not None and not self.transport.is_closing():
            try:
                self.transport.write(wire.TERMINATE)
            except Exception:  # pragma: no cover - already broken
                pass
            self.transport.close()

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    # --- requests ----------------------------------------------------------------------

    def push(self, step: Step) -> None:
        """Queue a step whose request bytes the caller writes (or has written)."""
        steps = self.steps
        steps.append(step)
        if step.kind is StepKind.LOCAL and len(steps) == 1:
            self._run_locals()

    def swallow(self, request: bytes, callback: Callable[[SwallowStep], None] | None = None, *,
                rows: bool = False, ahead: bool = False, written: bool = False) -> SwallowStep:
        """Send a request of the proxy's own; its replies never reach a client. `ahead`:
        it prepares the unit about to be sent, and goes out with it in one write (`send`).
        `written`: the caller wrote it already, behind the unit just queued, in that
        unit's write."""
        step = SwallowStep(callback)
        if rows:
            step.rows = []
        self.steps.append(step)
        if ahead:
            self.ahead += request
        elif not written:
            self.send(request)
        return step

    def drop_sql_statements(self) -> None:
        """The connection goes back to its pool: the statements a client PREPAREd here in
        SQL are that client's (another one could EXECUTE them, or fail to PREPARE its own
        under the same name). A DEALLOCATE of each is queued `ahead`, so it goes out in
        the next borrower's first write, before its unit; the client that prepared them
        prepares them again where it needs them."""
        for name in self.sql_prepared:
            self.swallow(wire.query('DEALLOCATE "' + name.replace('"', '""') + '"'), ahead=True)
        self.sql_prepared.clear()

    def send(self, data: bytes) -> None:
        """Write requests; those swallowed `ahead` go first, in the same write (one
        syscall, and the server reads them together). Every write of requests comes
        here, so the bytes keep the order of the steps."""
        if self.ahead:
            ahead, self.ahead = self.ahead, b""
            if self.after_sync:
                data = self._behind_sync(data)
            data = ahead + data
        self.transport.write(data)

    def pass_through(self, data: bytes) -> None:
        """More of a long client message whose head went out through `send`: written as
        it is (a request `ahead` inside it would split the message; it goes with the
        next `send`)."""
        self.transport.write(data)

    def _behind_sync(self, data: bytes) -> bytes:
        """`after_sync` goes right behind the first Sync in `data` (the open unit's own),
        or waits for a later write (`ahead` holds a Flush, harmless, to be called again)."""
        try:
            frames, _ = wire.split_messages(data, valid_types=wire.FRONTEND_TYPES)
        except wire.ProtocolViolation:  # a long CopyData's rest: no Sync in it
            frames = []
        for t, _s, e in frames:
            if t == wire.F_SYNC:
                data, self.after_sync = data[:e] + self.after_sync + data[e:], b""
                return data
        self.ahead = wire.FLUSH
        return data



async def open_connection(
    backend: str, host: str, port: int, user: str, database: str, credential: Credential,
    *, params: dict[str, str] | None = None, timeout: float = 5.0, pool: ConnectionPool | None = None,
    generation: int = 0, prepared: PreparedStatements | None = None,
    on_lost: Callable[[ServerConnection, Exception | None], None] | None = None, tls: ServerTls = ServerTls(),
) -> ServerConnection:
    conn = ServerConnection(backend, host, port, user, database, pool=pool, generation=generation,
                            prepared=prepared, on_lost=on_lost, tls=tls)
    await conn.login(credential, params or {}, timeout)
    return conn


async def send_cancel(host: str, port: int, process_id: int, secret_key: bytes, tls: ServerTls = ServerTls(),
                      timeout: float = 5.0) -> None:
    """Send a CancelRequest on a fresh connection (protocol 55.2.8), inside TLS when the
    backend's sslmode asks for it, as the connection it cancels was; no reply comes."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            if tls.wanted:
                writer.write(wire.ssl_request())
                answer = await reader.readexactly(1)
                if answer == b"S":
                    await writer.start_tls(tls.context(), server_hostname=host)
                elif tls.required:
                    raise ConnectionFailure(f"{host}:{port} does not accept TLS, and sslmode is {tls.sslmode}")
            writer.write(wire.cancel_request(process_id, secret_key))
            await writer.drain()
            await reader.read()  # the server closes the connection when done
        finally:
            writer.close()
