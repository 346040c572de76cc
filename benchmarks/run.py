"""Run the benchmarks (all, or those named), draw their plots and regenerate benchmarks/RESULTS.md.

Each benchmark is its own script that prints its table and writes results/<name>.json; this runs them one
after the other (never side by side: they would share the two cores), then draws return against wall time and
against env steps for those that record curves, and calls report.py.

    python benchmarks/run.py --quick                  # every benchmark, short budgets (about 10 minutes, and
                                                      # about 25 more for adversaries and audit_cost)
    python benchmarks/run.py                          # full budgets (hours: LunarLander, 3 seeds, every codec,
                                                      # 5 runs of every cheat)
    python benchmarks/run.py vs_sb3 footprint         # only these
    python benchmarks/run.py --smoke --out-dir /tmp/b # tiny budgets, to check that every script still runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).parent
# extra arguments per benchmark and mode; --quick and --smoke are passed through where a script has them
MODES = {
    "learning": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "swarm_vs_single": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "vs_sb3": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "env_speed": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "bandwidth": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "footprint": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "distill": {"full": [], "quick": ["--quick"], "smoke": ["--quick", "--envs", "CartPole-v1"]},
    "adversaries": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "audit_cost": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
    "reducer_bandwidth": {"full": [], "quick": ["--quick"], "smoke": ["--smoke"]},
}


def plot_curves(result: Path) -> Path | None:
    """results/<name>.png: evaluation return against wall time and against env steps, one colour per system."""
    data = json.loads(result.read_text())
    curves = data.get("curves")
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_time, by_steps) = plt.subplots(1, 2, figsize=(12, 4.5))
    colours: dict[str, str] = {}
    for label, points in curves.items():
        if not points:
            continue
        system = label.rsplit(" seed ", 1)[0]  # one colour per system; its seeds share it
        first = system not in colours
        colours.setdefault(system, f"C{len(colours) % 10}")
        wall, steps, returns = zip(*points)
        by_time.plot(wall, returns, ".-", color=colours[system], alpha=0.8, label=system if first else None)
        by_steps.plot(steps, returns, ".-", color=colours[system], alpha=0.8)
    by_time.set(xlabel="wall time from the first rollout (s)", ylabel="evaluation return", xscale="log")
    by_steps.set(xlabel="env steps", ylabel="evaluation return")
    by_time.legend(fontsize=7)
    fig.suptitle(f"{data['benchmark']} (commit {data['machine'].get('commit')})")
    fig.tight_layout()
    path = result.with_suffix(".png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"benchmarks to run (default: all): {', '.join(MODES)}")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--quick", action="store_true", help="short budgets")
    budget.add_argument("--smoke", action="store_true", help="tiny budgets, only to check that the scripts run")
    parser.add_argument("--out-dir", type=Path, default=HERE / "results",
                        help="where the JSON and PNG files go (RESULTS.md is only written for the default)")
    args = parser.parse_args()
    unknown = sorted(set(args.names) - set(MODES))
    if unknown:
        parser.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(MODES)}")
    mode = "smoke" if args.smoke else ("quick" if args.quick else "full")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in args.names or list(MODES):
        out = args.out_dir / f"{name}.json"
        print(f"== {name} ({mode})", flush=True)
        started = time.monotonic()
        command = [sys.executable, str(HERE / f"{name}.py"), *MODES[name][mode], "--out", str(out)]
        if subprocess.run(command, cwd=HERE).returncode != 0 or not out.exists():
            failed.append(name)
            continue
        plot = plot_curves(out)
        print(f"== {name}: {time.monotonic() - started:.0f} s{f', plot {plot}' if plot else ''}", flush=True)
    if args.out_dir.resolve() == (HERE / "results").resolve():
        subprocess.run([sys.executable, str(HERE / "report.py")], check=True)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
