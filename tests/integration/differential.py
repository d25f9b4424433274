"""Scripts of client operations run twice, directly on PostgreSQL and through pgsplit, for
tests/integration/test_differential.py.

A script is a list of steps ``(client index, operation)``; the clients take their steps one
at a time in script order, so both runs see the same interleaving. Each step's outcome (rows
as text, the SQLSTATE of an error, the transaction status after it, notifications received)
goes into a log; the two logs must be equal. Only what a client could tell from its own
replies is recorded, so a setting, prepared statement, temp table, cursor, LISTEN or
advisory lock that leaks from one client's server session to another's shows up as a reply
PostgreSQL would not have given.

The pool may be smaller than the number of clients: a client in a transaction block or with
session state (temp table, LISTEN, advisory lock, WITH HOLD cursor) keeps its server
connection, and another client would wait for it where PostgreSQL would not. `Script` keeps
a model of who holds a connection, the same in both runs as long as the outcomes are, and
skips the steps that would have to wait (recorded as skipped, in both runs).

Operations are plain tuples so that Hypothesis prints a failing script readably; `scripts()`
builds the strategy. Operations that hit a defect not fixed yet are left out unless
``PGSPLIT_DIFF_KNOWN_DEFECTS`` names them (``all`` for every one), see `KNOWN_DEFECT_OPS`.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import re
import socket
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import asyncpg
import psycopg
from hypothesis import strategies as st

STEP_TIMEOUT = 8.0  # a step that takes longer is a hang (PostgreSQL answers each in < 1 s)
SETTLE_TIMEOUT = 5.0
TABLE = "dd_rows"
LOCK_BASE = 4242000
CANCEL_AFTER = 0.3
MAX_CLIENTS = 3

# Operations a not-yet-fixed defect breaks (name -> what goes wrong), left out of the
# scripts unless PGSPLIT_DIFF_KNOWN_DEFECTS lists them (comma separated) or says "all".
KNOWN_DEFECT_OPS: dict[str, str] = {}  # none now ("ddl" was, until statements got new names after DDL)


def enabled_known_defects() -> set[str]:
    raw = os.environ.get("PGSPLIT_DIFF_KNOWN_DEFECTS", "").strip()
    if raw == "all":
        return set(KNOWN_DEFECT_OPS)
    return {name.strip() for name in raw.split(",") if name.strip()}


# --- the operations ----------------------------------------------------------------------------

GUCS = {
    "search_path": ["dd_a, public", "public", '"$user", dd_b'],
    "application_name": ["dd_one", "dd_two"],
    "statement_timeout": ["0", "123s", "7min"],
    "work_mem": ["64kB", "2MB"],
}
SET_FORMS = ["set", "set_local", "set_config", "set_config_local", "reset", "reset_all"]
PREPARED = ["p1", "p2"]
CURSORS = ["c1", "c2"]
TEMPS = ["t1", "t2"]
CHANNELS = ["ch1", "ch2"]
SAVEPOINTS = ["s1", "s2"]
LOCK_KEYS = [1, 2]
SMALL_SIZES = [10, 100_000, 1_000_000]
LARGE_SIZES = [5_000_000]  # over 4 MiB


def op_families() -> dict[str, st.SearchStrategy[tuple]]:
    """Strategies of operations by family; a script draws its steps from a few families, so
    that the operations that can meet (a PREPARE and another client's EXECUTE of the name)
    meet often."""
    known = enabled_known_defects()
    guc = st.sampled_from(sorted(GUCS))
    set_op = guc.flatmap(lambda g: st.tuples(st.just("set"), st.just(g), st.sampled_from(GUCS[g]),
                                             st.sampled_from(SET_FORMS)))
    families = {
        "settings": st.one_of(set_op, st.tuples(st.just("show"), guc)),
        "prepare": st.one_of(
            st.tuples(st.just("prepare"), st.sampled_from(PREPARED), st.integers(1, 3)),
            st.tuples(st.just("execute"), st.sampled_from(PREPARED), st.integers(0, 9)),
            st.tuples(st.just("deallocate"), st.sampled_from(PREPARED + ["ALL"]))),
        "extended": st.tuples(st.just("extended"), st.integers(1, 3), st.booleans()),
        "transactions": st.one_of(
            st.sampled_from([("begin",), ("commit",), ("rollback",), ("error",)]),
            st.tuples(st.sampled_from(["savepoint", "rollback_to", "release"]), st.sampled_from(SAVEPOINTS))),
        "rows": st.one_of(st.tuples(st.just("insert"), st.integers(0, 99)), st.just(("count",))),
        "cursors": st.one_of(
            st.tuples(st.just("declare"), st.sampled_from(CURSORS), st.booleans()),
            st.tuples(st.just("fetch"), st.sampled_from(CURSORS), st.integers(1, 3)),
            st.tuples(st.just("close"), st.sampled_from(CURSORS))),
        "temp": st.one_of(
            st.tuples(st.sampled_from(["temp_create", "temp_select", "temp_drop"]), st.sampled_from(TEMPS)),
            st.tuples(st.just("temp_insert"), st.sampled_from(TEMPS), st.integers(0, 9))),
        "copy": st.one_of(st.just(("copy_out",)),
                          st.tuples(st.just("copy_in"), st.lists(st.integers(0, 99), min_size=1, max_size=3))),
        "notify": st.one_of(
            st.tuples(st.just("listen"), st.sampled_from(CHANNELS)),
            st.tuples(st.just("unlisten"), st.sampled_from(CHANNELS + ["*"])),
            st.tuples(st.just("notify"), st.sampled_from(CHANNELS), st.sampled_from(["a", "b"])),
            st.just(("poll",))),
        "locks": st.one_of(st.tuples(st.sampled_from(["lock_try", "unlock"]), st.sampled_from(LOCK_KEYS)),
                           st.just(("unlock_all",))),
        "ddl": st.one_of(st.tuples(st.just("ddl"), st.sampled_from(["text", "int"])),
                         st.tuples(st.just("ddl_select"), st.booleans())),
        "session_end": st.sampled_from([("discard_all",), ("disconnect",)]),
        "cancel": st.just(("cancel",)),
        "large": st.one_of(st.tuples(st.just("large_out"), st.sampled_from(SMALL_SIZES + LARGE_SIZES)),
                           st.tuples(st.just("large_in"), st.sampled_from(SMALL_SIZES))),
        "large_in": st.tuples(st.just("large_in"), st.sampled_from(LARGE_SIZES)),
    }
    return {name: f for name, f in families.items() if name not in KNOWN_DEFECT_OPS or name in known}


def scripts(n_clients: int, themes: list[str] | None = None, min_steps: int = 10,
            max_steps: int = 30) -> st.SearchStrategy[list[tuple[int, tuple]]]:
    """Scripts whose steps come from the families in `themes` (default: a few drawn at random)."""
    families = op_families()
    if themes is not None:
        chosen = st.just([t for t in themes if t in families])
    else:
        chosen = st.lists(st.sampled_from(sorted(families)), min_size=1, max_size=4, unique=True)
    return chosen.flatmap(lambda names: st.lists(
        st.tuples(st.integers(0, n_clients - 1), st.one_of([families[n] for n in names])),
        min_size=min_steps, max_size=max_steps))


# --- clients: one driver-neutral face over psycopg 3 and asyncpg ----------------------------------

PIN_OPS = {"temp_create", "listen", "lock_try", "declare"}


def _rows(rows: Any) -> list[tuple[str, ...]]:
    return [tuple("NULL" if v is None else str(v) for v in row) for row in rows]


def _digest(value: str) -> str:
    return f"{len(value)}:{hashlib.md5(value.encode()).hexdigest()[:12]}"


class Client:
    """One client connection; `run` performs one operation and returns its outcome."""

    kind = ""

    def __init__(self, index: int, dsn: str):
        self.index = index
        self.dsn = dsn
        self.notifications: list[tuple[str, str, str]] = []

    def notified(self, pid: int, channel: str, payload: str) -> None:
        sender = "mine" if pid == self.backend_pid() else "another's"
        self.notifications.append((channel, payload, sender))

    async def sql(self, text: str, params: tuple = (), prepare: bool | None = None) -> list:
        raise NotImplementedError

    def in_transaction(self) -> bool:
        raise NotImplementedError

    def backend_pid(self) -> int:
        raise NotImplementedError

    async def connect(self) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError

    async def abort(self) -> None:
        """Drop the connection without a Terminate message."""
        raise NotImplementedError

    async def copy_out(self, query: str) -> list:
        raise NotImplementedError

    async def copy_in(self, values: list[int]) -> None:
        raise NotImplementedError

    async def cancel_sleep(self) -> tuple:
        raise NotImplementedError

    async def listen(self, channel: str) -> None:
        await self.sql(f"LISTEN {channel}")

    async def unlisten(self, channel: str) -> None:
        await self.sql(f"UNLISTEN {channel}")

    def error_state(self, exc: BaseException) -> tuple | None:
        raise NotImplementedError

    async def run(self, op: tuple) -> tuple:
        name = op[0]
        c = self.index
        if name == "set":
            _, guc, value, form = op
            literal = "'" + value.replace("'", "''") + "'"
            text = {"set": f"SET {guc} = {literal}", "set_local": f"SET LOCAL {guc} = {literal}",
                    "set_config": f"SELECT set_config('{guc}', {literal}, false)",
                    "set_config_local": f"SELECT set_config('{guc}', {literal}, true)",
                    "reset": f"RESET {guc}", "reset_all": "RESET ALL"}[form]
            return ("rows", _rows(await self.sql(text)))
        if name == "show":
            return ("rows", _rows(await self.sql(f"SELECT current_setting('{op[1]}')")))
        if name == "prepare":  # each client prepares its own text under shared names
            return ("rows", _rows(await self.sql(f"PREPARE {op[1]}(int) AS SELECT $1 + {100 * c + op[2]}")))
        if name == "execute":
            return ("rows", _rows(await self.sql(f"EXECUTE {op[1]}({op[2]})")))
        if name == "deallocate":
            return ("rows", _rows(await self.sql(f"DEALLOCATE {op[1]}")))
        if name == "extended":
            return ("rows", _rows(await self.sql(f"SELECT %s::int * {op[1]} + {1000 * c}", (op[1] + 1,),
                                                 prepare=op[2])))
        if name in ("begin", "commit", "rollback"):
            return ("rows", _rows(await self.sql(name.upper())))
        if name == "error":
            return ("rows", _rows(await self.sql("SELECT 1 / (random() * 0)::int")))
        if name == "savepoint":
            return ("rows", _rows(await self.sql(f"SAVEPOINT {op[1]}")))
        if name == "rollback_to":
            return ("rows", _rows(await self.sql(f"ROLLBACK TO SAVEPOINT {op[1]}")))
        if name == "release":
            return ("rows", _rows(await self.sql(f"RELEASE SAVEPOINT {op[1]}")))
        if name == "insert":
            return ("rows", _rows(await self.sql(f"INSERT INTO {TABLE} VALUES ({c}, {op[1]})")))
        if name == "count":
            return ("rows", _rows(await self.sql(f"SELECT c, count(*), sum(v) FROM {TABLE} GROUP BY c ORDER BY c")))
        if name == "declare":
            hold = " WITH HOLD" if op[2] else ""
            return ("rows", _rows(await self.sql(
                f"DECLARE {op[1]} CURSOR{hold} FOR SELECT g * {c + 1} FROM generate_series(1, 6) g")))
        if name == "fetch":
            return ("rows", _rows(await self.sql(f"FETCH {op[2]} FROM {op[1]}")))
        if name == "close":
            return ("rows", _rows(await self.sql(f"CLOSE {op[1]}")))
        if name == "temp_create":
            return ("rows", _rows(await self.sql(f"CREATE TEMP TABLE {op[1]} (v int)")))
        if name == "temp_insert":
            return ("rows", _rows(await self.sql(f"INSERT INTO {op[1]} VALUES ({op[2] + 10 * c})")))
        if name == "temp_select":
            return ("rows", _rows(await self.sql(f"SELECT v FROM {op[1]} ORDER BY v")))
        if name == "temp_drop":
            return ("rows", _rows(await self.sql(f"DROP TABLE {op[1]}")))
        if name == "copy_out":
            return ("copy", _rows(await self.copy_out(f"COPY (SELECT c, v FROM {TABLE} ORDER BY c, v) TO STDOUT")))
        if name == "copy_in":
            await self.copy_in([v + 1000 for v in op[1]])
            return ("copied", len(op[1]))
        if name == "listen":
            await self.listen(op[1])
            return ("ok",)
        if name == "unlisten":
            await self.unlisten(op[1])
            return ("ok",)
        if name == "notify":
            return ("rows", _rows(await self.sql(f"NOTIFY {op[1]}, '{op[2]}{c}'")))
        if name == "poll":
            await self.sql("SELECT 1")
            for _ in range(3):  # asyncpg hands notifications to its callbacks via call_soon
                await asyncio.sleep(0)
            got, self.notifications = self.notifications, []
            return ("notifications", got)
        if name == "lock_try":
            return ("rows", _rows(await self.sql(f"SELECT pg_try_advisory_lock({LOCK_BASE + op[1]})")))
        if name == "unlock":
            return ("rows", _rows(await self.sql(f"SELECT pg_advisory_unlock({LOCK_BASE + op[1]})")))
        if name == "unlock_all":
            return ("rows", _rows(await self.sql("SELECT pg_advisory_unlock_all()")))
        if name == "ddl":  # each client alters only its own table
            using = " USING b::int" if op[1] == "int" else ""
            return ("rows", _rows(await self.sql(f"ALTER TABLE {TABLE}_{c} ALTER COLUMN b TYPE {op[1]}{using}")))
        if name == "ddl_select":
            return ("rows", _rows(await self.sql(f"SELECT a, b, pg_typeof(b) FROM {TABLE}_{c}", prepare=op[1])))
        if name == "discard_all":
            return ("rows", _rows(await self.sql("DISCARD ALL")))
        if name == "cancel":
            return await self.cancel_sleep()
        if name == "large_out":
            rows = await self.sql(f"SELECT repeat('x', {op[1]}) || '{c}'")
            return ("large", _digest(rows[0][0]))
        if name == "large_in":
            value = "y" * op[1] + str(c)
            return ("rows", _rows(await self.sql("SELECT length(%s::text), md5(%s::text)", (value, value))))
        raise ValueError(f"unknown operation {op!r}")


class PsycopgClient(Client):
    kind = "psycopg"

    async def connect(self) -> None:
        self.conn = await psycopg.AsyncConnection.connect(self.dsn, autocommit=True, connect_timeout=10)
        self.conn.add_notify_handler(lambda n: self.notified(n.pid, n.channel, n.payload))

    async def sql(self, text: str, params: tuple = (), prepare: bool | None = None) -> list:
        if params:
            cur = await self.conn.execute(text, params, prepare=prepare)
        else:  # no parameters: psycopg sends a simple Query
            cur = await self.conn.execute(text.replace("%", "%%"), prepare=prepare)
        return await cur.fetchall() if cur.description is not None else []

    def in_transaction(self) -> bool:
        return self.conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE

    def backend_pid(self) -> int:
        return self.conn.info.backend_pid

    async def close(self) -> None:
        await self.conn.close()

    async def abort(self) -> None:
        sock = socket.socket(fileno=os.dup(self.conn.pgconn.socket))
        try:
            sock.shutdown(socket.SHUT_RDWR)
        finally:
            sock.close()
        try:
            await self.conn.close()
        except psycopg.Error:
            pass

    async def copy_out(self, query: str) -> list:
        rows = []
        async with self.conn.cursor() as cur:
            async with cur.copy(query) as copy:
                async for row in copy.rows():
                    rows.append(row)
        return rows

    async def copy_in(self, values: list[int]) -> None:
        async with self.conn.cursor() as cur:
            async with cur.copy(f"COPY {TABLE} (c, v) FROM STDIN") as copy:
                for v in values:
                    await copy.write_row((self.index, v))

    async def cancel_sleep(self) -> tuple:
        async def cancel_later() -> None:
            await asyncio.sleep(CANCEL_AFTER)
            await self.conn.cancel_safe(timeout=5)

        canceller = asyncio.create_task(cancel_later())
        try:
            await self.sql("SELECT pg_sleep(5)")
            return ("not cancelled",)
        except psycopg.Error as exc:
            return ("error", exc.sqlstate)
        finally:
            await canceller

    def error_state(self, exc: BaseException) -> tuple | None:
        if isinstance(exc, psycopg.Error) and exc.sqlstate:
            return ("error", exc.sqlstate)
        return None


class AsyncpgClient(Client):
    """asyncpg prepares every statement it runs (named, cached per connection)."""

    kind = "asyncpg"

    async def connect(self) -> None:
        self.conn = await asyncpg.connect(self.dsn, ssl=False, timeout=10)

    async def sql(self, text: str, params: tuple = (), prepare: bool | None = None) -> list:
        n = 0

        def placeholder(_: Any) -> str:
            nonlocal n
            n += 1
            return f"${n}"

        text = re.sub(r"%s", placeholder, text)
        if text.upper().startswith(("NOTIFY", "LISTEN", "UNLISTEN")):
            await self.conn.execute(text)  # utility statements with no result: simple Query
            return []
        return await self.conn.fetch(text, *params)

    def in_transaction(self) -> bool:
        return self.conn.is_in_transaction()

    def backend_pid(self) -> int:
        return self.conn.get_server_pid()

    async def close(self) -> None:
        await self.conn.close(timeout=5)

    async def abort(self) -> None:
        self.conn.terminate()

    def _on_notify(self, _conn: Any, pid: int, channel: str, payload: str) -> None:
        self.notified(pid, channel, payload)

    async def listen(self, channel: str) -> None:
        await self.conn.add_listener(channel, self._on_notify)

    async def unlisten(self, channel: str) -> None:
        if channel == "*":
            await self.conn.execute("UNLISTEN *")
            self.conn._listeners.clear()
        else:
            await self.conn.remove_listener(channel, self._on_notify)

    async def copy_out(self, query: str) -> list:
        out = io.BytesIO()
        await self.conn.copy_from_query(query[len("COPY ("):query.rindex(") TO STDOUT")], output=out)
        return [tuple(line.split("\t")) for line in out.getvalue().decode().splitlines()]

    async def copy_in(self, values: list[int]) -> None:
        await self.conn.copy_records_to_table(TABLE, records=[(self.index, v) for v in values],
                                              columns=["c", "v"])

    async def cancel_sleep(self) -> tuple:
        try:  # asyncpg sends a CancelRequest when a query's timeout expires
            await self.conn.fetch("SELECT pg_sleep(5)", timeout=CANCEL_AFTER)
            return ("not cancelled",)
        except asyncio.TimeoutError:
            return ("timed out",)

    def error_state(self, exc: BaseException) -> tuple | None:
        if isinstance(exc, asyncpg.PostgresError):
            return ("error", exc.sqlstate)
        return None


CLIENT_KINDS = {"psycopg": PsycopgClient, "asyncpg": AsyncpgClient}


# --- running a script ------------------------------------------------------------------------


@dataclass
class World:
    """Where a script runs: ``dsn`` for the clients, ``admin_dsn`` straight to the primary
    (to reset the table and to wait for a dropped session's locks to go)."""

    name: str
    dsn: str
    admin_dsn: str


@dataclass
class Script:
    steps: list[tuple[int, tuple]]
    kinds: list[str]  # per client: "psycopg" or "asyncpg"
    pool_size: int
    log: list[tuple] = field(default_factory=list)

    async def run(self, world: World) -> list[tuple]:
        await prepare_world(world)
        clients = [CLIENT_KINDS[k](i, world.dsn) for i, k in enumerate(self.kinds)]
        for client in clients:
            await asyncio.wait_for(client.connect(), STEP_TIMEOUT)
        pinned: set[int] = set()
        locks: dict[int, Counter] = {i: Counter() for i in range(len(clients))}
        log: list[tuple] = []
        try:
            for n, (c, op) in enumerate(self.steps):
                client = clients[c]
                holders = {i for i, cl in enumerate(clients) if i in pinned or cl.in_transaction()}
                if c not in holders and len(holders) >= self.pool_size:
                    log.append((n, c, op, "skipped: the pool is held"))
                    continue
                if op[0] == "disconnect":
                    await client.abort()
                    pinned.discard(c)
                    locks[c].clear()
                    await settle_locks(world, locks)
                    clients[c] = client = CLIENT_KINDS[self.kinds[c]](c, world.dsn)
                    await asyncio.wait_for(client.connect(), STEP_TIMEOUT)
                    log.append((n, c, op, ("reconnected",)))
                    continue
                if op[0] in PIN_OPS:
                    pinned.add(c)
                outcome = await run_step(client, op)
                if outcome[0] == "broken":  # carry on with a new connection, as an application would
                    clients[c] = CLIENT_KINDS[self.kinds[c]](c, world.dsn)
                    pinned.discard(c)
                    locks[c].clear()
                    await asyncio.wait_for(clients[c].connect(), STEP_TIMEOUT)
                elif op[0] in ("lock_try", "unlock", "unlock_all") and outcome[0] == "rows":
                    track_locks(locks[c], op, outcome)
                log.append((n, c, op, outcome, "T" if clients[c].in_transaction() else "I"))
        finally:
            for client in clients:
                try:
                    await asyncio.wait_for(client.close(), STEP_TIMEOUT)
                except Exception:
                    await client.abort()
        return log


def track_locks(held: Counter, op: tuple, outcome: tuple) -> None:
    answer = outcome[1][0][0] if outcome[1] else None
    if op[0] == "lock_try" and answer == "True":
        held[op[1]] += 1
    elif op[0] == "unlock" and answer == "True":
        held[op[1]] -= 1
    elif op[0] == "unlock_all":
        held.clear()


async def run_step(client: Client, op: tuple) -> tuple:
    try:
        return await asyncio.wait_for(client.run(op), STEP_TIMEOUT)
    except asyncio.TimeoutError:
        await client.abort()
        return ("broken", f"no answer in {STEP_TIMEOUT:g} s")
    except Exception as exc:  # noqa: BLE001  (the outcome is the error)
        state = client.error_state(exc)
        if state is not None:
            return state
        try:
            await client.abort()
        except Exception:  # noqa: BLE001
            pass
        return ("broken", type(exc).__name__)


async def prepare_world(world: World) -> None:
    async with await psycopg.AsyncConnection.connect(world.admin_dsn, autocommit=True,
                                                     connect_timeout=10) as conn:
        await conn.execute(f"CREATE TABLE IF NOT EXISTS {TABLE} (c int, v int)")
        await conn.execute(f"GRANT ALL ON {TABLE} TO PUBLIC")
        await conn.execute("SET lock_timeout = '5s'")  # a lock a proxied session kept is a failure
        for c in range(MAX_CLIENTS):  # "ddl": a table per client, which only that client alters
            await conn.execute(f"DROP TABLE IF EXISTS {TABLE}_{c}")
            await conn.execute(f"CREATE TABLE {TABLE}_{c} (a int, b int)")
            await conn.execute(f"INSERT INTO {TABLE}_{c} VALUES (1, 2)")
            await conn.execute(f"ALTER TABLE {TABLE}_{c} OWNER TO app")
        await conn.execute(f"DELETE FROM {TABLE}")  # TRUNCATE would wait for a dropped session's lock
    await settle_locks(world, {})


async def settle_locks(world: World, locks: dict[int, Counter]) -> None:
    """Wait until the advisory locks held on the primary are the live clients' (a dropped
    session's go when its server session ends or the proxy cleans its connection)."""
    want = sorted({LOCK_BASE + k for held in locks.values() for k, n in held.items() if n > 0})
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_TIMEOUT
    async with await psycopg.AsyncConnection.connect(world.admin_dsn, autocommit=True,
                                                     connect_timeout=10) as conn:
        while True:
            cur = await conn.execute(
                "SELECT DISTINCT objid::bigint FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND objid BETWEEN %s AND %s ORDER BY 1", (LOCK_BASE, LOCK_BASE + 100))
            have = [r[0] for r in await cur.fetchall()]
            if have == want:
                return
            if loop.time() > deadline:
                raise AssertionError(f"{world.name}: advisory locks held on the primary {have}, "
                                     f"the live clients hold {want}")
            await asyncio.sleep(0.05)


def first_difference(direct: list[tuple], proxied: list[tuple]) -> str:
    for d, p in zip(direct, proxied):
        if d != p:
            return f"step {d[0]} (client {d[1]}, {d[2]!r}):\n  directly:      {d[3:]!r}\n  through proxy: {p[3:]!r}"
    return f"logs of different length: {len(direct)} vs {len(proxied)}"
