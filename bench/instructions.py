"""Instructions per relayed message, counted by callgrind: a figure the machine's noise cannot move.

Each target runs under `valgrind --tool=callgrind` twice: once relaying N
messages, once relaying none (start-up, joins, shutdown only). The difference
divided by N is the interpreter's (and libraries') instruction count per
message, repeatable to well under a percent.

The same for joins (connect, JWT, room_state): runs with 20 and 320 joins,
against the floor that verifies the same JWT.

Usage: python bench/instructions.py [N]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from run import BENCH, FLOOR, FLOOR_JWT, SECRET, SIGNAL, Target, free_port, wait_listening

ROOMS = 10
JOIN_ROOMS = (10, 160)  # rooms of two: 20 and 320 joins


def total_instructions(target: Target, messages: int, rooms: int = ROOMS) -> int:
    port = free_port()
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "callgrind.out"
        server = subprocess.Popen(
            ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
             *(part.replace("{port}", str(port)) for part in target.command)],
            cwd=BENCH, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            wait_listening(port, server, seconds=180)
            config = {"target": target.protocol, "port": port, "scenario": "count", "secret": SECRET,
                      "rooms": rooms, "messages": messages}
            result = subprocess.run(["node", str(BENCH / "loadgen.mjs"), json.dumps(config)],
                                    capture_output=True, text=True, timeout=900, check=True)
            final = json.loads(result.stdout.strip().splitlines()[-1])
            assert final["lost"] == 0 and not final["bad_envelopes"], final
        finally:
            server.terminate()
            server.wait(timeout=120)
        summary = re.search(r"^summary: (\d+)", out.read_text(), re.MULTILINE)
        assert summary, "callgrind wrote no summary"
        return int(summary.group(1))


def main() -> None:
    messages = int(sys.argv[1]) if len(sys.argv) > 1 else 4000
    figures = {}
    for target in (FLOOR, SIGNAL):
        base = total_instructions(target, 0)
        loaded = total_instructions(target, messages)
        figures[target.name] = (loaded - base) / messages
        print(json.dumps({"target": target.name, "instructions_per_message": round(figures[target.name])}), flush=True)
    ratio = figures[SIGNAL.name] / figures[FLOOR.name]
    print(json.dumps({"signal_over_floor_instructions": round(ratio, 3)}), flush=True)
    joins = {}
    for target in (FLOOR_JWT, SIGNAL):
        few, many = (total_instructions(target, 0, rooms) for rooms in JOIN_ROOMS)
        joins[target.name] = (many - few) / (2 * (JOIN_ROOMS[1] - JOIN_ROOMS[0]))
        print(json.dumps({"target": target.name, "instructions_per_join": round(joins[target.name])}), flush=True)
    print(json.dumps({"signal_over_floor_join_instructions": round(joins[SIGNAL.name] / joins[FLOOR_JWT.name], 3)}))
    (BENCH / "results").mkdir(exist_ok=True)
    (BENCH / "results" / "instructions.json").write_text(json.dumps({
        "messages": messages,
        "floor_message": figures[FLOOR.name], "signal_message": figures[SIGNAL.name],
        "floor_join": joins[FLOOR_JWT.name], "signal_join": joins[SIGNAL.name],
    }, indent=1))


if __name__ == "__main__":
    main()
