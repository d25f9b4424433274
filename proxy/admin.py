"""The HTTP side of the proxy (aiohttp): /metrics, /healthz and the admin API (status,
pause, resume, reload, cutover, migrate).

Owns: routes, the token check for POST requests, JSON shapes, the check of the numbers a
request carries. Loopback-only by default; bound elsewhere, the config requires a token, and
every POST must carry it as `Authorization: Bearer <token>` (the scheme in any case, RFC
7235). The token is compared in constant time and never logged.
Must not know: how a cutover or a pause works (it calls the proxy's methods).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
from typing import TYPE_CHECKING

from aiohttp import web

from metrics import CONTENT_TYPE

if TYPE_CHECKING:  # pragma: no cover
    from proxy.app import Proxy

log = logging.getLogger("pgsplit.admin")

MIGRATE_ACTIONS = ("plan", "start", "status", "verify")
SECONDS = ("timeout_s",)  # body fields that are durations (POST /v1/pause, /v1/cutover)


class Admin:
    def __init__(self, proxy: "Proxy"):
        self.proxy = proxy
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        app = web.Application(middlewares=[self._auth])
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/v1/status", self.status)
        for path, handler in self.post_routes().items():
            app.router.add_post(path, handler)
        for action in MIGRATE_ACTIONS:
            app.router.add_post(f"/v1/migrate/{action}", self._migrate(action))
        app.router.add_get("/v1/migrate/status", self.migrate_status)
        self.app = app

    def post_routes(self) -> dict:
        proxy = self.proxy
        routes = {}
        for name in ("pause", "resume", "reload", "cutover"):
            method = getattr(proxy, f"admin_{name}", None)
            routes[f"/v1/{name}"] = self._post(name, method)
        if getattr(proxy, "start_cutover", None) is not None:
            routes["/v1/cutover"] = self.cutover  # streams the steps as they happen
        return routes

    @web.middleware
    async def _auth(self, request: web.Request, handler):
        if request.method == "POST":
            token = self.proxy.config.admin.secret()
            if token is not None:
                scheme, _, given = request.headers.get("Authorization", "").partition(" ")
                # compared whatever the scheme, so the time taken tells nothing more
                same = hmac.compare_digest(given.lstrip(" ").encode(), token.encode())
                if not (same and scheme.lower() == "bearer"):
                    return web.json_response({"error": "missing or wrong admin token"}, status=401,
                                             headers={"WWW-Authenticate": "Bearer"})
        return await handler(request)

    def _post(self, name: str, method):
        async def handler(request: web.Request) -> web.Response:
            if method is None:
                return web.json_response({"error": f"{name} is not available in this version"}, status=501)
            body = await _json_object(request)
            if isinstance(body, web.Response):
                return body
            try:
                result = await method(**body)
            except TypeError as exc:
                return web.json_response({"error": f"bad arguments: {exc}"}, status=400)
            except ValueError as exc:
                return web.json_response({"error": str(exc)}, status=409)
            return web.json_response(result)

        return handler

    async def cutover(self, request: web.Request) -> web.StreamResponse:
        """POST /v1/cutover {"target": NAME, "dry_run": bool, "timeout_s": seconds}: newline-
        delimited JSON, one event per step start and end, then a summary. The cutover runs
        on if the client hangs up; only what it reads stops."""
        from ops.cutover.machine import CutoverBusy

        body = await _json_object(request)
        if isinstance(body, web.Response):
            return body
        events: asyncio.Queue = asyncio.Queue()
        try:
            task = self.proxy.start_cutover(**body, on_event=events.put_nowait)
        except CutoverBusy as exc:
            return web.json_response({"error": str(exc)}, status=409)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad arguments: {exc}"}, status=400)
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

    def _migrate(self, action: str):
        """POST /v1/migrate/ACTION {"target": NAME, ...}: the proxy's admin_migrate_ACTION.
        400: bad arguments (an unknown cluster...); 409: the migration step failed or was
        refused (``side``, ``object``; a refused start carries the plan and its blockers)."""
        async def handler(request: web.Request) -> web.Response:
            body = await _json_object(request)
            if isinstance(body, web.Response):
                return body
            return await self._run_migrate(action, body)

        return handler

    async def migrate_status(self, request: web.Request) -> web.Response:
        """GET /v1/migrate/status?target=NAME."""
        return await self._run_migrate("status", dict(request.query))

    async def _run_migrate(self, action: str, body: dict) -> web.Response:
        from ops.migrate.control import MigrateError
        from ops.migrate.plan import BlockedError

        method = getattr(self.proxy, f"admin_migrate_{action}", None)
        if method is None:
            return web.json_response({"error": f"migrate {action} is not available in this version"}, status=501)
        if "target" not in body:
            return web.json_response({"error": "bad arguments: \"target\" (a cluster name) is required"},
                                     status=400)
        try:
            result = await method(**body)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad arguments: {exc}"}, status=400)
        except BlockedError as exc:
            return web.json_response({"error": f"refused: {exc}", "side": exc.side, "object": exc.object,
                                      "plan": exc.plan.to_dict(), "text": exc.plan.render()}, status=409)
        except MigrateError as exc:
            return web.json_response({"error": str(exc), "side": exc.side, "object": exc.object}, status=409)
        return web.json_response(result)

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

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.proxy.metrics.exposition(), headers={"Content-Type": CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.Response:
        topo = self.proxy.topology.current
        writable = topo.primary_writable
        readable = writable or any(r.up for r in topo.replicas)
        body = {"status": "ok" if writable else ("degraded" if readable else "down"),
                "primary_writable": writable, "generation": topo.generation}
        return web.json_response(body, status=200 if readable else 503)

    async def status(self, request: web.Request) -> web.Response:
        return web.json_response(self.proxy.status())


async def _json_object(request: web.Request) -> dict | web.Response:
    """A POST's JSON object body ({} when empty), or the 400 answer to send instead."""
    try:
        body = await request.json() if request.can_read_body else {}
    except ValueError:
        return web.json_response({"error": "the request body is not JSON"}, status=400)
    if not isinstance(body, dict):
        return web.json_response({"error": "the request body must be a JSON object"}, status=400)
    for key in SECONDS:
        value = body.get(key)
        # Python's JSON reads NaN, Infinity and 1e400 (inf) as floats: none is a timeout.
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not math.isfinite(value) or value <= 0):
            return web.json_response({"error": f"bad arguments: {key} must be a finite number of seconds > 0"
                                               f" (got {json.dumps(value)})"}, status=400)
    return body
