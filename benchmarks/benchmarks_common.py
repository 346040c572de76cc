"""What every benchmark records about where it ran: machine, versions, commit."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import hivemind
    import torch

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "torch": torch.__version__,
            "hivemind": hivemind.__version__, "commit": commit}


def unavailable_env(env_id: str) -> str | None:
    """Why env_id cannot run here (a missing optional dependency such as box2d), or None."""
    import gymnasium as gym

    try:
        gym.make(env_id).close()
        return None
    except (gym.error.DependencyNotInstalled, ImportError) as e:
        return f"cannot run here: {str(e).splitlines()[0]} (pip install 'hivegym[bench]')"


def print_table(table: list[dict]) -> None:
    """Aligned columns; the union of the rows' keys, in first-seen order."""
    columns = list(dict.fromkeys(key for row in table for key in row))
    cells = [[fmt(row.get(c)) for c in columns] for row in table]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def run_swarm(peers: int, overrides: list[str], target: float, max_minutes: float, env: dict | None = None) -> dict:
    """One `hivegym-launch --local-peers N` run to `target` (no distillation, no dashboard): its summary, its
    wall time from the first finished rollout (start-up excluded), and return against wall time and env steps."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"bench-{peers}-"))
    command = [sys.executable, "-m", "hivegym.coordinator.cli", "--local-peers", str(peers), "--target-return",
               str(target), "--max-minutes", str(max_minutes), "--run-dir", str(run_dir), "--log-level", "WARNING",
               "--no-dashboard"]
    for item in ["distill_sizes=", *overrides]:  # students in the background would share the cores
        command += ["--set", item]
    subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=max_minutes * 60 + 120,
                   env=env)
    summary = json.loads((run_dir / "summary.json").read_text())
    first = summary["first_report_s"] or 0.0
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row["eval_return"] is not None:
            curve.append([round(row["wall_s"] - first, 2), row["env_steps"], row["eval_return"]])
    return {"reached": summary["reached"], "train_wall_s": round(summary["wall_s"] - first, 2),
            "wall_s": summary["wall_s"], "env_steps": summary["env_steps"], "eval_return": summary["eval_return"],
            "epochs": summary["epoch"], "peers": summary.get("peers", {}), "curve": curve, "run_dir": str(run_dir)}
