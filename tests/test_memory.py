"""What an idle connection keeps: the references cut to bring its memory down must stay cut.

Deterministic: the connections are open and idle (each has relayed a message
to prove it), ``gc.collect()`` runs, and the live objects are counted. The
figures these cuts bought are in docs/benchmarks.md (bench/memory.py).
"""

from __future__ import annotations

import asyncio
import gc
import types
from typing import Any

from aiohttp.http_parser import HttpRequestParser
from multidict import MultiDict, MultiDictProxy

from signal_server.context import SIGNALING
from signal_server.handlers import query_tokens

from .conftest import connector, join_all


def handler_coroutines(task: asyncio.Task[Any]) -> list[str]:
    """The names of the signal_server coroutines a task is suspended in, outermost first."""
    names = []
    coroutine: Any = task.get_coro()
    while isinstance(coroutine, types.CoroutineType):
        if "signal_server" in coroutine.cr_code.co_filename:
            names.append(coroutine.cr_code.co_name)
        coroutine = coroutine.cr_await
    return names


async def test_an_idle_connection_keeps_no_http_parser_query_or_response_headers_and_one_coroutine(app_client) -> None:
    client = await app_client()
    sig = client.app[SIGNALING]
    members = await join_all(connector(client), "alice", "bob", "carol")
    await members[0].offer(target="bob")
    assert (await members[1].expect("offer"))["sender_id"] == "alice"  # open, idle and relaying
    gc.collect()
    # The upgraded connections' HTTP parsers are released (the test client parses responses,
    # not requests, so every HttpRequestParser alive would be one of the server's).
    assert len(sig.peers) == 3
    assert [o for o in gc.get_objects() if isinstance(o, HttpRequestParser)] == []
    # The token was read from the raw request line: no parsed query (a MultiDict holding
    # the decoded token) is cached on the request or its URL for the connection's life.
    assert [o for o in gc.get_objects() if isinstance(o, (MultiDict, MultiDictProxy)) and "token" in o] == []
    # The handshake's response headers, sent long ago, are not kept.
    assert [dict(peer.ws.headers) for peer in sig.peers] == [{}] * 3
    # One coroutine of ours per connection: admission, relay and leave are not a chain of them.
    chains = [handler_coroutines(task) for task in asyncio.all_tasks()]
    handlers = [names for names in chains if "websocket_handler" in names]
    assert handlers == [["websocket_handler"]] * 3
    await members[2].send("offer", type="offer", sdp="v=0")  # still fully working after the cuts
    for other in members[:2]:
        assert (await other.expect("offer"))["sender_id"] == "carol"
    for member in members:
        await member.ws.close()


def test_the_token_is_read_from_the_query_as_aiohttp_would_decode_it() -> None:
    from yarl import URL

    class Request:
        def __init__(self, raw_path: str) -> None:
            self.raw_path = raw_path

    cases = {
        "/ws/r?token=abc.def-ghi_": ["abc.def-ghi_"],
        "/ws/r?x=1&token=a%2Bb&token=second": ["a+b", "second"],  # percent-decoded, both (refused)
        "/ws/r?%74oken=encoded": ["encoded"],
        "/ws/r?token=a+b": ["a b"],
        "/ws/r?token": [""],
        "/ws/r?tokens=no&x=token": [],
        "/ws/r": [],
        "/ws/r?token=t#fragment": ["t"],
    }
    for raw_path, expected in cases.items():
        found = query_tokens(Request(raw_path))  # type: ignore[arg-type]
        assert found == expected == URL(raw_path).query.getall("token", []), raw_path
