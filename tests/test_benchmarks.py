"""The benchmarks themselves, with tiny budgets, so they never rot. Their numbers are never asserted here.
One test per benchmark of benchmarks/run.py (pick some with -k, e.g. -k "adversaries or audit_cost")."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


def registered() -> list[str]:
    """The benchmarks benchmarks/run.py knows (its MODES), so that a new one is tested as soon as it is registered."""
    spec = importlib.util.spec_from_file_location("benchmarks_run", BENCHMARKS / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return list(module.MODES)


@pytest.mark.timeout(1200)
@pytest.mark.parametrize("name", registered())
def test_every_benchmark_runs_and_writes_its_results(name, tmp_path):
    report = BENCHMARKS / "RESULTS.md"
    before = report.stat().st_mtime_ns if report.exists() else None
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "--smoke", "--out-dir", str(tmp_path), name],
                            capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((tmp_path / f"{name}.json").read_text())
    assert data["benchmark"] == name and data["table"] and data["machine"]["cores"] >= 1, name
    if name in ("swarm_vs_single", "vs_sb3"):  # return against wall time and env steps
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000
    if name == "adversaries":  # a row per swarm, and a verdict per cheat for report.py
        assert [t["cheat"] for t in data["targets"]] == [row["swarm"] for row in data["table"][1:]]
    if name == "learning":  # one process, then 2 peers with whole and with split batches, each solved the smoke target
        rows = {row["system"]: row for row in data["table"]}
        assert rows["one process"]["vs_one_process"] == 1.0 and all(r["median_env_steps"] > 0 for r in rows.values())
        assert rows["2 peers, split batches"]["peer_batch"] * 2 == rows["2 peers, whole batches"]["peer_batch"]
    if name == "audit_cost":  # an honest receipt passes its audit
        assert data["in_process"] and all(row["passed"] for row in data["in_process"]), data["in_process"]
    assert (report.stat().st_mtime_ns if report.exists() else None) == before  # only the default directory's


def test_unknown_benchmark_is_refused():
    result = subprocess.run([sys.executable, str(BENCHMARKS / "run.py"), "nope"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "unknown benchmark nope" in result.stderr
