"""Debian's Chromium for the browser tests, installed with apt-get when missing (as root), the way
deploy/local/postgres.py installs PostgreSQL. Playwright never downloads a browser of its own here:
it is pointed at this executable.

The flags keep Chromium's traffic on loopback: without the background-networking ones it tries
Google's hosts at every start (component updates, sync, field trials, QUIC probes)."""

import os
import shutil
import subprocess
from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
OFFLINE_FLAGS = [
    "--headless",
    "--no-sandbox",  # Chromium's sandbox refuses to run as root
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def ensure_chromium() -> Path:
    """The Chromium executable, installing Debian's `chromium` package if it is missing."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise RuntimeError(f"{CHROMIUM} not found: install it, e.g. `sudo apt-get install -y chromium`")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "update"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", "chromium"], check=True, env=env)
    if not CHROMIUM.exists():
        raise RuntimeError(f"installed chromium but found no {CHROMIUM}")
    return CHROMIUM
