"""Regenerate benchmarks/RESULTS.md from benchmarks/results/*.json: python benchmarks/report.py"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent


def verdict(ok: bool) -> str:
    return "met" if ok else "**MISSED**"


def swarm_vs_single(data: dict) -> list[str]:
    lines = []
    for row in data["table"]:
        ratio = row.get("wall_ratio_vs_a")
        if ratio is None:
            if not row["system"].startswith("a:"):
                lines.append(f"- {row['system']}: solved {row['solved']}; no ratio: **MISSED**")
            continue
        if row["system"].startswith("b:"):
            lines.append(f"- {row['system']}: target within 1.25x of (a); measured {ratio}x: {verdict(ratio <= 1.25)}")
        elif row["system"].startswith("c:"):
            lines.append(f"- {row['system']}: target faster than (a); measured {ratio}x: {verdict(ratio < 1.0)}")
    rows = {row["system"]: row for row in data["table"]}
    single, pair = rows.get("a: single process", {}), rows.get("c: 2-peer swarm", {})
    if single.get("median_env_steps") and pair.get("median_env_steps"):
        ratio = round(pair["median_env_steps"] / single["median_env_steps"], 2)
        lines.append(f"- c: 2-peer swarm: env steps to solve at most 1.5x (a)'s; measured {ratio}x: "
                     f"{verdict(ratio <= 1.5)}")
    if any(row["system"].endswith(", grad") for row in data["table"]):
        lines.append("- the grad rows: gradient averaging did not learn in time and was removed after this run "
                     "(docs/ARCHITECTURE.md, \"Local updates only\")")
    return lines


def learning(data: dict) -> list[str]:
    lines = []
    for row in data["table"]:
        if row["system"].endswith("split batches"):
            ratio = row["vs_one_process"]
            measured = "unsolved" if ratio is None else f"{ratio}x"
            lines.append(f"- {row['system']} (simulated rounds): env steps to solve at most 1.5x one process's; "
                         f"measured {measured}: {verdict(ratio is not None and ratio <= 1.5)}")
    return lines


def vs_sb3(data: dict) -> list[str]:
    lines = []
    for row in data["table"]:
        if row.get("system") == "hivegym 2 peers":
            ratio = row.get("wall_ratio_vs_sb3")
            measured = "no ratio (unsolved)" if ratio is None else f"{ratio}x SB3's wall time"
            lines.append(f"- {row['env']}: target 2-peer swarm faster than SB3; measured {measured}: "
                         f"{verdict(ratio is not None and ratio < 1.0)}")
    measured = {row["env"] for path in (HERE / "results").glob("vs_sb3*.json")
                for row in json.loads(path.read_text())["table"]}
    for env in ("CartPole-v1", "Acrobot-v1", "LunarLander-v3"):
        if env not in measured:
            lines.append(f"- {env}: not measured (`--quick` runs CartPole-v1 only; `--envs` picks): "
                         "target unverified")
    return lines


def env_speed(data: dict) -> list[str]:
    lines = []
    for row in data["table"]:
        if row.get("measure", "").startswith("hivegym Collector"):
            share = row["share_of_raw"]
            lines.append(f"- collection at >= 70% of the raw env rate; measured {100 * share:.0f}%: "
                         f"{verdict(share >= 0.7)}")
        elif "averaging+other %" in row:
            share = row["averaging+other %"]
            lines.append(f"- {row['measure']}: averaging and waiting <= 15% of its wall time; measured {share}%: "
                         f"{verdict(share <= 15)}")
    return lines


def bandwidth(data: dict) -> list[str]:
    rows = [r for r in data["table"] if "link" in r]
    if not rows:
        return [f"- not measured: {data.get('skipped')}"]
    slow = [r for r in rows if r["link"] == "5 Mbit/s" and r["wall_vs_unlimited"] is not None]
    lines = []
    if slow:
        best = min(slow, key=lambda r: r["train_wall_s"])
        ratio = best["wall_vs_unlimited"]
        setting = ", ".join(filter(None, (best.get("mode"), best["compression"])))  # older results name a mode
        lines.append(f"- at 5 Mbit/s the best setting ({setting}) solves within 1.3x of its unlimited time; "
                     f"measured {ratio}x: {verdict(ratio <= 1.3)}")
    elif any(r["link"] == "5 Mbit/s" for r in rows):
        lines.append(f"- at 5 Mbit/s the best setting solves within 1.3x of its unlimited time; no setting solved both "
                     f"unlimited and at 5 Mbit/s: {verdict(False)}")
    for r in rows:
        if r["compression"] == "uint8" and r["bytes_vs_uncompressed"] is not None:
            where = ", ".join(filter(None, (r["link"], r.get("mode"))))
            lines.append(f"- 8-bit bytes per step <= 30% of uncompressed ({where}); measured "
                         f"{100 * r['bytes_vs_uncompressed']:.0f}%: {verdict(r['bytes_vs_uncompressed'] <= 0.3)}")
    return lines


def footprint(data: dict) -> list[str]:
    return [f"- {row['measure']}: target {row['target']}; measured {row['value']}: "
            f"{verdict(row['verdict'] == 'met')}" for row in data["table"] if row.get("target")]


def distill(data: dict) -> list[str]:
    return [f"- {env}: student '{t['size']}' keeps >= 95% of the teacher's return and runs >= 5x faster; measured "
            f"{100 * t['return_share']:.0f}% and {t['speedup']:.1f}x: {verdict(t['met'])}"
            for env, t in data.get("targets", {}).items()]


def adversaries(data: dict) -> list[str]:
    lines = []
    for t in data.get("targets", []):
        measured = "not caught" if t["measured"] is None else f"{t['measured']:g} receipts"
        lines.append(f"- {t['cheat']}: {t['target']} over {data['runs_per_swarm']} run(s) at the default audit rates; "
                     f"measured {measured} ({t['caught_by']}, caught in {t['caught_runs']}): {verdict(t['met'])}")
    return lines


def reducer_bandwidth(data: dict) -> list[str]:
    rows = [r for r in data["table"] if "volunteers" in r]
    if not rows:
        return [f"- not measured: {data.get('skipped')}"]
    return [f"- {r['volunteers']} volunteer(s), {r['extra_reducers']} extra reducer(s): the coordinator moves "
            f"{r['coordinator_kB_per_step_per_volunteer']} kB per global step per volunteer (no target; recorded)"
            for r in rows]


TARGETS = {"learning": learning, "swarm_vs_single": swarm_vs_single, "vs_sb3": vs_sb3, "env_speed": env_speed, "bandwidth": bandwidth,
           "footprint": footprint, "distill": distill, "adversaries": adversaries,
           "audit_cost": footprint, "reducer_bandwidth": reducer_bandwidth}  # audit_cost's rows carry their target and verdict like footprint's


def markdown_table(rows: list[dict]) -> str:
    columns = list(dict.fromkeys(key for row in rows for key in row))
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join("-" if row.get(c) is None else str(row[c]) for c in columns) + " |")
    return "\n".join(lines)


def main() -> None:
    parts = ["# Benchmark results", "",
             "Generated by `python benchmarks/report.py` (which `python benchmarks/run.py` calls) from "
             "benchmarks/results/*.json. Each table was measured in one run, side by side, on the machine and commit "
             "named under it. Wall times are medians over the solved runs, from the first finished rollout (swarm "
             "start-up excluded). Targets come from the issues; a missed one says so.", ""]
    for path in sorted((HERE / "results").glob("*.json")):
        data = json.loads(path.read_text())
        m = data["machine"]
        parts += [f"## {path.stem}", "",
                  f"Commit {m['commit']}, {m['cores']} cores ({m['cpu']}), torch {m['torch']}, hivemind {m['hivemind']}"
                  f"; seeds: {data.get('seeds', '-')}.", ""]
        if data.get("table"):
            parts += [markdown_table(data["table"]), ""]
        parts += TARGETS.get(data["benchmark"], lambda _: [])(data) + [""]
        parts += [f"Note: {note}" for note in data.get("notes", [])] + ([""] if data.get("notes") else [])
        if path.with_suffix(".png").exists():
            parts += [f"![{path.stem}](results/{path.with_suffix('.png').name})", ""]
    (HERE / "RESULTS.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
