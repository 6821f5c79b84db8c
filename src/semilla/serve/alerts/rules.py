"""Alerting rules in Prometheus' own file format, read and checked for the in-process evaluator.

The file semilla ships (`rules.yml` beside this module, `DEFAULT_RULES`) is the one operators
load into Prometheus (`rule_files:`) and the one `semilla serve` evaluates by itself; a file of
one's own is `semilla serve --alert-rules FILE`. Only alerting rules are taken (`alert`, `expr`,
`for`, `keep_firing_for`, `labels`, `annotations`); every problem of the file is reported in one
line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import promql_parser as pq
import yaml

from semilla.errors import SemillaError
from semilla.serve.alerts import promql

DEFAULT_RULES = Path(__file__).with_name("rules.yml")
RULE_FIELDS = ("alert", "expr", "for", "keep_firing_for", "labels", "annotations")
TEMPLATE = re.compile(r"\{\{\s*\$(value|labels\.([A-Za-z_][A-Za-z0-9_]*))\s*\}\}")


class AlertRulesError(SemillaError):
    """The alerting rules file cannot be used (the message names each problem)."""


@dataclass
class AlertRule:
    name: str
    expr: str
    node: object  # the parsed expression (promql_parser)
    for_s: float = 0.0  # true this long before it fires (pending until then)
    keep_firing_for_s: float = 0.0  # hysteresis: false this long before a firing alert resolves
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    group: str = ""

    def window_s(self) -> float:
        """The longest range selector of the expression (how much history it reads)."""
        longest = 0.0
        for match in re.finditer(r"\[([0-9a-z]+)\]", self.expr):
            longest = max(longest, seconds(match.group(1)))
        return longest

    def describe(self) -> dict:
        return {
            "name": self.name,
            "group": self.group,
            "expr": self.expr,
            "for_s": self.for_s,
            "keep_firing_for_s": self.keep_firing_for_s,
            "labels": self.labels,
            "annotations": self.annotations,
        }


def seconds(duration: str) -> float:
    """A Prometheus duration ('90s', '5m', '1h30m') in seconds; ValueError for anything else."""
    text = str(duration)
    if re.fullmatch(r"0+(ms|s|m|h|d|w|y)?", text):  # Prometheus' zero; the parser refuses it
        return 0.0
    return pq.parse_duration(text).total_seconds()


def render(template: str, labels: dict[str, str], value: float) -> str:
    """An annotation with Prometheus' `{{ $value }}` and `{{ $labels.NAME }}` filled in."""

    def fill(match: re.Match) -> str:
        if match.group(1) == "value":
            return f"{value:.4g}"
        return labels.get(match.group(2), "")

    return TEMPLATE.sub(fill, template)


def _string_map(where: str, value, problems: list[str]) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        problems.append(f"{where} must map names to text")
        return {}
    return {k: str(v) for k, v in value.items()}


def _read_rule(raw, group: str, where: str, problems: list[str]) -> AlertRule | None:
    if not isinstance(raw, dict):
        problems.append(f"{where}: a rule must be a mapping with alert and expr")
        return None
    if "record" in raw:
        problems.append(f"{where}: recording rules are not evaluated here, only alerting rules")
        return None
    name, expr = raw.get("alert"), raw.get("expr")
    if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        problems.append(f"{where}: alert must be a name of letters, digits and '_', got {name!r}")
        return None
    where = f"{where} ({name})"
    unknown = [key for key in raw if key not in RULE_FIELDS]
    if unknown:
        problems.append(f"{where}: unknown field {unknown[0]!r} (fields: {', '.join(RULE_FIELDS)})")
    if not isinstance(expr, str | int | float) or not str(expr).strip():
        problems.append(f"{where}: expr must be a PromQL expression")
        return None
    try:
        node = promql.parse(str(expr))
    except ValueError as e:
        problems.append(f"{where}: bad expr {str(expr)!r}: {e}")
        return None
    rule = AlertRule(name, str(expr), node, group=group)
    for key, attr in (("for", "for_s"), ("keep_firing_for", "keep_firing_for_s")):
        if key in raw:
            try:
                setattr(rule, attr, seconds(raw[key]))
            except ValueError:
                problems.append(f"{where}: {key} must be a duration such as 30s or 5m, got {raw[key]!r}")
    rule.labels = _string_map(f"{where}: labels", raw.get("labels"), problems)
    rule.annotations = _string_map(f"{where}: annotations", raw.get("annotations"), problems)
    return rule


def load_rules(path: str | Path = "") -> list[AlertRule]:
    """The alerting rules of `path` (empty: the ones semilla ships); AlertRulesError naming
    every problem, in one line."""
    path = Path(path) if path else DEFAULT_RULES
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise AlertRulesError(
            f"cannot read the alert rules {path}: {getattr(e, 'strerror', None) or e}"
        ) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise AlertRulesError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    groups = raw.get("groups") if isinstance(raw, dict) else None
    if not isinstance(groups, list):
        raise AlertRulesError(f"{path}: an alert rules file must have groups: [{{name, rules: [...]}}]")
    problems: list[str] = []
    rules: list[AlertRule] = []
    for i, group in enumerate(groups):
        name = group.get("name", f"#{i + 1}") if isinstance(group, dict) else f"#{i + 1}"
        entries = group.get("rules") if isinstance(group, dict) else None
        if not isinstance(entries, list):
            problems.append(f"group {name}: rules must be a list")
            continue
        for j, entry in enumerate(entries):
            rule = _read_rule(entry, str(name), f"group {name} rule {j + 1}", problems)
            if rule is not None:
                rules.append(rule)
    if problems:
        raise AlertRulesError(f"invalid alert rules {path}: " + "; ".join(problems))
    return rules
