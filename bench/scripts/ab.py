#!/usr/bin/env python3
"""Summarises a bench/scripts/ab results directory: per arm, the median and each run's value
of the figures that tell versions apart (CPU seconds per 10,000 messages by process, every
process but the load tool together, latency percentiles, the scenario's own rate).

    python3 bench/scripts/ab.py bench/results/ab-<time>
"""
import glob
import json
import os
import statistics
import sys

from summarise import measured_step


def figures(report):
    """The figures of one report, by name; the CPU per message of a max-rate search is its
    max step's."""
    out = {}
    step = measured_step(report)
    n = step.get("delivered") or 0
    procs = step.get("processes") or {}
    if n:
        per = {k: v["cpu_seconds"] * 1e4 / n for k, v in procs.items() if "cpu_seconds" in v}
        out["CPU s / 10k msgs, all but the load tool"] = sum(
            v for k, v in per.items() if k != "load-tool"
        )
        for k, v in sorted(per.items()):
            out[f"  {k}"] = v
    for key in ("latency_ms", "receipt_ms"):
        for q in ("p50", "p99", "p999"):
            v = (report.get(key) or {}).get(q)
            if v is not None:
                out[f"{key} {q}"] = v
    for key in ("throughput_msgs_s", "replay_msgs_s", "max_rate_msgs_s", "all_hello_s",
                "all_backlog_done_s", "rss_per_connection_kib"):
        if isinstance(report.get(key), (int, float)):
            out[key] = report[key]
    out["lost + duplicates"] = (report.get("lost") or 0) + (report.get("duplicates") or 0)
    return out


def shown(v):
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    directory = sys.argv[1]
    with open(os.path.join(directory, "arms.txt")) as f:
        arms = [line.strip() for line in f if line.strip()]
    by_arm = []
    for i in range(len(arms)):
        runs = []
        paths = glob.glob(os.path.join(directory, f"{i}-*.json"))
        for path in sorted(paths, key=lambda p: int(p.rsplit("-", 1)[1][:-5])):
            try:
                with open(path) as f:
                    runs.append(figures(json.load(f)))
            except (OSError, json.JSONDecodeError, KeyError):
                print(f"(not read: {path})", file=sys.stderr)
        by_arm.append(runs)
    names = []
    for runs in by_arm:
        for run in runs:
            names.extend(k for k in run if k not in names)
    print("| figure | " + " | ".join(f"`{a}`" for a in arms) + " |")
    print("|---" * (len(arms) + 1) + "|")
    for name in names:
        cells = []
        for runs in by_arm:
            values = [r[name] for r in runs if name in r]
            if not values:
                cells.append("–")
                continue
            each = ", ".join(shown(v) for v in values)
            cells.append(f"{shown(statistics.median(values))} ({each})")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
