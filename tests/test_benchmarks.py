"""The benchmarks themselves, with tiny budgets, so they never rot. Their numbers are never asserted here."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.mark.timeout(1200)
def test_every_benchmark_runs_and_writes_its_results(tmp_path):
    report = BENCHMARKS / "RESULTS.md"
    before = report.stat().st_mtime_ns if report.exists() else None
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--out-dir", str(tmp_path)],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    for name in ("swarm_vs_single", "vs_sb3", "env_speed", "bandwidth", "footprint", "distill"):
        data = json.loads((tmp_path / f"{name}.json").read_text())
        assert data["table"] and data["machine"]["cores"] >= 1, name
    for name in ("swarm_vs_single", "vs_sb3"):  # return against wall time and env steps
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    assert (report.stat().st_mtime_ns if report.exists() else None) == before  # only the default directory's


def test_unknown_benchmark_is_refused():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "nope"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "unknown benchmark nope" in result.stderr
