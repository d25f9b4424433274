"""loadtest.bench.cpu on real processes: a child's CPU counts for its parent's tree while
it runs and after it was reaped."""

from __future__ import annotations

import subprocess
import sys

from loadtest.bench.cpu import tree_cpu_seconds

CHILD = """
import sys, time
while time.process_time() < 0.5:  # 0.5 s of CPU (clock reads are system calls)
    pass
print("burnt", flush=True)
sys.stdin.read()
"""

PARENT = f"""
import subprocess, sys
sys.stdin.readline()
child = subprocess.Popen([sys.executable, "-c", {CHILD!r}], stdin=subprocess.PIPE)
sys.stdin.readline()
child.stdin.close()
child.wait()
print("reaped", flush=True)
sys.stdin.readline()
"""


def test_a_child_counts_while_it_runs_and_after_it_was_reaped():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        u0, s0 = tree_cpu_seconds(parent.pid)
        parent.stdin.write("go\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "burnt"
        u1, s1 = tree_cpu_seconds(parent.pid)
        assert (u1 + s1) - (u0 + s0) >= 0.45  # the live child's utime + stime
        assert u1 > u0 and s1 >= s0
        parent.stdin.write("end the child\n")
        parent.stdin.flush()
        assert parent.stdout.readline().strip() == "reaped"
        u2, s2 = tree_cpu_seconds(parent.pid)
        assert u2 >= u1 and s2 >= s1  # moved to the parent's cutime/cstime, not lost
    finally:
        parent.stdin.close()
        parent.wait(10)
        parent.stdout.close()


def test_a_process_that_is_gone_raises():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait(10)
    try:
        tree_cpu_seconds(p.pid)
    except OSError:
        return
    raise AssertionError("no OSError for a reaped pid")
