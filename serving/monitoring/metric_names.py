"""Every metric name the alert rules and the Grafana dashboard read, for checking against a
live server's /metrics (so that no panel or alert watches a series nobody exports).

Names are the series names as they appear in /metrics (histograms with their `_bucket`,
`_sum`, `_count` suffix). `metric_names.txt` beside this file holds the current list:

    python -m serving.monitoring.metric_names           # print the list
    python -m serving.monitoring.metric_names --write   # refresh metric_names.txt
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml

MONITORING_DIR = Path(__file__).resolve().parent
ALERTS_PATH = MONITORING_DIR / "alerts.yml"
DASHBOARDS_DIR = MONITORING_DIR / "grafana" / "dashboards"
NAMES_PATH = MONITORING_DIR / "metric_names.txt"

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "offset",
        "inf",
        "nan",
        "atan2",
    }
)
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_MATCHERS = re.compile(r"\{[^{}]*\}")
_RANGES = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_OFFSETS = re.compile(r"\boffset\s+-?[0-9a-zA-Z]+")
_VARIABLES = re.compile(r"\$\{?\w+\}?")
_NUMBERS = re.compile(r"(?<![A-Za-z0-9_:])\d+(?:\.\d*)?(?:[eE][+-]?\d+)?")
_IDENTIFIER = re.compile(r"[A-Za-z_:][A-Za-z0-9_:]*")


def promql_metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (functions, keywords and labels left out)."""
    text = _VARIABLES.sub(" ", expr)
    text = _STRINGS.sub(" ", text)
    text = _MATCHERS.sub(" ", text)
    text = _RANGES.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _OFFSETS.sub(" ", text)
    text = _NUMBERS.sub(" ", text)
    names = set()
    for match in _IDENTIFIER.finditer(text):
        following = text[match.end() :].lstrip()
        if following.startswith("("):
            continue  # a function or aggregation
        if match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def alert_expressions(path: Path = ALERTS_PATH) -> list[str]:
    """The `expr` of every alerting and recording rule in a Prometheus rules file."""
    rules = yaml.safe_load(path.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def _panels(panels: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))  # panels nested in collapsed rows


def dashboard_expressions(directory: Path = DASHBOARDS_DIR) -> list[str]:
    """The `expr` of every target of every panel of every dashboard JSON in `directory`."""
    exprs: list[str] = []
    for path in sorted(directory.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in _panels(dashboard.get("panels", [])):
            exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    return exprs


def metric_names_used(alerts: Path = ALERTS_PATH, dashboards: Path = DASHBOARDS_DIR) -> list[str]:
    """Sorted metric names read by the alert rules and the dashboards."""
    names: set[str] = set()
    for expr in alert_expressions(alerts) + dashboard_expressions(dashboards):
        names |= promql_metric_names(expr)
    return sorted(names)


def model_server_metric_names() -> list[str]:
    """The names a live MLServer /metrics must export (not `up`, not the gateway's)."""
    return [name for name in metric_names_used() if name != "up" and not name.startswith("kronos_gateway_")]


def main(argv: Sequence[str] | None = None) -> int:
    """Print the names, or write them to metric_names.txt with --write."""
    parser = argparse.ArgumentParser(description="metric names used by alerts and dashboards")
    parser.add_argument("--write", action="store_true", help=f"write {NAMES_PATH.name}")
    args = parser.parse_args(argv)
    text = "\n".join(metric_names_used()) + "\n"
    if args.write:
        NAMES_PATH.write_text(text)
    else:
        sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
