"""The operating-system side of a sandbox: free ports, the OS user servers run as, processes
seen through /proc, and polling with a deadline.

Kept apart from the cluster logic because it knows nothing about PostgreSQL beyond the names
of its shared-memory files; `SandboxError`, the error of every sandbox operation, lives here
as the bottom of the package.
"""

from __future__ import annotations

import os
import pwd
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

import psycopg

T = TypeVar("T")

LOCALHOST = "127.0.0.1"


class SandboxError(RuntimeError):
    """A sandbox operation failed (a command exited non-zero, a node misbehaved...)."""


# --------------------------------------------------------------------------- ports

_handed_out_ports: set[int] = set()
_ports_lock = threading.Lock()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (and not handed out before by this process)."""
    with _ports_lock:
        for _ in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.bind((LOCALHOST, 0))
                port = s.getsockname()[1]
            if port not in _handed_out_ports:
                _handed_out_ports.add(port)
                return port
    raise SandboxError("could not find a free TCP port on 127.0.0.1")


def _port_accepts(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection((LOCALHOST, port), timeout=timeout):
            return True
    except OSError:
        return False


# --------------------------------------------------------------------------- processes


def _running_as_root() -> bool:
    return os.geteuid() == 0


@lru_cache(maxsize=1)
def _postgres_ids() -> tuple[int, int]:
    try:
        pw = pwd.getpwnam("postgres")
    except KeyError:
        raise SandboxError(
            "running as root but there is no 'postgres' OS user to run the servers as"
        ) from None
    return pw.pw_uid, pw.pw_gid


def _chown(path: Path) -> None:
    if _running_as_root():
        uid, gid = _postgres_ids()
        os.chown(path, uid, gid)


def _server_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env["LC_ALL"] = "C"
    env.pop("LANG", None)
    return env


def _as_server_user(cmd: Sequence[str]) -> list[str]:
    cmd = [str(c) for c in cmd]
    if _running_as_root():
        _postgres_ids()
        return ["runuser", "-u", "postgres", "--", *cmd]
    return cmd


def _proc_state(pid: int) -> tuple[str, int, str] | None:
    """(state, ppid, comm) of a live process, None if it does not exist."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read().decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm is in parentheses and may contain spaces or parentheses itself
    lpar, rpar = data.index("("), data.rindex(")")
    comm = data[lpar + 1:rpar]
    rest = data[rpar + 2:].split()
    return rest[0], int(rest[1]), comm


def _alive(pid: int) -> bool:
    st = _proc_state(pid)
    return st is not None and st[0] not in ("Z", "X")


def _children(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_state(int(entry))
            if st is not None and st[1] == pid:
                kids.append(int(entry))
    return kids


_DSM_CONTROL_MAGIC = 0x9A503D32  # PG_DYNSHMEM_CONTROL_MAGIC (dsm.c)


def _mapped_dsm_files(pids: Iterable[int]) -> set[str]:
    """PostgreSQL dynamic shared memory files (/dev/shm/PostgreSQL.N) of a postmaster and
    its children: the ones they map, plus every segment the control segment lists (a
    segment may exist while no process maps it). Best effort; used after SIGKILL."""
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps") as f:
                for line in f:
                    m = re.search(r"(/dev/shm/PostgreSQL\.\d+)$", line.rstrip("\n"))
                    if m:
                        found.add(m.group(1))
        except OSError:
            pass
    listed: set[str] = set()
    for path in found:
        try:
            with open(path, "rb") as f:
                head = f.read(16)
                if len(head) < 16:
                    continue
                magic, nitems, maxitems = struct.unpack_from("=III", head)
                if magic != _DSM_CONTROL_MAGIC or nitems > maxitems or nitems > 100_000:
                    continue
                # dsm_control_item on 64-bit: handle u32, refcnt u32, first_page, npages,
                # impl_private_pm_handle (8 bytes each), pinned bool (+ padding) = 40 bytes
                items = f.read(40 * nitems)
            for i in range(len(items) // 40):
                handle, refcnt = struct.unpack_from("=II", items, 40 * i)
                if refcnt:
                    listed.add(f"/dev/shm/PostgreSQL.{handle}")
        except (OSError, struct.error):
            pass
    return found | listed


def _poll(predicate: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Call ``predicate`` until it returns a truthy value, or raise TimeoutError(what)."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except (psycopg.Error, OSError) as exc:
            last_exc = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_exc})" if last_exc else ""
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)
