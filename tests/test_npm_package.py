"""signal-client.js as an npm package: `npm pack` ships the module and its types,
a bundler (esbuild) builds an app importing it, and TypeScript checks against the types."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from signal_server import __version__

ROOT = Path(__file__).parent.parent
PACKAGE = ROOT / "signal_server" / "static"
TOOLS = ROOT / ".venv" / "npm-tools"  # gitignored, like .venv/wscat

APP_JS = """\
import WebRTCCall, { SignalingError, rtcConfiguration } from "signal-server-client";
const call = new WebRTCCall("https://signal.example", () => "token", "room-1");
call.on("status", (status) => console.log(status, SignalingError.name, rtcConfiguration({})));
export default call;
"""
APP_TS = """\
import { WebRTCCall, SignalingError, type CallStatus, type ErrorCode } from "signal-server-client";
const call = new WebRTCCall("https://signal.example", async () => "token", "room-1", { connectAttempts: 2 });
const stop: () => void = call.on("status", (status: CallStatus) => console.log(status));
call.on("error", (message: string, code: ErrorCode) => {
  if (code === "ROOM_FULL" || code === "NETWORK_ERROR") console.log(message);
});
call.on("remotestream", (userId: string, stream: MediaStream) => console.log(userId, stream.id));
const on: boolean = call.setMicrophoneEnabled(false);
const pc: RTCPeerConnection | null = call.getPeerConnection("bob");
// @ts-expect-error: not an event of the call
call.on("nonsense", () => {});
// @ts-expect-error: not a status
const wrong: CallStatus = "open";
// @ts-expect-error: internals are not part of the API
call.peers;
call.connect().catch((error: unknown) => {
  if (error instanceof SignalingError && error.code === "ABORTED") stop();
});
console.log(on, pc, wrong);
"""


@pytest.fixture(scope="session")
def tools() -> Path:
    """esbuild and TypeScript from the npm registry, installed once into .venv/npm-tools."""
    if not (TOOLS / "node_modules" / ".bin" / "tsc").exists():
        TOOLS.mkdir(parents=True, exist_ok=True)
        subprocess.run(
            ["npm", "install", "--no-audit", "--no-fund", "--loglevel=error", "--prefix", str(TOOLS),
             "esbuild@0.25", "typescript@5"],
            check=True, timeout=300,
        )
    return TOOLS / "node_modules" / ".bin"


def run(*command: str, cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{command}: {result.stdout}{result.stderr}"
    return result.stdout


@pytest.fixture
def packed(tmp_path: Path) -> Path:
    """The tarball `npm pack` makes from signal_server/static."""
    out = run("npm", "pack", "--json", "--pack-destination", str(tmp_path), cwd=PACKAGE)
    (entry,) = json.loads(out)
    assert sorted(f["path"] for f in entry["files"]) == ["package.json", "signal-client.d.ts", "signal-client.js"]
    return tmp_path / str(entry["filename"])


def test_npm_pack_ships_the_module_and_its_types(packed):
    """The package holds the module and the declarations, and package.json points at both."""
    manifest = json.loads((PACKAGE / "package.json").read_text())
    assert manifest["exports"]["."] == {"types": "./signal-client.d.ts", "default": "./signal-client.js"}
    assert manifest["version"] == __version__
    assert packed.exists()


def test_an_esbuild_bundle_and_a_typescript_check_of_an_app_importing_it(packed, tools, tmp_path):
    """An app installs the tarball; esbuild bundles it; tsc --strict accepts correct use, rejects wrong use."""
    app = tmp_path / "app"
    app.mkdir()
    (app / "package.json").write_text(json.dumps({"name": "app", "private": True, "type": "module"}))
    run("npm", "install", "--no-audit", "--no-fund", "--loglevel=error", str(packed), cwd=app)
    (app / "app.js").write_text(APP_JS)
    run(str(tools / "esbuild"), "app.js", "--bundle", "--format=esm", "--outfile=out.js", cwd=app)
    bundle = (app / "out.js").read_text()
    assert "getPeerConnection(userId)" in bundle  # the module itself, not a reference to it
    assert not re.search(r"^import |\bfrom \"", bundle, re.MULTILINE), "the bundle must be self-contained"
    (app / "app.ts").write_text(APP_TS)
    run(str(tools / "tsc"), "--noEmit", "--strict", "--target", "es2022", "--module", "esnext",
        "--moduleResolution", "bundler", "--lib", "es2022,dom", "app.ts", cwd=app)
