"""Headless Chromium for the web tests: Debian's system browser driven by Playwright."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from urllib.parse import urlsplit

CHROMIUM = os.environ.get("SEMILLA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
]
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
PASSWORD = "correct horse battery"


def chromium_path() -> str | None:
    """The system Chromium, or None (the browser tests are skipped with the reason)."""
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    return shutil.which("chromium")


def is_loopback(url: str) -> bool:
    """Whether a request stays on this machine (data: and blob: URLs never leave the page)."""
    parts = urlsplit(url)
    if parts.scheme in ("data", "blob", "about"):
        return True
    return parts.hostname in ("127.0.0.1", "localhost", "::1")


def screenshot_dir(tmp: Path) -> Path:
    """$SEMILLA_SCREENSHOTS (`make screenshots`: docs/screenshots) or a temporary folder."""
    target = Path(os.environ.get("SEMILLA_SCREENSHOTS") or tmp)
    target.mkdir(parents=True, exist_ok=True)
    return target
