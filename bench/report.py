"""Turn bench/results/*.json into the table, the ratios and the chart of docs/benchmarks.md.

Only the part of docs/benchmarks.md between the results markers is rewritten;
the hand-written analysis around it stays.

Usage: python bench/report.py
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"
BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SIGNAL, FLOOR, FLOOR_JWT, PEERJS = "signal-server", "aiohttp floor", "aiohttp floor + JWT", "PeerJS"
SATURATED_SERVER, BUSY_GENERATOR = 0.9, 0.9

Result = dict[str, Any]


def version(command: list[str]) -> str:
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=10).stdout.strip().splitlines()[0]
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def machine() -> str:
    model = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    memory = int(Path("/proc/meminfo").read_text().split()[1]) // 1024 // 1024
    from importlib.metadata import version as installed

    return (
        f"{model}, {len(os.sched_getaffinity(0))} CPUs, {memory} GiB, Linux {platform.release()}; "
        f"Python {platform.python_version()}, aiohttp {installed('aiohttp')}, uvloop {installed('uvloop')}, "
        f"orjson {installed('orjson')}; Node {version(['node', '--version'])}"
    )


def spread(values: Iterable[float | None], digits: int = 0) -> str:
    present = [v for v in values if v is not None]
    if not present:
        return "–"
    fmt = f"{{:,.{digits}f}}"
    middle = fmt.format(statistics.median(present))
    if len(present) == 1:
        return middle
    return f"{middle} ({fmt.format(min(present))}–{fmt.format(max(present))})"


def median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def checks(runs: list[Result]) -> str:
    bad = [r for r in runs if r.get("fatal") or r.get("bad_envelopes") or r.get("lost") or r.get("misordered")
           or r.get("errors")]
    checked = sum(r.get("checked", 0) for r in runs)
    if bad:
        first = bad[0]
        return (f"FAIL: {first.get('fatal') or first.get('bad_envelopes') or first.get('errors')} "
                f"lost={first.get('lost')} misordered={first.get('misordered')}")
    return f"ok ({checked:,} envelopes checked)" if checked else "ok"


def verdict(ok: bool | None) -> str:
    return "–" if ok is None else ("met" if ok else "**not met**")


def group(results: list[Result]) -> dict[tuple[str, str, str], list[Result]]:
    grouped: dict[tuple[str, str, str], list[Result]] = defaultdict(list)
    for result in results:
        params = ",".join(f"{k}={v}" for k, v in sorted(result.get("params", {}).items()) if k == "connections")
        grouped[(result["scenario"], params, result["target"])].append(result)
    return grouped


def table(grouped: dict[tuple[str, str, str], list[Result]]) -> list[str]:
    columns = [("rate", 0), ("p50_ms", 2), ("p99_ms", 2), ("p999_ms", 2), ("kib_per_connection", 1),
               ("server_cpu", 2), ("generator_cpu", 2)]
    rows = ["| scenario | target | rate | p50 ms | p99 ms | p99.9 ms | KiB/conn | server CPU | generator CPU "
            "| checks |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (scenario, params, target), runs in sorted(grouped.items()):
        cells = [spread((r.get(key) for r in runs), digits) for key, digits in columns]
        rows.append(f"| {scenario} {params} | {target} | {' | '.join(cells)} | {checks(runs)} |")
    return rows


def ratios(grouped: dict[tuple[str, str, str], list[Result]]) -> list[str]:
    def value(scenario: str, target: str, key: str, params: str = "") -> float | None:
        return median(r.get(key) for r in grouped.get((scenario, params, target), []))

    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or not b else a / b

    def saturated(scenario: str) -> str:
        runs = grouped.get((scenario, "", SIGNAL), []) + grouped.get((scenario, "", FLOOR), [])
        valid = all((r.get("server_cpu") or 0) >= SATURATED_SERVER and (r.get("generator_cpu") or 1) < BUSY_GENERATOR
                    for r in runs)
        return "" if valid else " (some runs not server-bound: see CPU columns)"

    lines = ["| target (same run) | measured | goal | |", "| --- | --- | --- | --- |"]

    def add(label: str, measured: float | None, goal: str, ok: Callable[[float], bool], suffix: str = "") -> None:
        shown = "–" if measured is None else f"{measured:.2f}"
        lines.append(f"| {label}{suffix} | {shown} | {goal} | {verdict(None if measured is None else ok(measured))} |")

    s1 = ratio(value("S1", SIGNAL, "rate"), value("S1", FLOOR, "rate"))
    add("S1 throughput: signal-server / aiohttp floor", s1, "≥ 0.85", lambda v: v >= 0.85, saturated("S1"))
    add("S1 throughput: signal-server / PeerJS", ratio(value("S1", SIGNAL, "rate"), value("S1", PEERJS, "rate")),
        "≈ 1 (aim)", lambda v: v >= 1.0)
    add("S2 p99: signal-server / PeerJS", ratio(value("S2", SIGNAL, "p99_ms"), value("S2", PEERJS, "p99_ms")),
        "≤ 1", lambda v: v <= 1.0)
    add("S2 p99.9, signal-server (ms)", value("S2", SIGNAL, "p999_ms"), "≤ 5", lambda v: v <= 5.0)
    lost = sum(r.get("lost") or 0 for key, runs in grouped.items() if key[0] == "S2" and key[2] == SIGNAL
               for r in runs)
    add("S2 messages lost, signal-server", float(lost), "0", lambda v: v == 0)
    add("S3 deliveries: signal-server / PeerJS", ratio(value("S3", SIGNAL, "rate"), value("S3", PEERJS, "rate")),
        "≥ 1.4", lambda v: v >= 1.4, saturated("S3"))
    for params in sorted({key[1] for key in grouped if key[0] == "S4"}):
        add(f"S4 {params} KiB/conn: signal-server / floor",
            ratio(value("S4", SIGNAL, "kib_per_connection", params), value("S4", FLOOR, "kib_per_connection", params)),
            "≤ 1.15", lambda v: v <= 1.15)
    failed = sum(1 for key, runs in grouped.items() if key[0] == "S4" and key[2] == SIGNAL for r in runs
                 if r.get("fatal"))
    add("S4 failed joins at 10,000 connections, signal-server", float(failed), "0", lambda v: v == 0)
    add("S5 joins: signal-server / floor + same JWT",
        ratio(value("S5", SIGNAL, "rate", "connections=2000"), value("S5", FLOOR_JWT, "rate", "connections=2000")),
        "≥ 0.9", lambda v: v >= 0.9)
    add("S5 joins with fresh tokens: signal-server / PeerJS",
        ratio(value("S5", SIGNAL, "rate", "connections=2000"), value("S5", PEERJS, "rate", "connections=2000")),
        "≥ 0.8", lambda v: v >= 0.8)
    add("S6 resumes with tokens seen before: signal-server / PeerJS S5 joins",
        ratio(value("S6", SIGNAL, "rate", "connections=2000"), value("S5", PEERJS, "rate", "connections=2000")),
        "≥ 1.0", lambda v: v >= 1.0)
    return lines


def instructions() -> list[str]:
    path = BENCH / "results" / "instructions.json"
    if not path.exists():
        return []
    data = json.loads(path.read_text())
    return [
        "",
        "Instructions counted by callgrind (repeatable to well under 1%, whatever the machine's noise; kernel "
        "time not included):",
        "",
        "| | aiohttp floor | signal-server | ratio |",
        "| --- | --- | --- | --- |",
        f"| per relayed message | {data['floor_message']:,.0f} | {data['signal_message']:,.0f} | "
        f"{data['signal_message'] / data['floor_message']:.3f} |",
        f"| per join (floor verifies the same JWT) | {data['floor_join']:,.0f} | {data['signal_join']:,.0f} | "
        f"{data['signal_join'] / data['floor_join']:.3f} |",
    ]


def chart(grouped: dict[tuple[str, str, str], list[Result]]) -> None:
    targets = [SIGNAL, FLOOR, FLOOR_JWT, PEERJS]
    colours = {SIGNAL: "#2f7d32", FLOOR: "#8d8d8d", FLOOR_JWT: "#b0b0b0", PEERJS: "#1f5fa8"}
    panels = [("S1", "", "rate", "S1 relay, msg/s"), ("S3", "", "rate", "S3 fan-out, deliveries/s"),
              ("S5", "connections=2000", "rate", "S5 join storm, joins/s"),
              ("S4", "connections=10000", "kib_per_connection", "S4 memory, KiB per idle connection"),
              ("S2", "", "p99_ms", "S2 p99 latency at 2,000 msg/s, ms")]
    figure, grid = plt.subplots(2, 3, figsize=(12, 7))
    axes = list(grid.flat)
    axes[-1].axis("off")
    for axis, (scenario, params, key, title) in zip(axes, panels, strict=False):
        names, medians, low, high = [], [], [], []
        for target in targets:
            values: list[float] = [r[key] for r in grouped.get((scenario, params, target), [])
                                   if r.get(key) is not None]
            if not values:
                continue
            middle = statistics.median(values)
            names.append(target.replace("aiohttp ", ""))
            medians.append(middle)
            low.append(middle - min(values))
            high.append(max(values) - middle)
        bars = axis.bar(names, medians, yerr=[low, high], capsize=4,
                        color=[colours[t] for t in targets if t.replace("aiohttp ", "") in names])
        axis.bar_label(bars, fmt="{:,.0f}" if key == "rate" else "{:,.1f}", fontsize=8, padding=2)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelsize=8, rotation=15)
    figure.suptitle("Medians of the runs, bars from min to max (same machine, same run)", fontsize=10)
    figure.tight_layout()
    figure.savefig(CHART, dpi=110)


def main() -> None:
    data = json.loads((BENCH / "results" / "latest.json").read_text())
    grouped = group(data["results"])
    if not grouped:
        raise SystemExit("bench/results/latest.json has no results: run bench/run.py first")
    chart(grouped)
    results_file = BENCH / "results" / "latest.json"
    stamp = datetime.fromtimestamp(results_file.stat().st_mtime, UTC).strftime("%Y-%m-%d %H:%M UTC")
    section = [
        BEGIN,
        f"*Generated by `make bench` on {stamp}: {data['runs']} runs of every scenario, {data['seconds']:.0f} s "
        f"measured windows, server pinned to CPU 0 and load generator to CPU 1.*",
        "",
        f"Machine: {machine()}.",
        "",
        "### Ratios against the yardsticks measured in the same run",
        "",
        *ratios(grouped),
        *instructions(),
        "",
        "### All figures (median, min–max)",
        "",
        *table(grouped),
        "",
        "![benchmark chart](benchmarks.png)",
        END,
    ]
    text = DOC.read_text() if DOC.exists() else f"# Benchmarks\n\n{BEGIN}\n{END}\n"
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(head + "\n".join(section) + tail)
    print("\n".join(ratios(grouped)))
    print(f"wrote {DOC.relative_to(ROOT)} and {CHART.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
