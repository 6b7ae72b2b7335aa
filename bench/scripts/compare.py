#!/usr/bin/env python3
"""Summarises a bench/compare results directory: for each figure of issue 7 the median over
the runs for this stack and for ejabberd (MariaDB and Mnesia), each run's value, and the
ratio ours / ejabberd's (on MariaDB, the like-for-like one).

    python3 bench/scripts/compare.py bench/results/compare-<time>

Prints Markdown (also written to <dir>/summary.md).
"""
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from summarise import cpu_per_10k, dig, fmt, load  # noqa: E402

SYSTEMS = ["stack", "ejabberd-sql", "ejabberd-mnesia"]

ROWS = [
    # label, report, figure (a path, or a function of the report), unit, better
    ("max sustained 1:1, p99 <= 50 ms, 0 lost", "throughput", "max_rate_msgs_s", "msgs/s", "high"),
    ("p50 at the fixed rate", "fixed", "latency_ms.p50", "ms", "low"),
    ("p99 at the fixed rate", "fixed", "latency_ms.p99", "ms", "low"),
    ("server CPU per 10,000 messages at the fixed rate", "fixed", cpu_per_10k, "CPU s", "low"),
    ("RSS per idle connection", "idle", "rss_per_connection_kib", "KiB", "low"),
    ("backlog replay to one client", "backlog", "replay_msgs_s", "msgs/s", "high"),
]


def figures(reports, scenario, system, figure):
    values = []
    for report in reports.get((scenario, system), []):
        value = figure(report) if callable(figure) else dig(report, figure)
        if isinstance(value, (int, float)):
            values.append(value)
    return values


def table(reports, fixed_rate):
    header = "| figure | ours | ejabberd, MariaDB | ejabberd, Mnesia | ours / ejabberd (MariaDB) | ahead? |"
    lines = [header, "|---|---|---|---|---|---|"]
    for label, scenario, figure, unit, better in ROWS:
        label = label.replace("the fixed rate", f"{fixed_rate} msgs/s")
        cells, medians = [], {}
        for system in SYSTEMS:
            values = figures(reports, scenario, system, figure)
            medians[system] = statistics.median(values) if values else None
            each = " / ".join(fmt(v) for v in values)
            cells.append(f"{fmt(medians[system])} {unit}" + (f" ({each})" if len(values) > 1 else ""))
        ours, theirs = medians["stack"], medians["ejabberd-sql"]
        ratio, ahead = "–", "–"
        if ours is not None and theirs:
            ratio = f"{ours / theirs:.2f}"
            ahead = "yes" if (ours > theirs if better == "high" else ours < theirs) else "no"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {ratio} | {ahead} |")
    return "\n".join(lines)


def problems(reports):
    lines = []
    for (scenario, system), runs in sorted(reports.items()):
        for i, report in enumerate(runs, 1):
            for problem in report.get("problems", []):
                lines.append(f"- {scenario}, {system}, run {i}: {problem}")
    return lines


def main():
    directory = sys.argv[1]
    reports = load(directory)
    fixed = reports.get(("fixed", "stack")) or reports.get(("fixed", "ejabberd-sql")) or [{}]
    fixed_rate = fmt(dig(fixed[0], "offered_msgs_s"))
    runs = max((len(v) for v in reports.values()), default=0)
    out = [f"Medians of {runs} run(s); each run's value in brackets.", "", table(reports, fixed_rate)]
    issues = problems(reports)
    if issues:
        out += ["", "Problems the runs reported:", ""] + issues
    text = "\n".join(out) + "\n"
    with open(os.path.join(directory, "summary.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    main()
