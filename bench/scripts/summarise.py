#!/usr/bin/env python3
"""Summarises a bench/run results directory: the median of each figure over the runs, the
stack's figures as ratios to the bare relay's, and the latency-vs-rate chart.

    python3 bench/scripts/summarise.py bench/results/<time> [--chart docs/benchmarks/latency-vs-rate.png]

Prints Markdown (also written to <dir>/summary.md). The chart needs matplotlib (pip).
"""
import argparse
import glob
import json
import os
import statistics


def load(directory):
    reports = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.json"))):
        name = os.path.basename(path)[:-5]
        # <scenario>-<target>-<run>; a target may have a dash of its own (ejabberd-sql).
        scenario, rest = name.split("-", 1)
        if scenario == "accounts":
            continue
        target, _run = rest.rsplit("-", 1)
        try:
            with open(path) as f:
                report = json.load(f)
        except (json.JSONDecodeError, OSError):
            continue
        reports.setdefault((scenario, target), []).append(report)
    return reports


def dig(report, path):
    value = report
    for key in path.split("."):
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def values_of(reports, path):
    return [v for v in (dig(r, path) for r in reports) if isinstance(v, (int, float))]


def median(reports, path):
    values = values_of(reports, path)
    return (statistics.median(values), len(values)) if values else (None, 0)


def measured_step(report):
    """The part of a report whose `processes` and `delivered` belong together: the step of the
    max rate in a max-rate search (whose own counts are the sums over all steps, while its
    `processes` are the best step's), else the report itself."""
    best = [s for s in report.get("steps") or []
            if s.get("within_target") and s.get("offered_msgs_s") == report.get("max_rate_msgs_s")]
    return best[0] if best else report


def cpu_per_10k(report):
    """CPU seconds of every process but the load tool per 10,000 messages delivered, in the
    step of the max rate for a max-rate search."""
    step = measured_step(report)
    delivered = step.get("delivered") or 0
    if not delivered:
        return None
    cpu = sum(u["cpu_seconds"] for name, u in step.get("processes", {}).items()
              if name != "load-tool")
    return cpu / delivered * 10000


ROWS = [
    # label, scenario, figure path, unit, target, better
    ("sustained 1:1 throughput, p99 <= 50 ms, 0 lost", "throughput", "max_rate_msgs_s", "msgs/s", ">= 15,000", "high"),
    ("unloaded latency p50", "latency", "unloaded.latency_ms.p50", "ms", "<= 1", "low"),
    ("unloaded latency p99", "latency", "unloaded.latency_ms.p99", "ms", "<= 5", "low"),
    ("at 50 % of max rate: p99", "latency", "half_max.latency_ms.p99", "ms", "<= 10", "low"),
    ("at 50 % of max rate: p99.9", "latency", "half_max.latency_ms.p999", "ms", "<= 50", "low"),
    ("idle connections held", "idle", "connections", "", "15,000", "high"),
    ("RSS per idle connection", "idle", "rss_per_connection_kib", "KiB", "<= 8", "low"),
    ("idle CPU per 10,000 connections", "idle", "server_cpu_percent_per_10k_connections", "% of a core", "<= 2", "low"),
    ("backlog replay to one client", "backlog", "replay_msgs_s", "msgs/s", ">= 50,000", "high"),
    ("connect storm: all have hello", "storm", "all_hello_s", "s", "<= 5", "low"),
]


def fmt(value):
    if value is None:
        return "–"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def table(reports):
    lines = ["| figure | target | stack (median) | stack (each run) | bare relay (median) | stack / relay | runs |",
             "|---|---|---|---|---|---|---|"]
    for label, scenario, path, unit, target, _better in ROWS:
        stack, n = median(reports.get((scenario, "stack"), []), path)
        relay, _ = median(reports.get((scenario, "relay"), []), path)
        ratio = f"{stack / relay:.2f}" if stack is not None and relay else "–"
        unit_s = f" {unit}" if unit else ""
        each = ", ".join(fmt(v) for v in values_of(reports.get((scenario, "stack"), []), path))
        lines.append(f"| {label} | {target}{unit_s} | {fmt(stack)}{unit_s} | {each} | {fmt(relay)}{unit_s} | {ratio} | {n} |")
    for target in ("stack", "relay"):
        best = [r for r in reports.get(("throughput", target), [])]
        values = [cpu_per_10k(r) for r in best if cpu_per_10k(r) is not None]
        if values:
            each = ", ".join(f"{v:.2f}" for v in values)
            lines.append(f"| CPU seconds per 10,000 messages at the max rate ({target}, all processes but the load tool) | – | "
                         + (f"{statistics.median(values):.2f} | {each}" if target == "stack" else "– | –") + " | "
                         + (f"{statistics.median(values):.2f}" if target == "relay" else "–") + " | – | " + str(len(values)) + " |")
    return "\n".join(lines)


def components(reports):
    rows = reports.get(("components", "backends"), [])
    if not rows:
        return ""
    lines = ["| backend operation | median |", "|---|---|"]
    for key, label in [
        ("jetstream_publish_async_msgs_s", "JetStream publish, 256 in flight (msgs/s)"),
        ("jetstream_publish_one_by_one_msgs_s", "JetStream publish, one at a time (msgs/s)"),
        ("redis_round_trips_s", "Redis round trips, one command each (/s)"),
        ("redis_pipelined_commands_s", "Redis commands, 100 per pipeline (/s)"),
        ("mariadb_batched_insert_rows_s", "MariaDB 100-row INSERT per commit (rows/s)"),
        ("mariadb_row_per_commit_rows_s", "MariaDB one row per commit (rows/s)"),
    ]:
        value, _ = median(rows, key)
        lines.append(f"| {label} | {fmt(value)} |")
    return "\n".join(lines)


def chart(reports, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "(no chart: pip install matplotlib)"
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    for target, colour in (("stack", "tab:blue"), ("relay", "tab:grey")):
        points = []
        for report in reports.get(("throughput", target), []):
            for step in report.get("steps") or []:
                lat = step.get("latency_ms") or {}
                if step.get("lost") or step.get("duplicates"):
                    continue
                points.append((step["offered_msgs_s"], lat.get("p50"), lat.get("p99")))
        if not points:
            continue
        points.sort()
        xs = [p[0] for p in points]
        ax.scatter(xs, [p[2] for p in points], color=colour, marker="o", label=f"{target} p99")
        ax.scatter(xs, [p[1] for p in points], color=colour, marker="x", label=f"{target} p50")
    ax.axhline(50, color="tab:red", linestyle="--", linewidth=1, label="p99 target 50 ms")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("offered rate (msgs/s, open loop, 100 pairs)")
    ax.set_ylabel("send -> receive latency (ms)")
    ax.set_title("Latency vs rate: the stack and the bare relay (every step of every run)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    return f"chart written to {path}"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("directory")
    parser.add_argument("--chart", default="docs/benchmarks/latency-vs-rate.png")
    args = parser.parse_args()
    reports = load(args.directory)
    text = "\n\n".join(filter(None, [table(reports), components(reports)]))
    failed = [f"{s}/{t}: {r.get('problems')} lost={r.get('lost')} dup={r.get('duplicates')}"
              for (s, t), rs in reports.items() for r in rs
              if r.get("lost") or r.get("duplicates") or r.get("problems")]
    if failed:
        text += "\n\nRuns that do not count:\n" + "\n".join(f"- {f}" for f in failed)
    print(text)
    print(chart(reports, args.chart))
    with open(os.path.join(args.directory, "summary.md"), "w") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()
