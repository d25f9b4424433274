"""deploy/: the alert rules pass promtool's check and their own unit tests (alerts_test.yml),
every alert is tested both firing and silent, and the dashboard's queries are valid PromQL.

promtool comes from Debian's `prometheus` package, which scripts/install.sh installs: these
tests fail (they do not skip) where it is missing. That the metrics named exist is checked
against a running proxy in tests/integration/test_deploy_metrics.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.support.promql import (
    ALERTS,
    ALERTS_TEST,
    DASHBOARD,
    dashboard_expressions,
    metric_names,
    rule_expressions,
)


def promtool(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("promtool")
    assert exe, "promtool is missing: scripts/install.sh installs it (Debian package prometheus)"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_pass_promtool_check() -> None:
    done = promtool("check", "rules", str(ALERTS))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_rules_pass_their_unit_tests() -> None:
    done = promtool("test", "rules", ALERTS_TEST.name, cwd=ALERTS_TEST.parent)
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    alerts = {name for name, _ in rule_expressions()}
    fired, silent = set(), set()
    for case in yaml.safe_load(ALERTS_TEST.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else silent).add(check["alertname"])
    assert alerts - fired == set(), "alerts no test sees firing"
    assert alerts - silent == set(), "alerts no test sees silent"
    assert (fired | silent) - alerts == set(), "tests of alerts that do not exist"


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    # promtool parses the queries as recording rules (Grafana's variables given values)
    rules = [{"record": f"dashboard:query_{i}", "expr": expr}
             for i, (_, expr) in enumerate(dashboard_expressions())]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr


def test_dashboard_panels_use_the_datasource_variable() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        for target in [panel, *panel["targets"]]:
            assert target["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]


@pytest.mark.parametrize("expr, names", [
    ('max by (job, instance) (pgsplit_split_brain) == 1', {"pgsplit_split_brain"}),
    ('histogram_quantile(0.99, sum by (le, role) (rate(a_bucket{role="x", le!="+Inf"}[5m])))', {"a_bucket"}),
    ('sum(rate(a_total{outcome="fallback"}[10m])) / sum(rate(a_total[10m])) > 0.25 and on (instance) b > bool 1',
     {"a_total", "b"}),
    ('c offset 1h30m unless ignoring(backend) group_left(role) d', {"c", "d"}),
    ('label_replace(e, "dst", "$1", "src", "(.*)")', {"e"}),
])
def test_metric_names_of_an_expression(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names
