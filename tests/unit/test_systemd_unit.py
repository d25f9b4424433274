"""deploy/systemd/pgsplit.service runs a command line pgsplit's own parser accepts, reloads
and stops with the signals the proxy handles, and carries the CPU priority advice of
docs/operations.md. (`systemd-analyze verify` needs systemd, which CI machines lack; it was
run by hand, see docs/operations.md.)"""

from __future__ import annotations

import configparser
import shlex
from pathlib import Path

from proxy.cli import build_parser, cmd_run

ROOT = Path(__file__).resolve().parents[2]
UNIT = ROOT / "deploy" / "systemd" / "pgsplit.service"


def service() -> configparser.SectionProxy:
    parser = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    parser.optionxform = str  # systemd's keys are case-sensitive
    parser.read_string(UNIT.read_text())
    return parser["Service"]


def test_exec_start_is_a_pgsplit_run_the_cli_accepts() -> None:
    argv = shlex.split(service()["ExecStart"])
    assert Path(argv[0]).name == "pgsplit"
    args = build_parser().parse_args(argv[1:])
    assert args.func is cmd_run and Path(args.config).is_absolute()


def test_reload_and_stop_use_the_signals_pgsplit_handles() -> None:
    unit = service()
    assert unit["ExecReload"] == "/bin/kill -HUP $MAINPID"  # serve(): SIGHUP reloads
    assert unit["KillSignal"] == "SIGTERM"  # serve(): SIGINT or SIGTERM stop


def test_cpu_priority_as_operations_md_advises() -> None:
    assert service()["Nice"] == "-10"
    assert "`Nice=-10` in its systemd unit" in (ROOT / "docs" / "operations.md").read_text()
