"""The part of PromQL that alerting rules over one process's metrics need, evaluated in-process.

Expressions are parsed by `promql-parser` (the PromQL grammar of Prometheus itself); this
module evaluates the parsed tree over `MetricHistory`, snapshots of the process's Prometheus
registry. Supported: number literals, instant selectors with `=`, `!=`, `=~`, `!~` matchers,
`rate()` and `increase()` of a range selector, `histogram_quantile()`, `abs()`,
`sum|min|max|avg|count [by|without (labels)]`, arithmetic and comparisons (`bool` too) between
a vector and a scalar or two vectors with the same labels. Anything else is refused when the
rules are loaded, so a rule is never silently wrong.

rate() and increase() take the first and last samples of the window (counter resets counted),
without Prometheus' extrapolation to the window's edges: close, and never above the truth.
"""

from __future__ import annotations

import math
import operator
import re
import threading
from collections import deque
from collections.abc import Callable

import promql_parser as pq
from prometheus_client import REGISTRY, CollectorRegistry

from semilla.serve.web.stats import bucket_quantile

Labels = tuple[tuple[str, str], ...]  # sorted (name, value) pairs, __name__ left out
Vector = dict[Labels, float]
Value = float | Vector

ARITHMETIC: dict[str, Callable[[float, float], float]] = {
    "+": operator.add,
    "-": operator.sub,
    "*": operator.mul,
    "/": lambda a, b: a / b if b else (math.nan if a == 0 else math.copysign(math.inf, a)),
}
COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    "<": operator.lt,
    ">=": operator.ge,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
}
AGGREGATIONS: dict[str, Callable[[list[float]], float]] = {
    "sum": sum,
    "min": min,
    "max": max,
    "avg": lambda xs: sum(xs) / len(xs),
    "count": len,
}


class UnsupportedExpression(ValueError):
    """Valid PromQL that this evaluator does not implement."""


class MetricHistory:
    """Readings of a registry over time: `sample()` appends one; readings older than `keep_s`
    are dropped. A reading is {sample name: {labels: value}}."""

    def __init__(self, keep_s: float, registry: CollectorRegistry = REGISTRY):
        self.keep_s, self.registry = keep_s, registry
        self.readings: deque[tuple[float, dict[str, Vector]]] = deque()
        self._lock = threading.Lock()

    def sample(self, now: float) -> None:
        reading: dict[str, Vector] = {}
        for family in self.registry.collect():
            for s in family.samples:
                reading.setdefault(s.name, {})[tuple(sorted(s.labels.items()))] = s.value
        with self._lock:
            self.readings.append((now, reading))
            while self.readings and now - self.readings[0][0] > self.keep_s:
                self.readings.popleft()

    def latest(self, name: str) -> Vector:
        with self._lock:
            return dict(self.readings[-1][1].get(name, {})) if self.readings else {}

    def counter_window(self, name: str, start: float) -> dict[Labels, list[tuple[float, float]]]:
        """Every series of counter `name` as (time, value) points since `start`. A series born
        inside the window (a label's first request) starts from 0 at the reading before it:
        this process made it, so it was 0 then."""
        series: dict[Labels, list[tuple[float, float]]] = {}
        previous: float | None = None
        with self._lock:
            for t, reading in self.readings:
                if t < start:
                    continue
                for labels, value in reading.get(name, {}).items():
                    if labels not in series and previous is not None:
                        series[labels] = [(previous, 0.0)]
                    series.setdefault(labels, []).append((t, value))
                previous = t
        return series


def parse(expr: str):
    """The parsed expression; ValueError naming the problem (syntax, or what is unsupported).
    The tree is evaluated once over no data, which walks every node and checks the result is
    a vector (an alert fires per series)."""
    try:
        node = pq.parse(expr)
    except (ValueError, TypeError) as e:
        raise ValueError(f"not valid PromQL: {e}") from None
    if not isinstance(evaluate(node, MetricHistory(0.0, CollectorRegistry()), 0.0), dict):
        raise UnsupportedExpression("the expression must give a vector, not a number")
    return node


def evaluate(node, history: MetricHistory, now: float) -> Value:
    """The value of a parsed expression at `now`."""
    if isinstance(node, pq.NumberLiteral):
        return float(node.val)
    if isinstance(node, pq.ParenExpr):
        return evaluate(node.expr, history, now)
    if isinstance(node, pq.UnaryExpr):
        value = evaluate(node.expr, history, now)
        return -value if isinstance(value, float) else {k: -v for k, v in value.items()}
    if isinstance(node, pq.VectorSelector):
        return {labels: v for labels, v in _select(node, history, None, now).items()}
    if isinstance(node, pq.Call):
        return _call(node, history, now)
    if isinstance(node, pq.AggregateExpr):
        return _aggregate(node, history, now)
    if isinstance(node, pq.BinaryExpr):
        return _binary(node, history, now)
    raise UnsupportedExpression(f"{type(node).__name__} is not supported here")


def _matches(node) -> Callable[[Labels], bool]:
    tests = []
    for m in node.matchers.matchers:
        op, name, value = str(m.op), m.name, m.value
        if op.startswith("MatchOp.Equal") or op == "=":
            tests.append(lambda d, n=name, v=value: d.get(n, "") == v)
        elif op.startswith("MatchOp.NotEqual") or op == "!=":
            tests.append(lambda d, n=name, v=value: d.get(n, "") != v)
        else:
            pattern = re.compile(value)
            negate = "Not" in op or op == "!~"
            tests.append(lambda d, n=name, p=pattern, neg=negate: bool(p.fullmatch(d.get(n, ""))) != neg)
    return lambda labels: all(test(dict(labels)) for test in tests)


def _select(node, history: MetricHistory, start: float | None, now: float):
    """An instant selector's latest values (start None) or its points since `start`."""
    if node.name is None or node.offset is not None or node.at is not None or node.matchers.or_matchers:
        raise UnsupportedExpression(f"selector {node} must name a metric, without offset, @ or 'or'")
    keep = _matches(node)
    data = history.latest(node.name) if start is None else history.counter_window(node.name, start)
    return {labels: value for labels, value in data.items() if keep(labels)}


def _counter_increase(points: list[tuple[float, float]]) -> float:
    total = 0.0
    for (_, before), (_, after) in zip(points, points[1:], strict=False):
        total += after - before if after >= before else after  # a reset starts again from 0
    return total


def _call(node, history: MetricHistory, now: float) -> Value:
    name, args = node.func.name, list(node.args)
    if name in ("rate", "increase"):
        (matrix,) = args
        if not isinstance(matrix, pq.MatrixSelector):
            raise UnsupportedExpression(f"{name}() takes a range selector such as metric[5m]")
        start = now - matrix.range.total_seconds()
        out: Vector = {}
        for labels, points in _select(matrix.vector_selector, history, start, now).items():
            if len(points) >= 2:
                increase = _counter_increase(points)
                out[labels] = increase if name == "increase" else increase / (points[-1][0] - points[0][0])
        return out
    if name == "histogram_quantile":
        q, vector = evaluate(args[0], history, now), evaluate(args[1], history, now)
        if not isinstance(q, float) or not isinstance(vector, dict):
            raise UnsupportedExpression("histogram_quantile() takes a number and a vector of buckets")
        groups: dict[Labels, list[tuple[float, float]]] = {}
        for labels, value in vector.items():
            le = dict(labels).get("le")
            if le is not None:
                rest = tuple(kv for kv in labels if kv[0] != "le")
                groups.setdefault(rest, []).append((float(le), value))
        quantiles = {k: bucket_quantile(q, sorted(buckets)) for k, buckets in groups.items()}
        return {k: v for k, v in quantiles.items() if v is not None}
    if name == "abs":
        value = evaluate(args[0], history, now)
        return abs(value) if isinstance(value, float) else {k: abs(v) for k, v in value.items()}
    raise UnsupportedExpression(
        f"function {name}() is not supported here (rate, increase, histogram_quantile, abs)"
    )


def _aggregate(node, history: MetricHistory, now: float) -> Vector:
    op = str(node.op)
    if op not in AGGREGATIONS or node.param is not None:
        raise UnsupportedExpression(f"aggregation {op} is not supported here ({', '.join(AGGREGATIONS)})")
    vector = evaluate(node.expr, history, now)
    if not isinstance(vector, dict):
        raise UnsupportedExpression(f"{op} takes a vector")
    names = set(node.modifier.labels) if node.modifier is not None else set()
    without = node.modifier is not None and "Without" in str(node.modifier.type)
    groups: dict[Labels, list[float]] = {}
    for labels, value in vector.items():
        key = tuple(kv for kv in labels if (kv[0] in names) != without)
        groups.setdefault(key, []).append(value)
    return {key: AGGREGATIONS[op](values) for key, values in groups.items()}


def _binary(node, history: MetricHistory, now: float) -> Value:
    op = str(node.op)
    if op not in ARITHMETIC and op not in COMPARISONS:
        raise UnsupportedExpression(f"operator {op} is not supported here")
    modifier = node.modifier
    if modifier is not None and modifier.matching is not None:
        raise UnsupportedExpression("on()/ignoring() matching is not supported here")
    as_bool = modifier is not None and modifier.return_bool
    lhs, rhs = evaluate(node.lhs, history, now), evaluate(node.rhs, history, now)

    def apply(a: float, b: float) -> float | None:
        if op in ARITHMETIC:
            return ARITHMETIC[op](a, b)
        true = COMPARISONS[op](a, b)
        kept = b if isinstance(lhs, float) else a  # a filter keeps the vector's own value
        return float(true) if as_bool else (kept if true else None)

    if isinstance(lhs, float) and isinstance(rhs, float):
        if op in COMPARISONS and not as_bool:
            raise UnsupportedExpression("comparing two numbers needs 'bool'")
        return apply(lhs, rhs)
    if isinstance(lhs, float):
        pairs = {k: (lhs, v) for k, v in rhs.items()}
    elif isinstance(rhs, float):
        pairs = {k: (v, rhs) for k, v in lhs.items()}
    else:  # one-to-one on identical label sets
        pairs = {k: (v, rhs[k]) for k, v in lhs.items() if k in rhs}
    out = {k: apply(a, b) for k, (a, b) in pairs.items()}
    return {k: v for k, v in out.items() if v is not None}
