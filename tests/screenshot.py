"""`make screenshot`: a real two-party call in the demo page, captured by headless Chromium.

Runs inside the loopback-only namespace like the browser tests, and writes
docs/screenshot.png for the README.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from .conftest import make_token
from .realclients import (
    CONNECTED_PEERS,
    WAIT_MS,
    frames_above,
    launch_browser,
    open_and_join,
    require_loopback_only,
    start_signal_server,
    wait_for,
)

OUTPUT = Path(__file__).parent.parent / "docs" / "screenshot.png"


async def main() -> None:
    require_loopback_only()
    server = await start_signal_server()
    origin = f"http://127.0.0.1:{server.port}"
    try:
        async with launch_browser() as browser:
            pages = []
            for user, name in (("alice", "Alice"), ("bob", "Bob")):
                context = await browser.new_context(viewport={"width": 1100, "height": 560})
                page = await context.new_page()
                await open_and_join(page, f"{origin}/?room=demo&token={make_token(user, name=name)}")
                pages.append(page)
            for page in pages:
                await wait_for(page, CONNECTED_PEERS, arg=1, timeout=WAIT_MS)
                await wait_for(
                    page, frames_above(30), timeout=WAIT_MS
                )
            await pages[0].screenshot(path=str(OUTPUT))
    finally:
        await server.close()
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except BaseException as error:  # pytest.fail raises an Exception subclass of BaseException
        print(f"screenshot failed: {error}", file=sys.stderr)
        raise SystemExit(1) from None
