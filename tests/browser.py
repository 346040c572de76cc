"""Headless Chromium (Debian's package) for page tests; a test skips with the reason where it cannot start."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

# without the background-networking flags chromium keeps dialling out on a machine with no network
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1300,1400"]


class Chromium:
    def __init__(self, binary: str, tmp_path: Path):
        self.binary, self.tmp_path, self.runs = binary, tmp_path, 0

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        self.runs += 1  # a fresh profile every time: no cache, no state between page loads
        profile = self.tmp_path / f"chromium-profile-{self.runs}"
        return subprocess.run([self.binary, *FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                              text=True, timeout=timeout, stdin=subprocess.DEVNULL)

    def dom(self, url: str, budget_ms: int = 6000) -> str:
        """The page's DOM after its scripts ran for budget_ms of virtual time."""
        result = self.run(f"--virtual-time-budget={budget_ms}", "--dump-dom", url)
        assert result.returncode == 0, result.stderr[-2000:]
        return result.stdout

    def screenshot(self, url: str, path: Path, budget_ms: int = 6000) -> None:
        result = self.run(f"--virtual-time-budget={budget_ms}", f"--screenshot={path}", url)
        assert result.returncode == 0 and path.stat().st_size > 0, result.stderr[-2000:]


def chromium(tmp_path: Path) -> Chromium:
    """A working headless Chromium, or pytest.skip with what is wrong."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is not installed (apt-get install chromium; .ci/run installs it where apt works)")
    browser = Chromium(binary, tmp_path)
    try:
        probe = browser.run("--dump-dom", "about:blank", timeout=60)
    except subprocess.TimeoutExpired:
        pytest.skip("chromium did not start within 60 s")
    if probe.returncode != 0 or "<html" not in probe.stdout:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        pytest.skip(f"chromium cannot start here (exit {probe.returncode}): {last[:200]}")
    return browser
