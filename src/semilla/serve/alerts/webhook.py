"""The alert webhook: each alert that fires or resolves is POSTed, as Alertmanager's webhook
payload (version 4), to the one URL an admin configured (--alert-webhook; never a request's).

Deliveries run in a task of their own behind a bounded queue, so a webhook that hangs or
fails never holds up the server or the evaluation: each is tried `attempts` times with a
`timeout_s` deadline, waiting `backoff_s`, 2x, 4x ... between tries; the oldest waiting
notification is dropped (and counted) when the queue is full.
"""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import httpx

from semilla import __version__

log = logging.getLogger(__name__)


def payload(alert: dict) -> dict:
    """Alertmanager's webhook body for one alert (receivers that take Alertmanager's take this)."""
    return {
        "version": "4",
        "receiver": "semilla",
        "status": alert["status"],
        "groupLabels": {"alertname": alert["name"]},
        "commonLabels": alert["labels"],
        "commonAnnotations": alert["annotations"],
        "externalURL": "",
        "alerts": [
            {
                "status": alert["status"],
                "labels": alert["labels"],
                "annotations": alert["annotations"],
                "startsAt": alert["started_at"],
                "endsAt": alert.get("resolved_at") or "0001-01-01T00:00:00Z",
                "generatorURL": "",
            }
        ],
    }


class WebhookNotifier:
    def __init__(
        self,
        url: str,
        timeout_s: float = 5.0,
        attempts: int = 5,
        backoff_s: float = 1.0,
        queue_size: int = 100,
    ):
        self.url, self.timeout_s, self.attempts, self.backoff_s = url, timeout_s, attempts, backoff_s
        self.queue: asyncio.Queue[dict] = asyncio.Queue(queue_size)
        self.delivered = self.failed = self.dropped = self.tries = 0
        self.last_error: str | None = None

    def notify(self, alert: dict) -> None:
        """Queue one alert's notification; returns at once."""
        if self.queue.full():
            self.queue.get_nowait()
            self.dropped += 1
        self.queue.put_nowait(payload(alert))

    async def run(self) -> None:
        """Deliver queued notifications until cancelled."""
        headers = {"user-agent": f"semilla/{__version__}"}
        async with httpx.AsyncClient(
            timeout=self.timeout_s, headers=headers, follow_redirects=False
        ) as client:
            while True:
                body = await self.queue.get()
                await self._deliver(client, body)

    async def _deliver(self, client: httpx.AsyncClient, body: dict) -> None:
        name = body["groupLabels"]["alertname"]
        for attempt in range(self.attempts):
            self.tries += 1
            try:
                r = await client.post(self.url, json=body)
                if r.status_code < 300:
                    self.delivered += 1
                    return
                self.last_error = f"HTTP {r.status_code}"
            except httpx.HTTPError as e:
                self.last_error = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
            if attempt + 1 < self.attempts:
                await asyncio.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        log.warning("alert webhook: %s %s not delivered after %d tries (%s)", name, body["status"],
                    self.attempts, self.last_error)  # fmt: skip

    def state(self) -> dict:
        """For admins: where (scheme and host only: a URL may carry a token) and how it went."""
        url = urlsplit(self.url)
        return {
            "target": f"{url.scheme}://{url.hostname}" + (f":{url.port}" if url.port else ""),
            "delivered": self.delivered,
            "failed": self.failed,
            "dropped": self.dropped,
            "tries": self.tries,
            "pending": self.queue.qsize(),
            "last_error": self.last_error,
        }
