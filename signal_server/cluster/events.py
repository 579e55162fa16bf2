"""The cluster's webhook events in Redis, as one node takes and finishes them.

The scripts push events on ``sig:wh:q`` (see ``webhook()`` in
:mod:`.scripts`). A node moves a batch atomically to its own in-flight list,
``sig:wh:f:<node>:<boot>``, and removes each one only once every receiver
answered it or it was given up: a node that dies with events in flight leaves
them there, and the list goes back to the head of the queue when the node is
found dead (``RELEASE_NODES``), stops (``NODE_DOWN``) or its id starts again
(``NODE_UP``). At least once: an event given back may have been delivered
already, with the same id.

This runs on the webhook sender's own tasks, never on the signaling path.
"""

from __future__ import annotations

from typing import Any

from redis.asyncio import Redis

__all__ = ["ClusterEvents", "TAKE"]

# ARGV: in-flight list, how many at most -> {sig:wh:dropped, queue length after, {events...}}
TAKE = r"""
local taken, want = ARGV[1], tonumber(ARGV[2])
local items = {}
if want > 0 then
  items = redis.call('LRANGE', 'sig:wh:q', 0, want - 1)
  if #items > 0 then
    redis.call('LTRIM', 'sig:wh:q', #items, -1)
    redis.call('RPUSH', taken, unpack(items))
  end
end
return {tonumber(redis.call('GET', 'sig:wh:dropped') or '0'), redis.call('LLEN', 'sig:wh:q'), items}
"""


class ClusterEvents:
    """Take events from the cluster's queue into this process's in-flight list; finish them."""

    def __init__(self, redis: Redis, node: str, boot: str) -> None:
        self._redis = redis
        self.taken_key = f"sig:wh:f:{node}:{boot}"
        self._take = redis.register_script(TAKE)  # loads itself again after NOSCRIPT

    async def take(self, limit: int) -> tuple[list[bytes], int, int]:
        """Up to ``limit`` events, in order; with the cluster's dropped count and queue length."""
        reply: Any = await self._take(args=[self.taken_key, limit])
        return list(reply[2]), int(reply[0]), int(reply[1])

    async def finish(self, events: list[bytes]) -> None:
        """Off the in-flight list: delivered, or given up (each event is unique: its id)."""
        async with self._redis.pipeline(transaction=False) as pipe:
            for raw in events:
                pipe.execute_command("LREM", self.taken_key, 1, raw)
            await pipe.execute()
