"""The alerting rules evaluated inside the server, as Prometheus evaluates them.

Every `interval_s` the evaluator reads the process's metrics into a short history, runs the
server's own health check, and evaluates each rule: a series of the expression's result is an
alert instance, *pending* while it has been true for less than the rule's `for`, then *firing*;
a firing alert *resolves* once its series has been absent for `keep_firing_for` (the
hysteresis that keeps a value hovering at the threshold from flapping). Firing and resolving
are logged and handed to `on_change` (the webhook).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from prometheus_client import REGISTRY, CollectorRegistry

from semilla.serve import metrics
from semilla.serve.alerts import promql
from semilla.serve.alerts.rules import AlertRule, render

log = logging.getLogger("semilla.alerts")


def iso(t: float | None) -> str | None:
    return (
        None
        if t is None
        else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
    )


@dataclass
class Alert:
    """One instance of a rule: the rule and one series of its expression."""

    rule: AlertRule
    labels: dict[str, str]
    value: float
    active_since: float  # first seen true
    last_true: float
    fired_at: float | None = None
    resolved_at: float | None = None

    @property
    def status(self) -> str:
        if self.resolved_at is not None:
            return "resolved"
        return "firing" if self.fired_at is not None else "pending"

    def describe(self) -> dict:
        labels = {"alertname": self.rule.name, **self.rule.labels, **self.labels}
        value = self.value if math.isfinite(self.value) else None
        return {
            "name": self.rule.name,
            "status": self.status,
            "labels": labels,
            "annotations": {k: render(v, labels, self.value) for k, v in self.rule.annotations.items()},
            "value": value,
            "started_at": iso(self.fired_at or self.active_since),
            "resolved_at": iso(self.resolved_at),
        }


class AlertEvaluator:
    def __init__(
        self,
        rules: list[AlertRule],
        interval_s: float = 15.0,
        health_check: Callable[[], list[str]] | None = None,
        on_change: Callable[[dict], None] | None = None,
        clock: Callable[[], float] = time.time,
        keep_resolved: int = 100,
        registry: CollectorRegistry = REGISTRY,
    ):
        self.rules, self.interval_s = rules, interval_s
        self.health_check, self.on_change, self.clock = health_check, on_change, clock
        longest = max([r.window_s() for r in rules] + [0.0])
        self.history = promql.MetricHistory(longest + 2 * interval_s, registry)
        self.active: dict[tuple[str, promql.Labels], Alert] = {}
        self.resolved: deque[Alert] = deque(maxlen=keep_resolved)
        self.health: list[str] = []
        self.evaluations = 0

    def tick(self) -> None:
        """Read the metrics once and move every alert on."""
        if self.health_check is not None:
            self.health = self.health_check()
            if self.health:
                metrics.HEALTH_CHECK_FAILURES.inc()
        now = self.clock()
        self.history.sample(now)
        for rule in self.rules:
            try:
                result = promql.evaluate(rule.node, self.history, now)
            except (
                ArithmeticError,
                ValueError,
            ) as e:  # the rules were checked at load; data may still surprise
                log.warning("alert rule %s could not be evaluated: %s", rule.name, e)
                continue
            self._advance(rule, result if isinstance(result, dict) else {}, now)
        self.evaluations += 1

    def _advance(self, rule: AlertRule, result: promql.Vector, now: float) -> None:
        for labels, value in result.items():
            alert = self.active.get((rule.name, labels))
            if alert is None:
                alert = self.active[(rule.name, labels)] = Alert(rule, dict(labels), value, now, now)
            alert.value, alert.last_true = value, now
            if alert.fired_at is None and now - alert.active_since >= rule.for_s:
                alert.fired_at = now
                self._changed(alert)
        for key, alert in list(self.active.items()):
            if key[0] != rule.name or key[1] in result:
                continue
            if alert.fired_at is None:  # pending that went away: never fired, nothing to tell
                del self.active[key]
            elif now - alert.last_true >= rule.keep_firing_for_s:
                alert.resolved_at = now
                del self.active[key]
                self.resolved.appendleft(alert)
                self._changed(alert)
        metrics.ALERTS_FIRING.labels(rule.name).set(
            sum(1 for (name, _), a in self.active.items() if name == rule.name and a.fired_at is not None)
        )

    def _changed(self, alert: Alert) -> None:
        described = alert.describe()
        summary = described["annotations"].get("summary", "")
        labels = ",".join(f"{k}={v}" for k, v in alert.labels.items())
        if alert.status == "firing":
            log.warning("alert firing: %s%s %s", alert.rule.name, f"{{{labels}}}" if labels else "", summary)
        else:
            log.info("alert resolved: %s%s", alert.rule.name, f"{{{labels}}}" if labels else "")
        if self.on_change is not None:
            self.on_change(described)

    async def run(self) -> None:
        """Evaluate every interval until cancelled."""
        while True:
            try:
                self.tick()
            except Exception:  # one bad evaluation must not end alerting for good
                log.exception("alert evaluation failed")
            await asyncio.sleep(self.interval_s)

    def firing(self) -> list[dict]:
        return [a.describe() for a in self.active.values() if a.fired_at is not None]

    def state(self) -> dict:
        """GET /admin/alerts: what fires, what is pending, what resolved lately, and the rules."""
        return {
            "object": "alerts",
            "interval_s": self.interval_s,
            "evaluations": self.evaluations,
            "health": {"ok": not self.health, "problems": self.health},
            "firing": self.firing(),
            "pending": [a.describe() for a in self.active.values() if a.fired_at is None],
            "resolved": [a.describe() for a in self.resolved],
            "rules": [r.describe() for r in self.rules],
        }
