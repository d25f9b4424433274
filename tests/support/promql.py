"""The PromQL expressions of deploy/ (the Grafana dashboard, the alert rules) and the metric
names they use.

There is no PromQL parser for Python, so `metric_names` takes the language apart only as
far as a name is concerned: strings, label matchers `{...}`, ranges `[...]` and the label
lists of `by`/`without`/`on`/`ignoring`/`group_left`/`group_right` are removed; what is
left is an identifier followed by `(` (a function or an aggregation), a keyword, or a
metric name. A misspelt metric stays a name (and is then not found among those exported);
a misspelt function is caught by promtool (tests/unit/test_alert_rules.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "pgsplit.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = ROOT / "deploy" / "prometheus" / "alerts_test.yml"

# Grafana's variables, given values that make an expression plain PromQL.
GRAFANA_VARIABLES = {"$__rate_interval": "5m", "$__range": "1h", "$__interval": "1m", "$instance": ".*"}

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
# numbers, and durations (`offset 5m`, `1h30m`)
_NUMBER = re.compile(r"\b\d+(\.\d+)?(e[+-]?\d+)?((ms|s|m|h|d|w|y)(\d+(ms|s|m|h|d|w|y))*)?\b", re.IGNORECASE)
_IDENT = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "on", "ignoring",
             "group_left", "group_right", "inf", "nan", "atan2"}


def metric_names(expr: str) -> set[str]:
    """The metric names an expression reads."""
    text = _STRING.sub("", expr)
    text = _MATCHERS.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    text = _NUMBER.sub(" ", text)
    names = set()
    for match in _IDENT.finditer(text):
        name = match.group()
        if name.lower() in _KEYWORDS or text[match.end():].lstrip().startswith("("):
            continue  # a keyword, or a function / aggregation called here
        names.add(name)
    return names


def plain(expr: str) -> str:
    """A dashboard expression with Grafana's variables replaced by values."""
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_expressions(path: Path = DASHBOARD) -> list[tuple[str, str]]:
    """(where, expression) for every query of the dashboard, its variables' queries too."""
    dashboard = json.loads(path.read_text())
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((f"panel {panel['title']!r} {target['refId']}", plain(target["expr"])))
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            # label_values(EXPR, label): the label is not a metric
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query["query"])
            found.append((f"variable {variable['name']!r}", plain(match.group(1) if match else query["query"])))
    return found


def rule_expressions(path: Path = ALERTS) -> list[tuple[str, str]]:
    """(alert name, expression) for every rule of a rules file."""
    rules = yaml.safe_load(path.read_text())
    return [(rule.get("alert") or rule["record"], rule["expr"])
            for group in rules["groups"] for rule in group["rules"]]


def all_expressions() -> list[tuple[str, str]]:
    return dashboard_expressions() + [(f"alert {name}", expr) for name, expr in rule_expressions()]
