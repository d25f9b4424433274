"""The HTTP side of the proxy (aiohttp): /metrics, /healthz and the admin API (status,
pause, resume, reload, cutover, migrate).

Owns: routes, the token check for POST requests, JSON shapes: which fields each route
takes (an unknown or missing one is 400) and the status code of each failure. Loopback-only
by default; bound elsewhere, the config requires a token, and every POST must carry it as
`Authorization: Bearer <token>` (the scheme in any case, RFC 7235). The token is compared
in constant time and never logged.
Must not know: what an operation does or which values its arguments may take: it calls
AdminOps' typed methods (proxy.admin.operations), which check them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Mapping

from aiohttp import web

from metrics import CONTENT_TYPE
from proxy.admin.operations import AdminOps, BadArguments
from ops.cutover.machine import CutoverBusy
from ops.migrate.control import MigrateError
from ops.migrate.plan import BlockedError

log = logging.getLogger("pgsplit.admin")

Fields = Mapping[str, object]


class Admin:
    def __init__(self, ops: AdminOps):
        self.ops = ops
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/status", self.status)
        app.router.add_post("/v1/pause", self.pause)
        app.router.add_post("/v1/resume", self.resume)
        app.router.add_post("/v1/reload", self.reload)
        app.router.add_post("/v1/cutover", self.cutover)
        for action in ("plan", "start", "status", "verify"):
            app.router.add_post(f"/v1/migrate/{action}", self.migrate)
        app.router.add_get("/v1/migrate/status", self.migrate)
        self.app = app

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.method == "POST":
            token = self.ops.admin_token()
            if token is not None:
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                # compared whatever the scheme, so the time taken tells nothing more
                same = hmac.compare_digest(given.lstrip(" ").encode(), token.encode())
                if not (same and scheme.lower() == "bearer"):
                    return web.json_response({"error": "missing or wrong admin token"}, status=401,
                                             headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    # --- pause, resume, reload: 400 for bad arguments, 409 when refused -----------------------------

    async def pause(self, request: web.Request) -> web.Response:
        """POST /v1/pause {"timeout_s": seconds}."""
        return await self._act(request, ("timeout_s",), lambda f: self.ops.pause(f.get("timeout_s")))

    async def resume(self, request: web.Request) -> web.Response:
        return await self._act(request, (), lambda f: self.ops.resume())

    async def reload(self, request: web.Request) -> web.Response:
        return await self._act(request, (), lambda f: self.ops.reload())

    async def _act(self, request: web.Request, optional: tuple[str, ...],
                   call: Callable[[Fields], Awaitable[dict]]) -> web.Response:
        try:
            fields = _fields(await _json_object(request), (), optional)
            result = await call(fields)
        except BadArguments as exc:
            return _bad_arguments(exc)
        except ValueError as exc:  # refused: not paused, a pause or cutover in progress, an invalid file
            return web.json_response({"error": str(exc)}, status=409)
        return web.json_response(result)

    # --- cutover ------------------------------------------------------------------------------------

    async def cutover(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/cutover {"target": NAME, "dry_run": bool, "timeout_s": seconds, "reverse": bool}:
        newline-delimited JSON, one event per step start and end, then a summary. The cutover
        runs on if the client hangs up; only what it reads stops."""
        events: asyncio.Queue = asyncio.Queue()
        try:
            f = _fields(await _json_object(request), ("target",), ("dry_run", "timeout_s", "reverse"))
            task = self.ops.start_cutover(f["target"], dry_run=f.get("dry_run", False),
                                          timeout_s=f.get("timeout_s"), reverse=f.get("reverse", False),
                                          on_event=events.put_nowait)
        except CutoverBusy as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except ValueError as exc:
            return _bad_arguments(exc)
        task.add_done_callback(lambda _: events.put_nowait(None))
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        reading = True
        while (event := await events.get()) is not None:
            if reading:
                try:
                    await response.write(json.dumps(event).encode() + b"\n")
                except (ConnectionError, RuntimeError) as exc:
                    reading = False
                    log.info("the client of POST /v1/cutover went away (%s); the cutover goes on", exc)
        if reading and not task.cancelled() and task.exception() is not None:
            failure = {"event": "summary", "result": "failed", "error": f"internal error: {task.exception()!r}"}
            await response.write(json.dumps(failure).encode() + b"\n")
        if reading:
            await response.write_eof()
        return response

    # --- online migration ---------------------------------------------------------------------------

    async def migrate(self, request: web.Request) -> web.Response:
        """POST /v1/migrate/ACTION {"target": NAME, ...}, GET /v1/migrate/status?target=NAME.
        400: bad arguments (an unknown cluster...); 409: the migration step failed or was
        refused (``side``, ``object``; a refused start carries the plan and its blockers)."""
        action = request.path.rsplit("/", 1)[1]
        ops = self.ops
        try:
            if request.method == "GET":
                body: Fields = dict(request.query)
            else:
                body = await _json_object(request)
            if action == "verify":
                f = _fields(body, ("target",), ("tables", "chunk_rows"))
                result = await ops.migrate_verify(f["target"], f.get("tables"), f.get("chunk_rows"))
            else:
                target = _fields(body, ("target",), ())["target"]
                call = {"plan": ops.migrate_plan, "start": ops.migrate_start, "status": ops.migrate_status}[action]
                result = await call(target)
        except ValueError as exc:
            return _bad_arguments(exc)
        except BlockedError as exc:
            return web.json_response({"error": f"refused: {exc}", "side": exc.side, "object": exc.object,
                                      "plan": exc.plan.to_dict(), "text": exc.plan.render()}, status=409)
        except MigrateError as exc:
            return web.json_response({"error": str(exc), "side": exc.side, "object": exc.object}, status=409)
        return web.json_response(result)

    # --- reads --------------------------------------------------------------------------------------

    async def metrics(self, request: web.Request) -> web.Response:
        await self.ops.refresh()
        return web.Response(body=self.ops.metrics_text(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        body = self.ops.health()
        return web.json_response(body, status=503 if body["status"] == "down" else 200)

    async def status(self, request: web.Request) -> web.Response:
        await self.ops.refresh()
        return web.json_response(self.ops.status())

    # --- the server ---------------------------------------------------------------------------------

    async def start(self, host: str, port: int) -> None:
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        self._site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await self._site.start()

    @property
    def port(self) -> int:
        server = self._site._server  # aiohttp keeps the asyncio server here
        return server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


REQUIRED = {"target": "a cluster name"}  # how a missing required field is named


class BadBody(BadArguments):
    """The request body is not a JSON object (its 400 says so, not "bad arguments")."""


async def _json_object(request: web.Request) -> Fields:
    """A POST's JSON object body ({} when empty)."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        raise BadBody("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise BadBody("the request body must be a JSON object")
    return body


def _fields(body: Fields, required: tuple[str, ...], optional: tuple[str, ...]) -> Fields:
    """The body if it has every required field and no other than `optional`."""
    unknown = sorted(set(body) - set(required) - set(optional))
    if unknown:
        raise BadArguments(f"unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(json.dumps, unknown))}"
                           f" (this request takes {', '.join(map(json.dumps, required + optional)) or 'none'})")
    for name in required:
        if name not in body:
            raise BadArguments(f"{json.dumps(name)} ({REQUIRED[name]}) is required")
    return body


def _bad_arguments(exc: ValueError) -> web.Response:
    error = str(exc) if isinstance(exc, BadBody) else f"bad arguments: {exc}"
    return web.json_response({"error": error}, status=400)
