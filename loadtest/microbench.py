"""CPU cost of the proxy's hot path per unit of work, without sockets.

Drives a real ClientSession and ServerConnection through fake transports: the client's
bytes go in, the server's canned replies come back, and the time per round trip (and per
pgbench tpcb-like transaction) is the proxy's own Python work (no syscalls, no other
processes). Use it to compare changes to the hot path; the end-to-end figures come from
loadtest.bench. Times on shared 2-core machines vary by tens of percent from run to run;
instruction counts do not (`valgrind --tool=callgrind` of two runs with different
--units: the difference over the extra units is the cost of one).

    python -m loadtest.microbench [--units 200000] [--profile]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time

from proxy import wire
from proxy.app import Proxy
from proxy.config import parse_config
from proxy.server.connection import ServerConnection
from proxy.session.client import ClientSession, State

CONFIG = """
active = "main"
[[users]]
name = "app"
password = "x"
[backends.p]
host = "127.0.0.1"
port = 1
[backends.r]
host = "127.0.0.1"
port = 2
[clusters.main]
primary = "p"
replicas = ["r"]
"""


class FakeTransport:
    def __init__(self):
        self.out = []

    def write(self, data):
        self.out.append(data)

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def is_closing(self):
        return False

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 5555) if name == "peername" else default

    def set_write_buffer_limits(self, high=None, low=None):
        pass

    def close(self):
        pass


def build(replicas: bool):
    text = CONFIG if replicas else CONFIG.replace('replicas = ["r"]', "replicas = []")
    app = Proxy(parse_config(text))
    session = ClientSession(app)
    session.connection_made(FakeTransport())
    session.user = session.database = "app"
    session.state = State.READY
    servers = {}
    for b in app.topology.current.backends:
        pool = app.pool_for(b, "app", "app")
        conn = ServerConnection(b.name, b.host, b.port, "app", "app", pool=pool)
        conn.connection_made(FakeTransport())
        pool.idle.append(conn)
        servers[b.name] = conn
    return app, session, servers


def simple_reply(rows: int = 1) -> bytes:
    out = wire.row_description(["abalance"])
    out += wire.data_row(["42"]) * rows
    return out + wire.command_complete("SELECT 1") + wire.ready_for_query()


def run(units: int, replicas: bool, mode: str) -> float:
    app, session, servers = build(replicas)
    if mode == "simple":
        requests = [wire.query(f"SELECT abalance FROM pgbench_accounts WHERE aid = {i % 100000};") for i in range(1000)]
        reply = simple_reply()
    else:  # prepared: Bind/Execute/Sync of a statement prepared once
        prep = wire.build_parse(b"P_1", b"SELECT abalance FROM pgbench_accounts WHERE aid = $1;", b"\0\0") + wire.SYNC
        session.data_received(prep)
        for conn in servers.values():
            if conn.steps:
                conn.data_received(wire.PARSE_COMPLETE + wire.ready_for_query())
        bind = wire.build_bind(b"", b"P_1", b"\0\0\0\1\0\0\0\0\0\0")
        requests = [bind + wire.message(wire.F_EXECUTE, b"\0\0\0\0\0") + wire.SYNC]
        reply = wire.BIND_COMPLETE + wire.data_row(["42"]) + wire.command_complete("SELECT 1") + wire.ready_for_query()
    n = len(requests)
    t0 = time.perf_counter()
    for i in range(units):
        session.data_received(requests[i % n])
        server = session.server
        server.data_received(reply)
    elapsed = time.perf_counter() - t0
    return elapsed / units * 1e6


# pgbench's tpcb-like transaction in simple protocol, and the server's replies to what the
# proxy sends for each statement (the proxy answers the BEGIN and sends it with the UPDATE).
# Like pgbench, every transaction draws new constants (scale 10).
TPCB = [
    ("BEGIN;", None),
    ("UPDATE pgbench_accounts SET abalance = abalance + {delta} WHERE aid = {aid};", ["BEGIN", "UPDATE 1"]),
    ("SELECT abalance FROM pgbench_accounts WHERE aid = {aid};", ["SELECT 1"]),
    ("UPDATE pgbench_tellers SET tbalance = tbalance + {delta} WHERE tid = {tid};", ["UPDATE 1"]),
    ("UPDATE pgbench_branches SET bbalance = bbalance + {delta} WHERE bid = {bid};", ["UPDATE 1"]),
    ("INSERT INTO pgbench_history (tid, bid, aid, delta, mtime) VALUES ({tid}, {bid}, {aid}, {delta}, CURRENT_TIMESTAMP);",
     ["INSERT 0 1"]),
    ("END;", ["COMMIT"]),
]


def run_tpcb(transactions: int) -> float:
    """Time per tpcb-like transaction (simple protocol, primary only), in microseconds."""
    app, session, servers = build(False)
    replies = []
    for _sql, tags in TPCB:
        reply = None
        if tags is not None:
            reply = b"".join(
                (wire.row_description(["abalance"]) + wire.data_row(["5"]) if tag.startswith("SELECT") else b"")
                + wire.command_complete(tag) + wire.ready_for_query(wire.TX_IDLE if tag == "COMMIT" else wire.TX_IN_BLOCK)
                for tag in tags)
        replies.append(reply)
    draw = random.Random(1)
    variants = []
    for _ in range(1000):
        values = dict(aid=draw.randint(1, 1000000), tid=draw.randint(1, 100), bid=draw.randint(1, 10),
                      delta=draw.randint(-5000, 5000))
        variants.append([(wire.query(sql.format(**values)), reply) for (sql, _), reply in zip(TPCB, replies)])
    outs = [session.transport.out] + [conn.transport.out for conn in servers.values()]
    t0 = time.perf_counter()
    for i in range(transactions):
        for out in outs:
            out.clear()
        for request, reply in variants[i % 1000]:
            session.data_received(request)
            if reply is not None:
                session.server.data_received(reply)
    elapsed = time.perf_counter() - t0
    if session.server is not None or session.status != wire.TX_IDLE:
        raise RuntimeError("the tpcb-like transaction did not end")
    return elapsed / transactions * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", type=int, default=100000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    async def go():
        for replicas in (False, True):
            for mode in ("simple", "prepared"):
                run(2000, replicas, mode)  # warm caches
                us = run(args.units, replicas, mode)
                print(f"{'replicas' if replicas else 'primary only':<13} {mode:<9} {us:6.2f} us/unit")
        run_tpcb(200)
        us = run_tpcb(max(1, args.units // 7))
        print(f"{'primary only':<13} {'tpcb-like':<9} {us:6.2f} us/transaction (simple protocol, 7 statements)")

    if args.profile:
        import cProfile
        import pstats

        async def prof():
            run(2000, True, "simple")
            pr = cProfile.Profile()
            pr.enable()
            run(args.units, True, "simple")
            pr.disable()
            pstats.Stats(pr).sort_stats("tottime").print_stats(25)

        asyncio.run(prof())
    else:
        asyncio.run(go())


if __name__ == "__main__":
    main()
