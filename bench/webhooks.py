"""Webhook receivers in trouble must not slow signaling (part of make bench).

One signal-server process (pinned to CPU 0) with ``--webhook-url`` pointing at
a receiver that answers at once, answers 500, takes 2 s (more than the 1 s
``--webhook-timeout``), or is down (nothing listens); and, as the baseline,
the same server without webhooks. During each run:

* churn: users join and leave rooms of their own in a loop, 4 webhook events
  per cycle (room_started, participant_joined, participant_left, room_finished);
* probe: in another room alice sends bob 200 offers a second; the latency of
  each relay (send to receive, one clock) is what the table reports.

The receiver, the churn and the probe run in this process (CPU 1). The
medians and p99 go between the webhooks markers of docs/benchmarks.md.

Usage: python bench/webhooks.py [--seconds 8]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from typing import Any

from aiohttp import ClientSession, web
from run import NO_LIMITS, ROOT, SECRET, free_port, raise_file_limit, wait_listening

from signal_server.auth import mint_token

DOC = ROOT / "docs" / "benchmarks.md"
BEGIN, END = "<!-- webhooks:begin -->", "<!-- webhooks:end -->"
SIGNAL = str(ROOT / ".venv/bin/signal-server")
WEBHOOK_SECRET = "bench-webhook-secret-at-least-32-bytes!!"
PROBE_RATE = 200  # offers a second
CHURN_RATE = 50  # join-and-leave cycles a second: 200 webhook events a second
MODES = ("no webhooks", "receiver ok", "receiver 500", "receiver slow (2 s)", "receiver down")


def serve_receiver(mode: str, port: int) -> None:
    """The receiver, in a process of its own (``--receiver MODE PORT``)."""

    async def handle(request: web.Request) -> web.Response:
        await request.read()
        if mode == "receiver 500":
            return web.Response(status=500)
        if mode == "receiver slow (2 s)":
            await asyncio.sleep(2)  # the slow receiver being measured, not a synchronisation
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", handle)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


async def churn(session: ClientSession, port: int, stop: asyncio.Event) -> int:
    cycles = 0
    start = time.perf_counter()
    while not stop.is_set() and cycles < 100_000:
        ahead = start + cycles / CHURN_RATE - time.perf_counter()
        if ahead > 0:
            await asyncio.sleep(ahead)  # pacing the churn, not a synchronisation
        user = f"churn-{cycles % 50}"
        token = mint_token(SECRET, user)
        ws = await session.ws_connect(f"ws://127.0.0.1:{port}/webrtc/ws/churn-{cycles}?token={token}")
        await ws.receive()  # room_state
        await ws.close()
        cycles += 1
    return cycles


async def probe(session: ClientSession, port: int, stop: asyncio.Event) -> list[float]:
    url = f"ws://127.0.0.1:{port}/webrtc/ws/probe?token="
    alice = await session.ws_connect(url + mint_token(SECRET, "alice"))
    await alice.receive()
    bob = await session.ws_connect(url + mint_token(SECRET, "bob"))
    await bob.receive()
    await alice.receive()  # user_joined
    sent: dict[str, float] = {}
    latencies: list[float] = []

    async def read() -> None:
        async for message in bob:
            data = json.loads(message.data)
            if data["type"] == "offer":
                latencies.append((time.perf_counter() - sent.pop(data["payload"]["sdp"])) * 1000)

    reader = asyncio.create_task(read())
    index = 0
    while not stop.is_set() and index < PROBE_RATE * 600:
        sdp = str(index)
        sent[sdp] = time.perf_counter()
        await alice.send_str(json.dumps({"type": "offer", "payload": {"type": "offer", "sdp": sdp}}))
        index += 1
        await asyncio.sleep(1 / PROBE_RATE)  # pacing the probe, not a synchronisation
    await alice.close()
    await bob.close()
    reader.cancel()
    return latencies


async def run(mode: str, seconds: float) -> dict[str, Any]:
    hook_port = free_port()
    hook = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, __file__, "--receiver", mode, str(hook_port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    if mode != "receiver down":
        wait_listening(hook_port, hook)
    port = free_port()
    args = [SIGNAL, "--port", str(port), "--jwt-secret", SECRET, *NO_LIMITS]
    if mode != "no webhooks":
        target = free_port() if mode == "receiver down" else hook_port
        args += ["--webhook-url", f"http://127.0.0.1:{target}/hooks", "--webhook-secret", WEBHOOK_SECRET,
                 "--webhook-timeout", "1", "--webhook-max-attempts", "3"]
    server = subprocess.Popen(
        ["taskset", "-c", "0", *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=raise_file_limit,
    )
    try:
        wait_listening(port, server)
        stop = asyncio.Event()
        async with ClientSession() as session:
            churning = asyncio.create_task(churn(session, port, stop))
            probing = asyncio.create_task(probe(session, port, stop))
            await asyncio.sleep(seconds)  # the measuring window
            stop.set()
            cycles, latencies = await churning, await probing
            async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
                metrics = await response.text()
    finally:
        server.terminate()
        server.wait(10)
        hook.terminate()
        hook.wait(10)

    def value(name: str) -> int:
        found = re.search(rf"^{re.escape(name)} (\S+)$", metrics, re.M)
        return int(float(found.group(1))) if found else 0

    latencies.sort()
    return {
        "mode": mode, "cycles": cycles,
        "p50": statistics.median(latencies), "p99": latencies[int(len(latencies) * 0.99)],
        "relayed": len(latencies), "delivered": value("signal_webhook_deliveries_total"),
        "failed": value("signal_webhook_failed_attempts_total"),
        "dropped": value('signal_webhook_events_dropped_total{reason="retries_exhausted"}')
        + value('signal_webhook_events_dropped_total{reason="queue_full"}'),
    }


def table(results: list[dict[str, Any]], seconds: float) -> str:
    lines = [
        f"One run of {seconds:g} s per row, {CHURN_RATE} join-and-leave cycles a second ({CHURN_RATE * 4} events)"
        f" and {PROBE_RATE} probe offers a second; the server on CPU 0, the receiver, churn and probe on CPU 1.",
        "",
        "| receiver | probe p50 ms | probe p99 ms | churn cycles | delivered | failed attempts | dropped |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in results:
        lines.append(
            f"| {r['mode']} | {r['p50']:.2f} | {r['p99']:.2f} | {r['cycles']:,} | "
            f"{r['delivered']:,} | {r['failed']:,} | {r['dropped']:,} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--receiver", nargs=2, metavar=("MODE", "PORT"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.receiver:
        serve_receiver(options.receiver[0], int(options.receiver[1]))
        return
    os.sched_setaffinity(0, {1})  # churn and probe beside the receiver, off the server's core
    results = []
    for mode in MODES:
        result = asyncio.run(run(mode, options.seconds))
        print(json.dumps(result), flush=True)
        results.append(result)
    section = table(results, options.seconds)
    text = DOC.read_text()
    head, _, rest = text.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{section}\n{END}{tail}")
    print(section)


if __name__ == "__main__":
    main()
