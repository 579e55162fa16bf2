"""`make bench`: every scenario against every target, several times, then the report.

Each run starts a fresh server on a free loopback port pinned to CPU 0 and the
load generator pinned to CPU 1, reads the server's CPU time and RSS from /proc
at the generator's phase marks, and keeps the generator's JSON result. Results
go to bench/results/latest.json; bench/report.py turns them into
docs/benchmarks.md and the chart.

Usage: python bench/run.py [--runs 3] [--seconds 10] [--only S1,S3] [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
RESULTS = BENCH / "results"
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
SECRET = secrets.token_urlsafe(32)
NO_LIMITS = [
    "--rate-limit", "1e7", "--rate-burst", "10000000", "--max-connections", "1000000",
    "--max-connections-per-ip", "1000000", "--ip-connect-rate", "1e7", "--ip-connect-burst", "10000000",
    # The byte intake limit too (256 KiB/s a connection by default): at saturation S1's
    # few connections each send more than that, and would be cut off with 4429.
    "--receive-rate", str(1 << 30), "--receive-burst", str(1 << 30),
]


@dataclass(frozen=True)
class Target:
    name: str  # as reported
    protocol: str  # the load generator's adapter
    command: tuple[str, ...]  # {port} is replaced


SIGNAL = Target(
    "signal-server", "signal",
    (str(ROOT / ".venv/bin/signal-server"), "--port", "{port}", "--jwt-secret", SECRET, "--log-level", "warning",
     *NO_LIMITS),
)
FLOOR = Target("aiohttp floor", "floor", (sys.executable, str(BENCH / "floor.py"), "{port}"))
FLOOR_JWT = Target(
    "aiohttp floor + JWT", "floor-jwt", (sys.executable, str(BENCH / "floor.py"), "{port}", "--jwt-secret", SECRET)
)
PEERJS = Target("PeerJS", "peerjs", ("node", str(BENCH / "peerjs_server.mjs"), "{port}"))

SCENARIOS: dict[str, tuple[list[Target], list[dict[str, Any]]]] = {
    "S1": ([SIGNAL, FLOOR, PEERJS], [{}]),
    "S2": ([SIGNAL, FLOOR, PEERJS], [{"rate": 2000, "rooms": 200}]),
    "S3": ([SIGNAL, FLOOR, PEERJS], [{}]),
    "S4": ([SIGNAL, FLOOR, PEERJS], [{"connections": 5000}, {"connections": 10000}]),
    "S5": ([SIGNAL, FLOOR_JWT, PEERJS], [{"connections": 2000, "concurrency": 100}]),
    # Resumes with tokens seen before (PeerJS verifies nothing: its S5 join rate is the yardstick).
    "S6": ([SIGNAL], [{"connections": 2000, "concurrency": 100}]),
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def raise_file_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime + stime


def rss_kib(pid: int) -> int:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE_KIB


def wait_listening(port: int, process: subprocess.Popen[bytes], seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)  # polling a port that is not open yet: nothing to wait on
    raise RuntimeError(f"server not listening on {port} after {seconds}s")


def run_once(target: Target, scenario: str, params: dict[str, Any], seconds: float) -> dict[str, Any]:
    port = free_port()
    command = ["taskset", "-c", "0", *(part.replace("{port}", str(port)) for part in target.command)]
    server = subprocess.Popen(
        command, cwd=BENCH, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=raise_file_limit
    )
    try:
        wait_listening(port, server)
        config = {"target": target.protocol, "port": port, "scenario": scenario, "secret": SECRET,
                  "seconds": seconds, "warmup": 1, **params}
        generator = subprocess.Popen(
            ["taskset", "-c", "1", "node", str(BENCH / "loadgen.mjs"), json.dumps(config)],
            cwd=BENCH, stdout=subprocess.PIPE, preexec_fn=raise_file_limit, text=True,
        )
        marks: dict[str, tuple[float, float, int]] = {}
        result: dict[str, Any] = {}
        assert generator.stdout is not None
        for line in generator.stdout:
            event = json.loads(line)
            marks[event["phase"]] = (time.monotonic(), cpu_seconds(server.pid), rss_kib(server.pid))
            if event["phase"] == "result":
                result = event
        generator.wait(timeout=60)
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
    if "window_start" in marks and "window_end" in marks:
        (t0, c0, _), (t1, c1, _) = marks["window_start"], marks["window_end"]
        result["server_cpu"] = (c1 - c0) / (t1 - t0)
    if "baseline" in marks and "connected" in marks:
        grown = marks["connected"][2] - marks["baseline"][2]
        result["server_rss_kib"] = marks["connected"][2]
        result["kib_per_connection"] = grown / max(1, params.get("connections", 1))
    result.update(target=target.name, params=params)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--only", default="S1,S2,S3,S4,S5,S6")
    parser.add_argument("--quick", action="store_true", help="1 run of 3 s each (a smoke test)")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.seconds = 1, 3.0
    for tool in ("taskset", "node"):
        if shutil.which(tool) is None:
            sys.exit(f"bench: {tool} is required")
    if os.cpu_count() and os.cpu_count() < 2:  # type: ignore[operator]
        sys.exit("bench: needs two CPUs (server on CPU 0, generator on CPU 1)")
    raise_file_limit()
    results = []
    for scenario in args.only.split(","):
        targets, variants = SCENARIOS[scenario]
        for params in variants:
            for run in range(args.runs):
                for target in targets:  # interleaved, so drift hits every target alike
                    outcome = run_once(target, scenario, params, args.seconds)
                    outcome["run"] = run
                    results.append(outcome)
                    print(json.dumps({k: v for k, v in outcome.items() if k not in ("join",)}), flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps({"runs": args.runs, "seconds": args.seconds,
                                                     "results": results}, indent=1))


if __name__ == "__main__":
    main()
