"""``make run-cluster``: Redis, three nodes and nginx round-robin in front, on one port.

Everything binds to 127.0.0.1: the balancer on ``--port`` (default 8080), the
nodes on the next three ports, redis-server on the one after. The nodes share
a random secret made here, and this prints a demo link per user: open two in
two tabs and the two sides of the call land on different nodes (WebSocket
upgrades take their own round-robin turn, so page loads do not skew it). Each
node's log lines are prefixed with its id, and every response carries an
``X-Signal-Node`` header, so you can see which node serves which tab.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

__all__ = ["nginx_config", "main"]


def nginx_config(listen: int, node_ports: Sequence[int], directory: Path) -> str:
    """A foreground nginx that balances /webrtc/ws/ and the rest round-robin, upgrades passed."""
    servers = "".join(f"    server 127.0.0.1:{port};\n" for port in node_ports)
    temp = directory / "nginx-temp"
    temp.mkdir(parents=True, exist_ok=True)
    return f"""daemon off;
worker_processes 1;
pid {directory}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  client_body_temp_path {temp}/body;
  proxy_temp_path {temp}/proxy;
  fastcgi_temp_path {temp}/fastcgi;
  uwsgi_temp_path {temp}/uwsgi;
  scgi_temp_path {temp}/scgi;
  upstream signal_ws {{
{servers}  }}
  upstream signal_http {{
{servers}  }}
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  server {{
    listen 127.0.0.1:{listen};
    location /webrtc/ws/ {{
      proxy_pass http://signal_ws;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_read_timeout 1h;
      proxy_send_timeout 1h;
    }}
    location / {{
      proxy_pass http://signal_http;
      proxy_http_version 1.1;
      proxy_set_header Host $host;
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    }}
  }}
}}
"""


def _command(name: str, sbin: bool = False) -> str:
    found = shutil.which(name) or (shutil.which(name, path="/usr/sbin:/sbin") if sbin else None)
    if not found:
        sys.exit(f"run-cluster: {name} is not installed (make system-deps installs it)")
    return found


def _pipe(prefix: str, process: subprocess.Popen[bytes]) -> None:
    assert process.stdout is not None
    for raw in process.stdout:
        sys.stdout.write(f"[{prefix}] {raw.decode(errors='replace')}")
        sys.stdout.flush()


def _wait_ready(port: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    sys.exit(f"run-cluster: the node on port {port} did not become ready")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="run-cluster", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "8080")))
    args = parser.parse_args(argv)
    balancer, nodes = args.port, [args.port + 1, args.port + 2, args.port + 3]
    redis_port = args.port + 4
    directory = Path(tempfile.mkdtemp(prefix="signal-cluster-"))
    # Your own secret when set (to mint tokens for it elsewhere), else a random one.
    secret = os.environ.get("SIGNAL_JWT_SECRET") or secrets.token_urlsafe(32)
    signal_server = str(Path(sys.executable).with_name("signal-server"))
    processes: dict[str, subprocess.Popen[bytes]] = {}

    def spawn(prefix: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        # A session of its own: Ctrl-C reaches this supervisor only, which then stops
        # the balancer, the nodes and Redis last, in that order.
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})},
            start_new_session=True,
        )
        processes[prefix] = process
        threading.Thread(target=_pipe, args=(prefix, process), daemon=True).start()
        return process

    def mint(*extra: str) -> str:
        return subprocess.run(
            [signal_server, "token", *extra], env={**os.environ, "SIGNAL_JWT_SECRET": secret},
            capture_output=True, text=True, check=True,
        ).stdout.strip()

    try:
        spawn("redis", [
            _command("redis-server"), "--port", str(redis_port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(directory),
        ])
        for index, port in enumerate(nodes, 1):
            spawn(f"node{index}", [
                signal_server, "--port", str(port), "--node-id", f"node{index}",
                "--redis-url", f"redis://127.0.0.1:{redis_port}",
            ], env={"SIGNAL_JWT_SECRET": secret})
        for port in nodes:
            _wait_ready(port)
        config = directory / "nginx.conf"
        config.write_text(nginx_config(balancer, nodes, directory))
        spawn("nginx", [_command("nginx", sbin=True), "-e", "stderr", "-c", str(config), "-p", str(directory)])
        tokens = {user: mint(user, "--name", user.title(), "--ttl", "86400") for user in ("alice", "bob")}
        admin = mint("--admin", "operator", "--ttl", "86400")
        base = f"http://127.0.0.1:{balancer}"
        pids = ", ".join(f"node{i} {processes[f'node{i}'].pid}" for i in range(1, 4))
        print(
            f"\nrun-cluster: nginx on {base} balances node1-3 on ports {nodes[0]}-{nodes[-1]} "
            f"(Redis on {redis_port}).\nOpen these in two tabs and press Join (each WebSocket goes to the next node):\n"
            + "".join(f"  {user}: {base}/?room=demo&token={token}\n" for user, token in tokens.items())
            + "Which node serves a tab: the [nodeN] 'join room=demo user=...' lines below, or the\n"
            "X-Signal-Node response header of the WebSocket in the browser's developer tools.\n"
            f"Node pids: {pids}. Kill the node of one tab (kill -9 PID): the tab resumes on another\n"
            "node within a second or two and the call goes on; the others log 'node ... is gone' after\n"
            "the node TTL. The cluster keeps running while a node and Redis are up.\n"
            "The room service API (admin token valid 24 h):\n"
            f"  SIGNAL_ADMIN_TOKEN={admin} {signal_server} rooms --url {base}/webrtc list\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        return _supervise(processes)
    except KeyboardInterrupt:
        return 0
    finally:
        _stop_all(processes)
        shutil.rmtree(directory, ignore_errors=True)


def _supervise(processes: dict[str, subprocess.Popen[bytes]]) -> int:
    """Run until Ctrl-C, Redis or nginx exits, or no node is left; report each node that exits."""
    reported: set[str] = set()
    while True:
        for name, process in processes.items():
            code = process.poll()
            if code is None or name in reported:
                continue
            reported.add(name)
            if not name.startswith("node"):
                print(f"run-cluster: {name} exited ({code}); stopping the rest", file=sys.stderr, flush=True)
                return 1
            print(f"run-cluster: {name} exited ({code}); its clients go to the other nodes", flush=True)
        if all(processes[name].poll() is not None for name in processes if name.startswith("node")):
            print("run-cluster: no node left; stopping", file=sys.stderr, flush=True)
            return 1
        time.sleep(0.5)


def _stop_all(processes: dict[str, subprocess.Popen[bytes]]) -> None:
    """The balancer first, then the nodes (they deregister from Redis), Redis last."""
    order = ["nginx", *sorted(name for name in processes if name.startswith("node")), "redis"]
    for group in (order[:1], order[1:-1], order[-1:]):
        running = [processes[name] for name in group if name in processes and processes[name].poll() is None]
        for process in running:
            process.send_signal(signal.SIGTERM)
        for process in running:
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()


if __name__ == "__main__":
    sys.exit(main())
