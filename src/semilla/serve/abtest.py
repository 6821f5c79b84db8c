"""The A/B report: each A/B route's variants side by side (traffic, errors, latency, tokens,
user feedback) and whether the feedback difference is significant.

Feedback is counted on the completions each variant's model answered (the request log's
`model`), thumbs up or 4-5 stars being good. Each variant is compared with the route's first
(the control) by a two-sided two-proportion z-test on the share of good ratings.
"""

from __future__ import annotations

import math

from prometheus_client import REGISTRY
from sqlalchemy import select

from semilla.serve.accounts.db import Completion, Feedback
from semilla.serve.accounts.records import is_positive

SIGNIFICANT_P = 0.05


def two_proportion_z_test(good_a: int, n_a: int, good_b: int, n_b: int) -> dict | None:
    """z and the two-sided p-value of 'the good shares of A and B differ'; None without data
    on both sides (or no variance: all good or all bad)."""
    if not n_a or not n_b:
        return None
    pooled = (good_a + good_b) / (n_a + n_b)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n_a + 1 / n_b))
    if se == 0:
        return None
    z = (good_b / n_b - good_a / n_a) / se
    p = math.erfc(abs(z) / math.sqrt(2))
    return {"z": z, "p_value": p, "significant": p < SIGNIFICANT_P}


def feedback_by_model(store, models: list[str]) -> dict[str, dict[str, int]]:
    """{model: {"good", "bad"}} over every rated completion of these models."""
    counts = {m: {"good": 0, "bad": 0} for m in models}
    q = (
        select(Completion.model, Feedback.rating, Feedback.scale)
        .join(Completion, Completion.id == Feedback.completion_id)
        .where(Completion.model.in_(models))
    )
    with store.read() as s:
        for model, rating, scale in s.execute(q):
            counts[model]["good" if is_positive(rating, scale) else "bad"] += 1
    return counts


def _sample(name: str, route: str, variant: str) -> float:
    return REGISTRY.get_sample_value(name, {"route": route, "variant": variant}) or 0.0


def variant_metrics(route: str, variant: str) -> dict:
    """Since the server started: requests, errors, completion tokens, mean latency."""
    requests = _sample("semilla_ab_requests_total", route, variant)
    errors = _sample("semilla_ab_errors_total", route, variant)
    timed = _sample("semilla_ab_latency_seconds_count", route, variant)
    return {
        "requests": int(requests),
        "errors": int(errors),
        "error_rate": errors / requests if requests else None,
        "completion_tokens": int(_sample("semilla_ab_completion_tokens_total", route, variant)),
        "mean_latency_s": _sample("semilla_ab_latency_seconds_sum", route, variant) / timed
        if timed
        else None,
    }


def report(router, store) -> list[dict]:
    """GET /admin/ab: every A/B route with its variants and their comparison with the control."""
    out = []
    for name, split in router.splits().items():
        up = split.available()
        feedback = feedback_by_model(store, list(split.weights)) if store is not None else {}
        variants = []
        for variant, share in split.weights.items():
            rated = feedback.get(variant, {"good": 0, "bad": 0})
            n = rated["good"] + rated["bad"]
            variants.append({
                "variant": variant, "weight": share, "up": up[variant], **variant_metrics(name, variant),
                "feedback": {**rated, "score": rated["good"] / n if n else None},
            })  # fmt: skip
        control = variants[0]
        for v in variants[1:]:
            a, b = control["feedback"], v["feedback"]
            v["vs_control"] = two_proportion_z_test(
                a["good"], a["good"] + a["bad"], b["good"], b["good"] + b["bad"]
            )
        out.append({"route": name, "control": control["variant"], "variants": variants})
    return out
