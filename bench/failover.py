"""Failover benchmark (part of make bench): a node dies, its clients storm the survivors.

Redis and three nodes share CPU 0, the load generator (loadgen.mjs, scenario
``failover``) has CPU 1, as in cluster.py. The clients join in rooms of 4
spread over the nodes and relay steadily; then node 0 gets SIGKILL (it dies
with its sockets) or SIGTERM (it drains: close 1001, slots held in Redis). Its
clients reconnect through the other two nodes with the browser module's
jittered back-off and the same tokens, and resume. The generator reports when
each resumed and relays again, resumes per 100 ms, recovered true/false, and
whether the clients never displaced lost or duplicated any message.

Writes bench/results/failover.json, the section between the failover markers of
docs/benchmarks.md, and docs/failover.png.

Usage: python bench/failover.py [--clients 5000] [--interval-ms 5000] [--only kill,term]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from cluster import SIGNAL, pinned, replace_section, stop_all, wait_ready
from run import BENCH, NO_LIMITS, ROOT, SECRET, free_port, raise_file_limit, wait_listening

CHART = ROOT / "docs" / "failover.png"
BEGIN, END = "<!-- failover:begin -->", "<!-- failover:end -->"
SIGNALS = {"kill": signal.SIGKILL, "term": signal.SIGTERM}
NODES = 3


def run_once(variant: str, clients: int, interval_ms: int) -> dict[str, Any]:
    processes: list[subprocess.Popen[bytes]] = []
    directory = tempfile.mkdtemp(prefix="bench-failover-")
    load_before = os.getloadavg()[0]  # the machine may be shared: say how busy it was
    try:
        redis_port = free_port()
        processes.append(subprocess.Popen(
            pinned(shutil.which("redis-server") or "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                   "--save", "", "--appendonly", "no", "--dir", directory),
            stdout=subprocess.DEVNULL,
        ))
        wait_listening(redis_port, processes[-1])
        ports = [free_port() for _ in range(NODES)]
        nodes = []
        for index, port in enumerate(ports):
            node = subprocess.Popen(
                pinned(SIGNAL, "--port", str(port), "--jwt-secret", SECRET, "--log-level", "warning",
                       "--node-id", f"fail{index}", "--redis-url", f"redis://127.0.0.1:{redis_port}", *NO_LIMITS),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=raise_file_limit,
            )
            processes.append(node)
            nodes.append(node)
            wait_listening(port, node)
        for port in ports:
            wait_ready(port)
        config = {"target": "signal", "port": ports[0], "ports": ports, "scenario": "failover", "secret": SECRET,
                  "clients": clients, "interval_ms": interval_ms, "storm_ms": 60000, "drain_ms": 3000}
        generator = subprocess.Popen(
            ["taskset", "-c", "1", "node", str(BENCH / "loadgen.mjs"), json.dumps(config)],
            cwd=BENCH, stdin=subprocess.PIPE, stdout=subprocess.PIPE, preexec_fn=raise_file_limit, text=True,
        )
        assert generator.stdout is not None and generator.stdin is not None
        result: dict[str, Any] = {}
        for line in generator.stdout:
            event = json.loads(line)
            if event["phase"] == "ready":
                generator.stdin.write("kill 0\n")  # first, so the generator's clock starts at the signal
                generator.stdin.flush()
                os.kill(nodes[0].pid, SIGNALS[variant])
            elif event["phase"] == "result":
                result = event
        generator.wait(timeout=120)
        result["variant"] = variant
        result["load_before"] = load_before
        return result
    finally:
        stop_all(processes, directory)


def verdict(ok: bool) -> str:
    return "met" if ok else "**not met**"


def section(results: list[dict[str, Any]], clients: int, interval_ms: int) -> str:
    lines = [
        f"{clients:,} clients in rooms of 4 over three nodes and one redis-server (all on CPU 0; the generator on "
        f"CPU 1), each sending one room-wide message every {interval_ms} ms; node 0 is stopped and its clients "
        "reconnect through the other two with the browser module's back-off (full jitter from 250 ms, doubling, "
        "at most 5 s) and the same tokens. Times are from the signal. One run of each variant on a shared, noisy "
        "machine (1-minute load average before each: "
        + ", ".join(f"{_name(r['variant'])} {r.get('load_before', 0):.1f}" for r in results) + " on 2 cores).",
        "",
        "| | SIGKILL (node dies) | SIGTERM (node drains) |",
        "| --- | ---: | ---: |",
    ]
    by_variant = {r["variant"]: r.get("failover") or {} for r in results}
    rows = [
        ("displaced clients", "displaced", "{:,}"),
        ("all resumed (s)", "all_resumed_s", "{:.2f}"),
        ("all relaying again (s)", "all_relaying_s", "{:.2f}"),
        ("median resume (s)", "median_resumed_s", "{:.2f}"),
        ("peak resumes/s (100 ms window)", "peak_resumes_per_s", "{:,.0f}"),
        ("resumes `recovered: true`", "recovered", "{:,}"),
        ("resumes `recovered: false`", "notRecovered", "{:,}"),
        ("fresh joins (slot not found)", "fresh", "{:,}"),
        ("connection attempts (failed)", "attempts", "{:,}"),
        ("messages among the others: expected", "rest_expected", "{:,}"),
        ("lost / duplicated / out of order among the others", "rest", ""),
        ("displaced clients: duplicated / out of order", "displaced_order", ""),
    ]
    for label, key, fmt in rows:
        cells = []
        for variant in ("kill", "term"):
            figures = by_variant.get(variant, {})
            if key == "rest":
                counts = ("lost", "duplicated", "reordered")
                cells.append(" / ".join(str(figures.get(f"rest_{k}", "–")) for k in counts))
            elif key == "displaced_order":
                cells.append(" / ".join(str(figures.get(f"displaced_{k}", "–")) for k in ("duplicates", "reordered")))
            elif key == "attempts":
                cells.append(f"{figures.get('attempts', 0):,} ({figures.get('failedAttempts', 0):,})")
            else:
                value = figures.get(key)
                cells.append("–" if value is None else fmt.format(value))
        lines.append(f"| {label} | {' | '.join(cells)} |")
    lines += ["", "| goal | SIGKILL | SIGTERM |", "| --- | --- | --- |"]
    goals: list[tuple[str, Callable[[dict[str, Any]], bool]]] = [
        ("every displaced client resumed and relays again (within 60 s)",
         lambda f: f.get("all_relaying_s") is not None),
        ("zero lost or duplicated messages for the rest of the room",
         lambda f: f.get("rest_lost") == 0 and f.get("rest_duplicated") == 0 and f.get("rest_expected", 0) > 0),
        ("displaced clients: no message twice or out of order",
         lambda f: f.get("displaced_duplicates") == 0 and f.get("displaced_reordered") == 0),
    ]
    for label, check in goals:
        lines.append(f"| {label} | " + " | ".join(verdict(check(by_variant.get(v, {}))) for v in ("kill", "term"))
                     + " |")
    for result in results:
        problems = [result["fatal"]] if result.get("fatal") else [_brief(e) for e in result.get("errors") or []]
        if problems:
            name = {"kill": "SIGKILL", "term": "SIGTERM"}[result["variant"]]
            lines += ["", f"{name}: the clients were told (first {len(problems)}): {'; '.join(sorted(set(problems)))}."]
    lines += ["", "![failover chart](failover.png)"]
    return "\n".join(lines)


def _name(variant: str) -> str:
    return {"kill": "SIGKILL", "term": "SIGTERM"}[variant]


def _brief(error: str) -> str:
    """An error message the generator kept, as its code and text."""
    try:
        return str(json.loads(error)["payload"]["message"])
    except (ValueError, KeyError, TypeError):
        return error[:120]


def chart(results: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(9, 4))
    for result, colour in zip(results, ("#b23b3b", "#2f7d32"), strict=False):
        timeline = (result.get("failover") or {}).get("resumes_per_100ms") or []
        name = {"kill": "SIGKILL", "term": "SIGTERM"}[result["variant"]]
        axis.plot([i / 10 for i in range(len(timeline))], [count * 10 for count in timeline], color=colour,
                  label=f"{name}: resumes/s (100 ms windows)")
    axis.set_xlabel("seconds after the signal")
    axis.set_ylabel("resumes per second")
    axis.set_title("Failover: the dead node's clients resuming through the survivors", fontsize=10)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(CHART, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=5000)
    parser.add_argument("--interval-ms", type=int, default=5000)
    parser.add_argument("--only", default="kill,term")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("bench: redis-server is required (make system-deps)")
    raise_file_limit()
    results = []
    for variant in args.only.split(","):
        outcome = run_once(variant, args.clients, args.interval_ms)
        print(json.dumps({k: v for k, v in outcome.items() if k != "join"}), flush=True)
        results.append(outcome)
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "failover.json").write_text(json.dumps(results, indent=1))
    chart(results)
    replace_section(BEGIN, END, section(results, args.clients, args.interval_ms),
                    "Failover: a node dies, its clients reconnect")


if __name__ == "__main__":
    main()
