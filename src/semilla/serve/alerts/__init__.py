"""Operations: alerting rules evaluated inside the server (and shipped for Prometheus).

    rules = check_settings(settings)    # AlertRulesError / SemillaError: one line, exit 2
    install(app, settings)              # evaluator, drift and webhook tasks, /admin/alerts, /admin/drift

See rules.yml for the rules, evaluator.py for how they fire and resolve, drift.py for the
perplexity checks behind the drift rule, webhook.py for the optional notification.
"""

from __future__ import annotations

import asyncio
import contextlib
from contextlib import asynccontextmanager
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI

from semilla.errors import SemillaError
from semilla.serve import metrics
from semilla.serve.alerts.drift import DriftMonitor, reference_text
from semilla.serve.alerts.evaluator import AlertEvaluator
from semilla.serve.alerts.probes import health_problems, memory_used_ratio
from semilla.serve.alerts.rules import DEFAULT_RULES, AlertRule, AlertRulesError, load_rules
from semilla.serve.alerts.webhook import WebhookNotifier
from semilla.serve.routes.alerts import router
from semilla.serve.settings import ServerSettings

__all__ = ["DEFAULT_RULES", "AlertRulesError", "check_settings", "install"]


def check_settings(settings: ServerSettings) -> list[AlertRule]:
    """The alerting rules the settings name, and a webhook URL that can be used."""
    url = urlsplit(settings.alert_webhook_url)
    if settings.alert_webhook_url and (url.scheme not in ("http", "https") or not url.hostname):
        raise SemillaError(f"--alert-webhook must be an http(s) URL, got {settings.alert_webhook_url!r}")
    if settings.drift_reference:
        try:
            reference_text(settings.drift_reference)
        except (OSError, UnicodeDecodeError) as e:
            reason = getattr(e, "strerror", None) or e
            raise SemillaError(
                f"cannot read the drift reference {settings.drift_reference}: {reason}"
            ) from None
    return load_rules(settings.alert_rules)


def install(app: FastAPI, settings: ServerSettings) -> None:
    """Evaluate the alerting rules while the app runs; GET /admin/alerts shows them."""
    rules = check_settings(settings)
    state = app.state.semilla
    limit = settings.memory_limit_bytes
    metrics.MEMORY_USED_RATIO.set_function(lambda: memory_used_ratio(limit))
    notifier = None
    if settings.alert_webhook_url:
        notifier = WebhookNotifier(settings.alert_webhook_url, settings.alert_webhook_timeout_s)
    app.state.alerts = evaluator = AlertEvaluator(
        rules,
        settings.alert_interval_s,
        health_check=lambda: health_problems(state),
        on_change=notifier.notify if notifier else None,
    )
    app.state.alert_webhook = notifier
    app.state.drift = drift = None
    if settings.drift_interval_s > 0:
        app.state.drift = drift = DriftMonitor(
            reference_text(settings.drift_reference),
            Path(settings.data_dir) / "drift-baselines.json",
            settings.drift_interval_s,
            sample_prompts=settings.drift_sample_prompts,
            scrub=settings.scrub_pii,
        )
        state.prompt_observers.append(drift.observe)
    app.include_router(router)

    inner = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        async with inner(app) as inner_state:
            tasks = [asyncio.create_task(evaluator.run(), name="semilla-alerts")]
            if notifier is not None:
                tasks.append(asyncio.create_task(notifier.run(), name="semilla-alert-webhook"))
            if drift is not None:
                tasks.append(asyncio.create_task(drift.run(state), name="semilla-drift"))
            try:
                yield inner_state
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
                if drift is not None:
                    drift.forget(list(drift.latest))

    app.router.lifespan_context = lifespan
