"""CPU time of a target's processes, from /proc: what a proxy costs per transaction.

A target's CPU is that of its process and every descendant (Pgpool-II serves each client
in a forked child; pgsplit, PgBouncer and the framing relay are one process and count
alone). A live process counts with its own utime/stime; one that ended and was reaped
counts through its parent's cutime/cstime, so a child that exits during a run is not lost."""

from __future__ import annotations

import os
from collections import defaultdict

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    """/proc/PID/stat from field 3 (state) on: the command name may hold spaces."""
    with open(f"/proc/{pid}/stat") as f:
        text = f.read()
    return text[text.rindex(")") + 2:].split()


def tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of `pid` and its descendants; OSError if pid is gone."""
    children: dict[int, list[int]] = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children[int(_stat(entry)[1])].append(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # ended meanwhile
    user = system = 0
    todo = [pid]
    while todo:
        p = todo.pop()
        try:
            f = _stat(p)
        except OSError:
            if p == pid:
                raise
            continue
        # fields 14-17 of proc(5): utime, stime, cutime, cstime (in clock ticks)
        user += int(f[11]) + int(f[13])
        system += int(f[12]) + int(f[14])
        todo += children.get(p, [])
    return user / CLK_TCK, system / CLK_TCK
