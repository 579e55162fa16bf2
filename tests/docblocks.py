"""Running documentation as written: fenced blocks taken from a Markdown file, each in its own shell.

A block is found by its section heading and its fence's language, so a test
breaks when the documentation moves or changes shape instead of running
something else. The shells see the repository's `.venv/bin` only where a test
says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from .conftest import TIMEOUT, without_secret

ROOT = Path(__file__).parent.parent
ENV = {**without_secret(os.environ), "PYTHONUNBUFFERED": "1"}


def section(text: str, title: str, level: int = 2) -> str:
    """The section under the heading ``title`` (``level`` #s), up to the next heading of that level or above.

    Lines inside fences are never headings (a shell comment starts with ``#`` too).
    """
    lines = text.splitlines(keepends=True)
    start = lines.index(f"{'#' * level} {title}\n")
    fenced_now = False
    for end in range(start + 1, len(lines)):
        line = lines[end]
        if line.startswith("```"):
            fenced_now = not fenced_now
        elif not fenced_now and re.match(rf"#{{1,{level}}} ", line):
            break
    else:
        end = len(lines)
    return "".join(lines[start:end])


def fenced(text: str, language: str) -> list[str]:
    """The bodies of the ``language`` fences in ``text``, in order."""
    return re.findall(rf"```{language}\n(.*?)```", text, re.DOTALL)


def replace_once(text: str, replacements: dict[str, str]) -> str:
    """Each substitution exactly once: a documentation drift fails the test instead of passing it by."""
    for old, new in replacements.items():
        assert text.count(old) == 1, f"expected exactly one {old!r} in:\n{text}"
        text = text.replace(old, new)
    return text


class Shell:
    """One terminal: a bash running a block, stdin held open, output read line by line."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.seen: list[str] = []

    async def line(self, wanted: str) -> str:
        assert self.process.stdout is not None
        async with asyncio.timeout(TIMEOUT * 4):
            while True:
                line = (await self.process.stdout.readline()).decode()
                assert line, f"exited before printing {wanted!r}: {self.seen}"
                self.seen.append(line)
                if wanted in line:
                    return line

    async def message(self, kind: str) -> dict[str, Any]:
        """The next JSON message of ``kind`` the shell shows."""
        while True:
            line = await self.line('"type"')
            message: dict[str, Any] = json.loads(line[line.index("{"):])
            if message["type"] == kind:
                return message

    def type(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text.encode() + b"\n")

    async def finish(self, status: int = 0) -> str:
        """Wait for the block to end by itself with ``status``; its whole output."""
        assert self.process.stdout is not None
        output = await asyncio.wait_for(self.process.stdout.read(), TIMEOUT * 6)
        text = "".join(self.seen) + output.decode()
        assert await asyncio.wait_for(self.process.wait(), TIMEOUT) == status, text
        return text


OpenTerminal = Callable[..., Awaitable[Shell]]


async def open_shells() -> AsyncIterator[OpenTerminal]:
    """``await open_terminal(script, cwd, **env)``: a new shell running ``script``; all killed at the end.

    The body of conftest's ``shells`` fixture.
    """
    opened: list[Shell] = []

    async def open_terminal(script: str, cwd: Path, **env: str) -> Shell:
        process = await asyncio.create_subprocess_exec(
            "bash", "-c", script, cwd=cwd, env={**ENV, **env}, start_new_session=True,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )
        shell = Shell(process)
        opened.append(shell)
        return shell

    yield open_terminal
    for shell in opened:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(shell.process.pid, signal.SIGKILL)  # make, npx: the whole group
        await shell.process.wait()
