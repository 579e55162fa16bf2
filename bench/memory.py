"""Where the memory of an idle connection goes: tracemalloc by allocation site and object type, and RSS.

The server runs in this process (uvloop, as the command runs it) with
tracemalloc on; the load generator (loadgen.mjs, scenario S4) opens N idle
connections in rooms of 4 and holds them. At the generator's ``connected``
mark this script takes a snapshot and compares it with one taken before the
first connection: bytes per connection by allocation site (grouped into the
objects that own them) and by object type (``gc`` counts times
``sys.getsizeof``, for the container objects the collector tracks). RSS is
read separately without tracemalloc (its own overhead would count), in a
second run. Results go to bench/results/memory.json and are printed.

The clients answer pings in every run, as a browser does, and a run in which
any connection is no longer live when measured fails instead of reporting.

Usage: python bench/memory.py [--connections 2000] [--keepalive] [--traced-connections 2000]
  --keepalive: a 6 s heartbeat, held until every connection has been pinged and answered.
  --traced-connections: the tracemalloc run's size (0: none). make bench takes RSS at 10,000
  with --keepalive, then the breakdown at 1,000: traced, the server takes thousands of
  handshakes so slowly that the first clients are dropped before the last have joined.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import linecache
import os
import subprocess
import sys
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop
from aiohttp import web
from run import BENCH, SECRET, free_port, raise_file_limit, rss_kib

from signal_server.app import create_standalone_app
from signal_server.context import SIGNALING
from signal_server.settings import Settings

# The limits of run.py's NO_LIMITS, as Settings fields: one address opens every connection.
NO_LIMITS: dict[str, Any] = {
    "rate_limit": 1e7, "rate_burst": 10_000_000, "max_connections": 1_000_000, "max_connections_per_ip": 1_000_000,
    "ip_connect_rate": 1e7, "ip_connect_burst": 10_000_000,
}

HEARTBEAT = 6.0  # seconds, with --keepalive: a silent peer is pinged after 3 s, dropped after 9 s

# Allocation sites (file fragment, function or line fragment) -> who owns the memory.
OWNERS = [
    ("aiohttp/web_protocol.py", "aiohttp RequestHandler (protocol)"),
    ("aiohttp/web_request.py", "aiohttp Request"),
    ("aiohttp/web_ws.py", "aiohttp WebSocketResponse"),
    ("aiohttp/web_response.py", "aiohttp StreamResponse"),
    ("aiohttp/_websocket", "aiohttp WebSocket reader/writer"),
    ("aiohttp/http_websocket.py", "aiohttp WebSocket reader/writer"),
    ("aiohttp/streams.py", "aiohttp data queues"),
    ("aiohttp/http_parser.py", "aiohttp HTTP parser"),
    ("aiohttp/_http_parser", "aiohttp HTTP parser"),
    ("aiohttp/http_writer.py", "aiohttp StreamWriter"),
    ("aiohttp/helpers.py", "aiohttp helpers (timers, reified properties)"),
    ("aiohttp/web_urldispatcher.py", "aiohttp URL match info"),
    ("aiohttp_cors", "aiohttp-cors"),
    ("yarl/", "yarl URL / query"),
    ("multidict/", "multidict headers"),
    ("signal_server/handlers.py", "signal-server handler"),
    ("signal_server/peer.py", "signal-server peer"),
    ("signal_server/hub.py", "signal-server hub (slot, room)"),
    ("signal_server/auth.py", "signal-server identity / token cache"),
    ("signal_server/tokencache.py", "signal-server identity / token cache"),
    ("signal_server/", "signal-server other"),
    ("asyncio/", "asyncio (tasks, futures, handles)"),
    ("uvloop/", "uvloop"),
]


def owner(frames: tracemalloc.Traceback) -> str:
    """The innermost frame that belongs to a known owner (the allocation's cause)."""
    for frame in reversed(frames):  # most recent call first
        for fragment, name in OWNERS:
            if fragment in frame.filename:
                return name
    return "other: " + f"{Path(frames[-1].filename).name}:{frames[-1].lineno}"


def allocation_site(frames: tracemalloc.Traceback) -> str:
    """The innermost line of a known owner, with the line that allocated."""
    last = frames[-1]
    for frame in reversed(frames):
        if any(fragment in frame.filename for fragment, _ in OWNERS):
            name = "/".join(Path(frame.filename).parts[-2:])
            # The line's own text names the object better than its number (which moves between versions).
            code = linecache.getline(frame.filename, frame.lineno).strip()[:70]
            return f"{name}:{frame.lineno} `{code}` (allocated at {Path(last.filename).name}:{last.lineno})"
    return f"{Path(last.filename).name}:{last.lineno}"


def per_connection(items: list[tuple[str, int]], connections: int, at_least: int) -> dict[str, int]:
    """Bytes per connection of each item, leaving out those under ``at_least`` bytes."""
    return {name: round(size / connections) for name, size in items if abs(size) >= connections * at_least}


def type_counts() -> tuple[Counter[str], Counter[str]]:
    """Bytes and numbers of the objects the collector tracks, by type."""
    gc.collect()
    sizes: Counter[str] = Counter()
    counts: Counter[str] = Counter()
    for obj in gc.get_objects():
        name = type(obj).__qualname__
        sizes[name] += sys.getsizeof(obj)
        counts[name] += 1
    return sizes, counts


async def serve_and_measure(connections: int, traced: bool, keepalive: bool) -> dict[str, Any]:
    port = free_port()
    settings = Settings(
        port=port, jwt_secret=SECRET, log_level="warning", heartbeat=HEARTBEAT if keepalive else 15.0, **NO_LIMITS
    )

    app = create_standalone_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    result: dict[str, Any] = {"connections": connections, "traced": traced, "keepalive": keepalive}
    try:
        gc.collect()
        if traced:
            tracemalloc.start(25)
            before = tracemalloc.take_snapshot()
            types_before, counts_before = type_counts()
        rss_before = rss_kib(os.getpid())
        config = {"target": "signal", "port": port, "scenario": "S4", "secret": SECRET,
                  "connections": connections, "hold": 30, "concurrency": 100, "answer_pings": True}
        generator = await asyncio.create_subprocess_exec(
            "node", str(BENCH / "loadgen.mjs"), json.dumps(config), cwd=BENCH, stdout=subprocess.PIPE,
        )
        assert generator.stdout is not None
        while True:
            line = await asyncio.wait_for(generator.stdout.readline(), 300)
            if not line:
                raise RuntimeError("load generator ended before connecting")
            if json.loads(line)["phase"] == "connected":
                break
        if keepalive:  # let the keepalive sweeps ping every connection (and the pongs come back)
            await asyncio.sleep(HEARTBEAT * 1.25)
        gc.collect()
        result["rss_kib_per_connection"] = (rss_kib(os.getpid()) - rss_before) / connections
        # A figure is only worth something if every connection is still open (a client
        # that missed its pongs would have been dropped, its memory freed).
        peers = app[SIGNALING].peers
        result["live_connections"] = len(peers)
        result["pinged_connections"] = sum(1 for peer in peers if peer._pings_out is not None)
        if result["live_connections"] != connections:
            raise RuntimeError(f"only {result['live_connections']} of {connections} connections are live")
        if traced:
            after = tracemalloc.take_snapshot()
            types_after, counts_after = type_counts()
            tracemalloc.stop()
            owners: Counter[str] = Counter()
            sites: Counter[str] = Counter()
            for stat in after.compare_to(before, "traceback"):
                owners[owner(stat.traceback)] += stat.size_diff
                sites[allocation_site(stat.traceback)] += stat.size_diff
            result["traced_bytes_per_connection"] = sum(owners.values()) / connections
            result["by_owner"] = per_connection(owners.most_common(), connections, 8)
            result["by_site"] = per_connection(sites.most_common(40), connections, 16)
            result["by_type"] = per_connection((types_after - types_before).most_common(25), connections, 8)
            result["objects_per_connection"] = {
                name: round((counts_after[name] - counts_before[name]) / connections, 2)
                for name in ("WebSocketPeer", "RequestHandler", "TCPTransport", "Task", "coroutine", "deque")
            }
        generator.kill()
        await generator.wait()
    finally:
        await runner.cleanup()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=2000)
    parser.add_argument("--keepalive", action="store_true")
    parser.add_argument(
        "--traced-connections", type=int, default=2000,
        help="connections of the tracemalloc run (at most --connections; 0: none; tracing 25 frames deep "
        "makes the server too slow to take 10,000 handshakes in time)",
    )
    args = parser.parse_args()
    raise_file_limit()
    outcomes = []
    for traced in (False, True):
        connections = min(args.connections, args.traced_connections) if traced else args.connections
        if connections <= 0:
            continue  # --traced-connections 0: RSS only
        outcome = uvloop.run(serve_and_measure(connections, traced, args.keepalive))
        print(json.dumps(outcome, indent=1), flush=True)
        outcomes.append(outcome)
    (BENCH / "results").mkdir(exist_ok=True)
    name = f"memory-{args.connections}{'-keepalive' if args.keepalive else ''}.json"
    (BENCH / "results" / name).write_text(json.dumps(outcomes, indent=1))


if __name__ == "__main__":
    main()
