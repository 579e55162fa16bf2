"""Cluster benchmarks (part of make bench): what Redis costs, same node and across nodes.

Every run starts its own redis-server and nodes, all pinned to CPU 0 (Redis
on one core with the nodes), with the load generator on CPU 1, like run.py:

* S1 one node without Redis, and the same node with ``--redis-url`` (pairs on
  that node: the same-node path must not pay for the cluster);
* S1 and S2 across two nodes: the two sides of every pair on different nodes,
  so every message crosses Redis once;

and writes the medians and ratios between the cluster markers of
docs/benchmarks.md (the rest of the page is report.py's).

Usage: python bench/cluster.py [--runs 3] [--seconds 10] [--only S2]

``--only`` runs the setups whose names start with one of its comma-separated
prefixes ("S2" is both S2 setups) and prints their figures, with the CPU time
per message, without touching docs/benchmarks.md (which needs every setup).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from typing import Any

from run import BENCH, NO_LIMITS, ROOT, SECRET, cpu_seconds, free_port, raise_file_limit, wait_listening

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- cluster:begin -->", "<!-- cluster:end -->"
SIGNAL = str(ROOT / ".venv/bin/signal-server")

# name -> (scenario, nodes, with Redis, loadgen parameters)
SETUPS: dict[str, tuple[str, int, bool, dict[str, Any]]] = {
    "S1 one node": ("S1", 1, False, {}),
    "S1 one node + Redis": ("S1", 1, True, {}),
    "S1 across 2 nodes": ("S1", 2, True, {}),
    "S2 one node": ("S2", 1, False, {"rate": 2000, "rooms": 200}),
    "S2 across 2 nodes": ("S2", 2, True, {"rate": 2000, "rooms": 200}),
}


def pinned(*command: str) -> list[str]:
    return ["taskset", "-c", "0", *command]


def wait_ready(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1):
                return  # 200 (a 503 raises)
        except OSError:
            time.sleep(0.05)  # polling a node that is not ready yet: nothing to wait on
    raise RuntimeError(f"node on {port} not ready after {seconds}s")


def run_once(scenario: str, nodes: int, redis: bool, params: dict[str, Any], seconds: float) -> dict[str, Any]:
    processes: list[subprocess.Popen[bytes]] = []
    directory = tempfile.mkdtemp(prefix="bench-cluster-")
    try:
        extra: list[str] = []
        if redis:
            redis_port = free_port()
            processes.append(subprocess.Popen(
                pinned(shutil.which("redis-server") or "redis-server", "--port", str(redis_port),
                       "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", directory),
                stdout=subprocess.DEVNULL,
            ))
            wait_listening(redis_port, processes[-1])
            extra = ["--redis-url", f"redis://127.0.0.1:{redis_port}"]
        ports = [free_port() for _ in range(nodes)]
        for index, port in enumerate(ports):
            node = subprocess.Popen(
                pinned(SIGNAL, "--port", str(port), "--jwt-secret", SECRET, "--log-level", "warning",
                       "--node-id", f"bench{index}", *NO_LIMITS, *extra),
                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=raise_file_limit,
            )
            processes.append(node)
            wait_listening(port, node)
        if redis:  # listening is not ready: wait for the pub/sub round trip
            for port in ports:
                wait_ready(port)
        config = {"target": "signal", "port": ports[0], "ports": ports, "scenario": scenario, "secret": SECRET,
                  "seconds": seconds, "warmup": 1,
                  # A closed loop across nodes has more in flight at the end; give it time to land.
                  "drain_ms": 10000, **params}
        generator = subprocess.Popen(
            ["taskset", "-c", "1", "node", str(BENCH / "loadgen.mjs"), json.dumps(config)],
            cwd=BENCH, stdout=subprocess.PIPE, preexec_fn=raise_file_limit, text=True,
        )
        result: dict[str, Any] = {}
        marks: dict[str, tuple[float, float]] = {}
        assert generator.stdout is not None
        for line in generator.stdout:
            event = json.loads(line)
            marks[event["phase"]] = (time.monotonic(), sum(cpu_seconds(p.pid) for p in processes))
            if event["phase"] == "result":
                result = event
        generator.wait(timeout=60)
        if "window_start" in marks and "window_end" in marks:
            (t0, c0), (t1, c1) = marks["window_start"], marks["window_end"]
            result["server_cpu"] = (c1 - c0) / (t1 - t0)
        return result
    finally:
        stop_all(processes, directory)


def stop_all(processes: list[subprocess.Popen[bytes]], directory: str) -> None:
    """Terminate the nodes and Redis (the last started first), kill what does not exit, remove the scratch dir."""
    for process in reversed(processes):
        process.terminate()  # a no-op for one already gone (a killed node)
    for process in processes:
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    shutil.rmtree(directory, ignore_errors=True)


def med(runs: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else float("nan")


def table(results: dict[str, list[dict[str, Any]]], runs: int, seconds: float) -> str:
    lines = [
        f"Medians of {runs} runs of {seconds:g} s; nodes and redis-server share CPU 0, the generator has CPU 1.",
        "",
        "| setup | msg/s | p50 ms | p99 ms | CPU (nodes + Redis) | lost / misordered |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, runs_of in results.items():
        lost = sum(int(r.get("lost") or 0) for r in runs_of)
        misordered = sum(int(r.get("misordered") or 0) for r in runs_of)
        lines.append(
            f"| {name} | {med(runs_of, 'rate'):,.0f} | {med(runs_of, 'p50_ms'):.2f} | {med(runs_of, 'p99_ms'):.2f} "
            f"| {med(runs_of, 'server_cpu'):.2f} | {lost} / {misordered} |"
        )
    s1, s1r, s1x = (results[k] for k in ("S1 one node", "S1 one node + Redis", "S1 across 2 nodes"))
    s2, s2x = results["S2 one node"], results["S2 across 2 nodes"]
    ratios = [
        ("same-node S1 with Redis configured / without", med(s1r, "rate") / med(s1, "rate"), "≥ 0.9"),
        ("cross-node S1 / same-node S1", med(s1x, "rate") / med(s1, "rate"), "≥ 0.5"),
        ("cross-node S2 p99 / same-node S2 p99 (2,000 msg/s)", med(s2x, "p99_ms") / med(s2, "p99_ms"), "≤ 2"),
    ]
    lines += ["", "| ratio | measured | goal |", "| --- | ---: | ---: |"]
    lines += [f"| {name} | {value:.2f} | {goal} |" for name, value, goal in ratios]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default="", help="comma-separated setup name prefixes (no docs update)")
    args = parser.parse_args()
    if shutil.which("redis-server") is None:
        sys.exit("bench: redis-server is required (make system-deps)")
    prefixes = tuple(part.strip() for part in args.only.split(",") if part.strip())
    chosen = [name for name in SETUPS if not prefixes or name.startswith(prefixes)]
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in chosen}
    for run in range(args.runs):
        for name in chosen:  # interleaved against drift
            scenario, nodes, redis, params = SETUPS[name]
            outcome = run_once(scenario, nodes, redis, params, args.seconds)
            outcome.update(setup=name, run=run)
            if outcome.get("server_cpu") and outcome.get("rate"):
                outcome["server_cpu_us_per_message"] = 1e6 * outcome["server_cpu"] / outcome["rate"]
            results[name].append(outcome)
            print(json.dumps({k: v for k, v in outcome.items() if k != "join"}), flush=True)
    if prefixes:
        for name, runs_of in results.items():
            print(f"{name}: p50 {med(runs_of, 'p50_ms'):.2f} ms, p99 {med(runs_of, 'p99_ms'):.2f} ms, "
                  f"CPU {med(runs_of, 'server_cpu_us_per_message'):.0f} us/message (medians)")
        return
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "cluster.json").write_text(json.dumps(results, indent=1))
    replace_section(BEGIN, END, table(results, args.runs, args.seconds), "Many nodes on Redis")


def replace_section(begin: str, end: str, body: str, heading: str) -> None:
    """Rewrite the part of docs/benchmarks.md between two markers (a new section under ``heading`` if absent)."""
    text = DOC.read_text()
    section = f"{begin}\n{body}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + section + text[text.index(end) + len(end):]
    else:
        text += f"\n## {heading}\n\n{section}\n"
    DOC.write_text(text)


if __name__ == "__main__":
    main()
