"""Prometheus metrics (prometheus-client's default registry, served at /metrics).

Latency histograms have buckets fine enough to read P50/P95/P99 with histogram_quantile().
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5)

REQUESTS = Counter(
    "semilla_requests", "HTTP requests by route, method and status", ["route", "method", "status"]
)
REQUEST_LATENCY = Histogram(
    "semilla_request_latency_seconds", "Time to the full HTTP response", ["route"], buckets=LATENCY_BUCKETS
)
TIME_TO_FIRST_TOKEN = Histogram(
    "semilla_time_to_first_token_seconds",
    "From submission to the first generated token",
    ["model"],
    buckets=LATENCY_BUCKETS,
)
INTER_TOKEN_LATENCY = Histogram(
    "semilla_inter_token_latency_seconds",
    "Between two tokens of one sequence",
    ["model"],
    buckets=TOKEN_BUCKETS,
)
GENERATED_TOKENS = Counter("semilla_generated_tokens", "Tokens generated (rate() gives tokens/s)", ["model"])
PROMPT_TOKENS = Counter("semilla_prompt_tokens", "Prompt tokens of accepted requests", ["model"])
COMPLETION_TOKENS = Counter("semilla_completion_tokens", "Completion tokens returned", ["model"])
QUEUE_DEPTH = Gauge("semilla_queue_depth", "Requests waiting for a slot", ["model"])
ACTIVE_SLOTS = Gauge("semilla_active_slots", "Sequences being decoded", ["model"])

# Providers: every attempt of a model name's backends (local models by id, remote ones by
# provider name, the canned 'templates' answer), as fallback chains make them.
PROVIDER_CALLS = Counter("semilla_provider_calls", "Attempts to answer through a provider", ["provider"])
PROVIDER_SUCCESSES = Counter("semilla_provider_successes", "Attempts that answered", ["provider"])
PROVIDER_FAILURES = Counter(
    "semilla_provider_failures", "Attempts that failed (reason: timeout, connection, status, invalid)",
    ["provider", "reason"],
)  # fmt: skip
PROVIDER_FALLBACKS = Counter(
    "semilla_provider_fallbacks", "Requests handed to the next provider after this one failed", ["provider"]
)
PROVIDER_SKIPS = Counter(
    "semilla_provider_skips", "Requests that skipped a cooling-down provider", ["provider"]
)
PROVIDER_LATENCY = Histogram(
    "semilla_provider_latency_seconds",
    "From an attempt's start to its answer (streams: to the first token)",
    ["provider"],
    buckets=LATENCY_BUCKETS,
)
TEMPLATE_ANSWERS = Counter("semilla_template_answers", "Requests answered with the canned last-resort text")

# Operations (semilla.serve.alerts): what the shipped alerting rules read besides the above.
MEMORY_USED_RATIO = Gauge(
    "semilla_memory_used_ratio",
    "Resident memory of the server over its limit (cgroup limit, else the machine's)",
)
HEALTH_CHECK_FAILURES = Counter(
    "semilla_health_check_failures",
    "The server's own health checks that failed (engine stopped, nothing to serve)",
)
MODEL_DRIFT_RATIO = Gauge(
    "semilla_model_drift_ratio",
    "A served model's perplexity over its baseline (source: the reference text, or sampled prompts)",
    ["model", "source"],
)
ALERTS_FIRING = Gauge("semilla_alerts_firing", "Alerts firing now, by rule", ["alert"])

# A/B routes (backends/split.py): each variant's share of a route's traffic and how it did.
AB_REQUESTS = Counter("semilla_ab_requests", "Requests an A/B route gave a variant", ["route", "variant"])
AB_ERRORS = Counter("semilla_ab_errors", "Requests of a variant that failed", ["route", "variant"])
AB_COMPLETION_TOKENS = Counter(
    "semilla_ab_completion_tokens", "Tokens a variant generated", ["route", "variant"]
)
AB_LATENCY = Histogram(
    "semilla_ab_latency_seconds",
    "A variant's time to the full answer",
    ["route", "variant"],
    buckets=LATENCY_BUCKETS,
)
AB_VARIANT_UP = Gauge(
    "semilla_ab_variant_up", "1 while an A/B route's variant can answer, else 0", ["route", "variant"]
)
