#!/usr/bin/env python3
"""Where a service's time goes, from folded stacks: the share of samples whose stack passes
through each part, inclusive (so the rows overlap), one column per profile.

    FOLDED=/tmp/gw.folded bench/scripts/flamegraph chat-gateway 2500 /tmp/gw.svg
    python3 bench/scripts/shares.py /tmp/gw.folded [/tmp/other.folded ...]

Prints the Markdown rows of the gateway's table in docs/benchmarks.md ("Where the time goes").
A folded stack is one line: frames from the thread's root down, joined by ';', then a space
and the number of samples (inferno-collapse-perf's output).
"""
import re
import sys


def any_frame(pattern):
    regex = re.compile(pattern)
    return lambda frames: any(regex.search(f) for f in frames)


def both(a, b):
    return lambda frames: a(frames) and b(frames)


WRITER = any_frame(r"socket::write_loop")
ALLOC = r"^(__GI___libc_malloc|__GI___libc_free|__libc_calloc|__GI___libc_realloc|_int_malloc|_int_free|_int_realloc|malloc_consolidate|cfree|malloc|free)$"

ROWS = [
    ("system calls (socket reads and writes, epoll, futex)", any_frame(r"entry_SYSCALL_64")),
    ("the socket writer task (`write_loop`)", WRITER),
    ("… of which `send(2)`", both(WRITER, any_frame(r"__send|sendto|__sys_sendto"))),
    (
        "the send path (`send::run`/`handle`/`confirm`: validation, the JetStream publish, `sent`)",
        any_frame(r"send::(run|handle|confirm)"),
    ),
    (
        "async-nats's connection task (the publishes, their PubAcks, requests)",
        any_frame(r"ConnectionHandler::process"),
    ),
    (
        "the users' events connection (`events::Link`: reading, parsing, dispatching to sockets)",
        any_frame(r"events::Link::run"),
    ),
    ("pushing events to sockets (`Connection::on_event`)", any_frame(r"Connection::on_event")),
    ("reading client frames (`Connection::on_client`)", any_frame(r"Connection::on_client")),
    (
        "tracing + OpenTelemetry (a span per send and per push, context into NATS headers)",
        any_frame(r"opentelemetry|tracing_subscriber|tracing_core::dispatcher|tracing::span::Span"),
    ),
    ("malloc / free", any_frame(ALLOC)),
    ("… of it `malloc_consolidate`", any_frame(r"^malloc_consolidate$")),
    ("JSON", any_frame(r"serde_json")),
]


def shares(path):
    total = 0
    counts = [0] * len(ROWS)
    with open(path) as f:
        for line in f:
            stack, _, n = line.rstrip("\n").rpartition(" ")
            if not stack:
                continue
            n = int(n)
            total += n
            frames = stack.split(";")
            for i, (_, passes) in enumerate(ROWS):
                if passes(frames):
                    counts[i] += n
    return [100 * c / total if total else 0.0 for c in counts]


def main():
    paths = sys.argv[1:]
    if not paths:
        sys.exit(__doc__)
    columns = [shares(p) for p in paths]
    print("| where | " + " | ".join(paths) + " |")
    print("|---" * (len(paths) + 1) + "|")
    for i, (name, _) in enumerate(ROWS):
        print(f"| {name} | " + " | ".join(f"{c[i]:.1f} %" for c in columns) + " |")


if __name__ == "__main__":
    main()
