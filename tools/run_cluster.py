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
    secret = secrets.token_urlsafe(32)
    signal_server = str(Path(sys.executable).with_name("signal-server"))
    processes: list[subprocess.Popen[bytes]] = []

    def spawn(prefix: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
        )
        processes.append(process)
        threading.Thread(target=_pipe, args=(prefix, process), daemon=True).start()
        return process

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
        tokens = {
            user: subprocess.run(
                [signal_server, "token", user, "--name", user.title(), "--ttl", "86400"],
                env={**os.environ, "SIGNAL_JWT_SECRET": secret}, capture_output=True, text=True, check=True,
            ).stdout.strip()
            for user in ("alice", "bob")
        }
        base = f"http://127.0.0.1:{balancer}"
        print(
            f"\nrun-cluster: nginx on {base} balances node1-3 on ports {nodes[0]}-{nodes[-1]} "
            f"(Redis on {redis_port}).\nOpen these in two tabs and press Join (each WebSocket goes to the next node):\n"
            + "".join(f"  {user}: {base}/?room=demo&token={token}\n" for user, token in tokens.items())
            + "Which node serves a tab: the [nodeN] 'join room=demo user=...' lines below, or the\n"
            "X-Signal-Node response header of the WebSocket in the browser's developer tools.\n"
            "Ctrl-C stops everything.\n",
            flush=True,
        )
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        print("run-cluster: a process exited; stopping the rest", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for process in reversed(processes):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
