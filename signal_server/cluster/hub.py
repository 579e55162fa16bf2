"""The hub of a node in a cluster: local rooms as before, Redis as the registry.

:class:`ClusterHub` keeps the hub's interface (``join``/``leave``/``drop``/
``route``) and its local rooms; each local room also mirrors the room's
members on other nodes (``remote``: user -> username and node). ``route``
delivers to local recipients exactly as the single-node hub does, then queues
one publish per other node that has recipients: it never awaits Redis.
Membership changes go through the Lua scripts in :mod:`.scripts` and come
back to the other nodes as events on their channels (see docs/scaling.md).

Slots of this node are its own truth: a held slot stays in the local room
(without a peer) with its kept frames in Redis, so a resume through any node
replays them; the reaper's ``user_left`` event removes it when the grace ends.
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from redis.exceptions import RedisError

from ..auth import Identity
from ..errors import CloseCode, SignalError
from ..hub import Hub, HubLimits, Peer, Room, Sent, Slot, removed_error
from ..metrics import Metrics
from ..protocol import encode_envelope, encode_server_message
from ..settings import Settings
from .events import ClusterEvents
from .link import TICK, LinkDown, RedisLink, client_name

__all__ = ["ClusterHub"]

logger = logging.getLogger("signal_server.cluster")

UNAVAILABLE_EVERY = 1.0  # seconds between UNAVAILABLE reports to one connection
# Seconds a resume through this node waits for the hand-off barriers of a slot held on
# another node (a few Redis round trips when all is well); past it, recovered false.
HANDOFF_WAIT = 3.0


@dataclass(slots=True)
class Remote:
    """A member of a room on another node, as this node mirrors it."""

    username: str
    node: str
    seq: int
    sent: bool = False  # this node published a frame to it (its resume elsewhere waits for that)


class ClusterSlot(Slot):
    """A local slot, plus what the registry knows of it."""

    __slots__ = ("epoch", "seq", "since", "unavailable_at", "fallback", "stale")

    def __init__(
        self, user_id: str, username: str, room: Room, peer: Peer, epoch: int, seq: int, since: int
    ) -> None:
        super().__init__(user_id, username, room, peer)
        self.epoch = epoch
        self.seq = seq
        # The room version of the registry's answer this slot stands on: news of an
        # older version is about an earlier slot of the user, never about this one.
        self.since = since
        self.unavailable_at = -UNAVAILABLE_EVERY
        self.fallback: asyncio.TimerHandle | None = None
        # The node this slot was resumed from without its hand-off (recovered false): what
        # the registry forwards on its behalf from now on was sent before frames this slot
        # has had, so it is dropped rather than delivered out of order (the client renegotiates).
        self.stale: str | None = None


class ClusterRoom(Room):
    """A local room with the mirror of its members on other nodes."""

    __slots__ = ("remote", "version", "pending", "joining", "missed", "inflight")

    def __init__(self, room_id: str) -> None:
        super().__init__(room_id)
        self.remote: dict[str, Remote] = {}
        self.version = 0
        # Events that arrive before the first membership list was read are
        # kept here and applied after it (None once the room is established).
        self.pending: list[tuple[bytes, dict[str, Any]]] | None = []
        self.joining = 0
        # While joins are in flight: takeovers and leaves seen per user, so a
        # join whose reply comes after them applies them to its new slot (an
        # event newer than the join must win even though it arrived first).
        self.missed: dict[str, list[tuple[bytes, dict[str, Any]]]] = {}
        # Frames for a user whose join is in flight here, delivered once it is
        # attached (Redis would find the slot live and drop them).
        self.inflight: dict[str, Inflight] = {}


@dataclass(slots=True)
class Inflight:
    """Frames that reached a user while its join was in flight on this node."""

    # (frame, addressed to this user and not a broadcast, forwarded by the old node's KEEP)
    frames: list[tuple[bytes, bool, bool]]
    lost: bool = False
    # The old node is alive and did not hand over in time (or is cut off): frames it
    # forwards later were sent before ones this resume delivers, so they are dropped.
    late: bool = False
    waiting: Handoff | None = None  # a resume waiting for hand-off barriers
    # Hand-off barriers (epoch, from node, lost): one may come before the JOIN reply is read.
    barriers: list[tuple[int, str, bool]] = field(default_factory=list)


@dataclass(slots=True)
class Handoff:
    """A resume through another node: the barriers the new node still waits for, or
    (on the old node) whether a frame for the user was dropped here.

    Frames for a user who resumes elsewhere may still be on their way through the old
    node (senders that had not heard of the move): the old node keeps or forwards
    them with KEEP. Each node that heard the takeover event sends a marker through
    the old node after its last such frame; the old node passes it on to the new node
    behind the frames it forwarded. The new node says recovered true only once every
    barrier came back clean, then delivers forwarded frames before direct ones.
    """

    epoch: int
    expected: set[str]
    done: asyncio.Future[None] | None = None
    lost: bool = False


def unavailable(detail: str, *, fatal: bool) -> SignalError:
    return SignalError("UNAVAILABLE", detail, fatal=fatal)


class ClusterHub(Hub):
    """Rooms that span every node sharing one Redis."""

    def __init__(self, limits: HubLimits, metrics: Metrics, settings: Settings) -> None:
        super().__init__(limits, metrics)
        self.node: str = settings.node_id or secrets.token_hex(4)
        self.link = RedisLink(
            settings, self.node, self._on_message, self._on_state, self._on_registered, self._on_subscribed
        )
        self.published = 0
        self.received = 0
        self._restore: asyncio.Task[None] | None = None
        self._resync: asyncio.Task[None] | None = None
        self._generation: bytes | None = None  # of the registry this node's mirrors were read from
        self._stopping = False
        # Rooms where a LEAVE or HOLD of ours failed (Redis unreachable): made
        # right again from the local slots as soon as Redis answers.
        self._dirty: set[str] = set()
        # Who left those rooms meanwhile (user -> username, reason): announced by
        # the re-registration even if Redis lost their records.
        self._gone: dict[str, dict[str, tuple[str, str]]] = {}
        # Slots of this node resumed elsewhere, whose markers it passes on, by (room, user).
        self._handoffs: dict[tuple[str, str], Handoff] = {}
        metrics.registry.register(_ClusterCollector(self))

    # ------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        await self.link.start()
        logger.info("cluster: node %s registered", self.node)

    async def stop(self) -> None:
        """Hold every live slot in Redis (clients resume on another node), then deregister."""
        self._stopping = True
        for room in list(self.rooms.values()):
            for slot in list(room.slots.values()):
                if isinstance(slot, ClusterSlot) and slot.peer is not None:
                    if slot.peer.lost:
                        slot.incomplete = True
                    slot.peer = None
                    self._hold(slot)
        self.cancel_timers()  # expiry is the registry's now
        for task in (self._restore, self._resync):
            if task is not None:
                task.cancel()
        await self.link.stop()

    @property
    def available(self) -> bool:
        return self.link.up

    def webhook_source(self) -> ClusterEvents:
        """The scripts push webhook events on a Redis list; webhooks.py takes them from here."""
        return ClusterEvents(self.link.redis, self.node, self.link.boot)

    def cancel_timers(self) -> None:
        for room in self.rooms.values():
            for slot in room.slots.values():
                if isinstance(slot, ClusterSlot) and slot.fallback is not None:
                    slot.fallback.cancel()
                    slot.fallback = None

    # ------------------------------------------------------------ membership

    async def join(self, room_id: str, identity: Identity, peer: Peer) -> Slot:
        """Admit through the registry (atomic cluster-wide), then attach locally.

        Raises:
            SignalError: ``ROOM_FULL``, ``TOO_MANY_ROOMS``, or ``UNAVAILABLE`` (close 1013)
            when Redis cannot be reached.
        """
        if not self.link.up:
            raise unavailable("the cluster registry is unreachable; try again later", fatal=True)
        user = identity.user_id
        room = self.rooms.get(room_id)
        if not isinstance(room, ClusterRoom):
            room = ClusterRoom(room_id)
            self.rooms[room_id] = room
        if user not in room.slots and self._user_rooms[user] >= self.limits.max_rooms_per_user:
            self._discard_if_empty(room)
            self.metrics.refused["rooms_per_user"] += 1
            raise SignalError("TOO_MANY_ROOMS", f"a user may be in at most {self.limits.max_rooms_per_user} rooms")
        if user not in room.slots and self.slot_count >= self.limits.max_slots:
            self._discard_if_empty(room)
            self.metrics.refused["server_slots"] += 1
            raise SignalError("SERVER_BUSY", "the server holds as many participants as it may")
        room.joining += 1  # keeps the room (mirror and pending events) until this join is done
        room.inflight.setdefault(user, Inflight([]))
        try:
            return await self._join_through_registry(room, identity, peer)
        finally:
            room.joining -= 1
            self._unbuffer(room, user)  # only if this join failed: the frames go to Redis
            if room.joining == 0:
                room.missed.clear()
                if room_id in self._dirty and self.link.up:  # postponed while joins were in flight
                    self._on_state(True)
            self._discard_if_empty(room)  # only if this join failed and nobody else is here

    def _unbuffer(self, room: ClusterRoom, user: str) -> None:
        """Frames buffered for a join that failed: kept in Redis as if it never started."""
        buffered = room.inflight.pop(user, None)
        if buffered is None:
            return
        local = room.slots.get(user)
        for frame, _, _ in buffered.frames:
            if local is not None:
                self._keep(local, frame)
            else:
                self.link.send_script(
                    "KEEP", room.room_id, user, self.node, frame, self.limits.kept_messages, self.limits.kept_bytes
                )

    async def _join_through_registry(self, room: ClusterRoom, identity: Identity, peer: Peer) -> Slot:
        room_id, user = room.room_id, identity.user_id
        call = asyncio.ensure_future(
            self.link.call("JOIN", room_id, user, identity.username, self.node, self.limits.max_participants)
        )
        try:
            # Shielded: if this task is cancelled (shutdown), the script may still
            # run, and an admitted slot with no connection must be given back.
            reply = await asyncio.shield(call)
        except asyncio.CancelledError:
            call.add_done_callback(lambda done: self._give_back(room_id, user, done))
            raise
        except (LinkDown, RedisError, OSError):
            # The script may still run in Redis (sent, then timed out): the room is
            # reconciled from the local slots, which removes a record without one.
            self._mark_dirty(room_id, None)
            raise unavailable("the cluster registry is unreachable; try again later", fatal=True) from None
        if int(reply[0]) == -2:  # kicked, or its room closed, within the grace: its reconnect gets the news
            raise removed_error(_text(reply[1]))
        if int(reply[0]) == -1:  # a ban of the room service API
            seconds = int(reply[1]) // 1000 + 1
            raise SignalError("FORBIDDEN", f"this room is closed to this user for another {seconds} s")
        if int(reply[0]) == 0:
            raise SignalError(
                "ROOM_FULL", f"room {room_id!r} is full ({int(reply[1])} of {self.limits.max_participants})"
            )
        version, resumed, held, overflowed, epoch = (int(value) for value in reply[1:6])
        try:
            old = _text(reply[7])
            if held and not overflowed and old != self.node:
                if int(reply[9]) and await self._connected(old):  # cut off: it may have dropped frames
                    room.inflight[user].lost = room.inflight[user].late = True
                else:
                    expected = self._senders(room, user, old, _members(reply[6]), {_text(n) for n in reply[8]})
                    if expected:
                        await self._hand_over(room, user, epoch, old, expected)
            return self._admitted(room, identity, peer, reply, version, epoch, resumed, held, overflowed)
        except BaseException:
            # All or nothing: Redis admitted us, so undo that before giving up.
            self.link.send_script("LEAVE", room_id, user, self.node, epoch, "left")
            raise

    def _senders(
        self, room: ClusterRoom, user: str, old: str, members: list[list[Any]], reached: set[str]
    ) -> set[str]:
        """The nodes whose barriers a resume of ``user`` (held on ``old``) waits for: every
        other node that heard the event (its markers go through the old node), the old
        node if it has other members there (they may have sent to the slot), and this
        node if it ever published a frame for the user."""
        expected = {node for node in reached if node != old}
        if old in reached and any(m[2] == old and m[0] != user for m in members):
            expected.add(old)
        known = room.remote.get(user)
        if known is not None and known.sent:
            expected.add(self.node)
        return expected

    async def _hand_over(self, room: ClusterRoom, user: str, epoch: int, old: str, expected: set[str]) -> None:
        """Wait (bounded) until every frame still on its way to ``user`` through the old
        node has reached this node's buffer; see :class:`Handoff`."""
        buffered = room.inflight[user]
        done = asyncio.get_running_loop().create_future()
        waiting = buffered.waiting = Handoff(epoch, set(expected), done)
        if self.node in expected:
            self._send_marker(room.room_id, user, epoch, old, self.node)  # behind this node's own frames
        self._count_barriers(buffered)
        try:
            async with asyncio.timeout(HANDOFF_WAIT):
                await done
        except TimeoutError:
            waiting.lost = buffered.late = True
        if waiting.lost:
            buffered.lost = True

    @staticmethod
    def _count_barriers(buffered: Inflight) -> None:
        waiting = buffered.waiting
        if waiting is None or waiting.done is None or waiting.done.done():
            return
        for epoch, origin, lost in buffered.barriers:
            if epoch == waiting.epoch:
                waiting.expected.discard(origin)
                waiting.lost = waiting.lost or lost
        if waiting.lost or not waiting.expected:
            waiting.done.set_result(None)

    async def _connected(self, node: str) -> bool:
        """Whether Redis still has a connection of ``node`` (a killed node has none; one
        whose subscriber is away while it lives does). True when Redis cannot tell."""
        try:
            clients = await self.link.redis.client_list(_type="normal")
        except (RedisError, OSError):
            return True
        name = client_name(node)
        return any(client.get("name") == name for client in clients)

    def _send_marker(self, room_id: str, user: str, epoch: int, old: str, new: str) -> None:
        """Through ``old``, behind the frames this node sent there; if nobody listens
        there, straight to ``new`` (those frames went to KEEP, in order, before it)."""

        def check(receivers: Any) -> None:
            if receivers == 0:
                self.link.send_script_next("HANDED", room_id, user, epoch, new, self.node)

        header = {"r": room_id, "u": user, "c": epoch, "n": new, "x": self.node}
        self.link.publish(old, b"q" + orjson.dumps(header) + b"\n", check)

    def _give_back(self, room_id: str, user: str, done: asyncio.Future[Any]) -> None:
        room = self.rooms.get(room_id)
        if isinstance(room, ClusterRoom):
            self._discard_if_empty(room)
        if done.cancelled() or done.exception() is not None or int(done.result()[0]) == 0:
            return
        self.link.send_script("LEAVE", room_id, user, self.node, int(done.result()[5]), "left")

    def _admitted(
        self, room: ClusterRoom, identity: Identity, peer: Peer, reply: list[Any], version: int, epoch: int,
        resumed: int, held: int, overflowed: int,
    ) -> Slot:
        """Attach ``peer`` after the registry admitted it: state first, then kept frames, then live."""
        user = identity.user_id
        members = _members(reply[6])
        kept: list[bytes] = reply[10:]
        # Events held back until this reply (the room is new here) apply first, with
        # this join still in flight: a close among them is kept for this user (missed).
        self._sync(room, members, version)
        buffered = room.inflight.pop(user, None) or Inflight([])
        slot = room.slots.get(user)
        if isinstance(slot, ClusterSlot):  # a takeover or resume of this node's own slot
            old = slot.peer
            recovered = (
                bool(held) and not overflowed and not slot.incomplete and not buffered.lost and old is None
            )
            state = self._state(slot, members, resumed=True, recovered=recovered)
            self.metrics.joins += 1
            self.metrics.resumes += 1
            self._attach(slot, peer, epoch)
            slot.since = version
            if old is not None:
                old.close(
                    CloseCode.SESSION_REPLACED,
                    SignalError("SESSION_REPLACED", "this user joined the room from another connection"),
                )
            peer.notify(state)
            if recovered:  # never a partial replay: recovered false replays nothing
                for frame in kept:
                    peer.send(frame)
            self._after_attach(room, slot, version, buffered, resumed=True)
            return slot
        seq = next((int(m[3]) for m in members if m[0] == user), 0)
        slot = ClusterSlot(user, identity.username, room, peer, epoch, seq, version)
        recovered = bool(held) and not overflowed and not buffered.lost
        if buffered.late:
            slot.stale = _text(reply[7])
        state = self._state(slot, members, resumed=bool(resumed), recovered=recovered)
        joined = encode_server_message("user_joined", slot.describe(), room.room_id)
        known = room.remote.pop(user, None)
        room.slots[user] = slot
        self._user_rooms[user] += 1
        self.slot_count += 1
        self.metrics.joins += 1
        peer.notify(state)
        if resumed:  # resumed through this node a slot another node held
            self.metrics.resumes += 1
            if recovered:  # never a partial replay: recovered false replays nothing
                for frame in kept:
                    peer.send(frame)
        if known is None:  # this node's members never heard of the user (its join event lost a race)
            for other in room.slots.values():
                if other is not slot:
                    self._deliver(other, joined)
        self._after_attach(room, slot, version, buffered, resumed=bool(resumed))
        return slot

    def _after_attach(
        self, room: ClusterRoom, slot: ClusterSlot, version: int, buffered: Inflight, *, resumed: bool
    ) -> None:
        """Frames that came while the join was in flight, then the takeovers and
        leaves of this user that Redis applied after the join but arrived before it."""
        peer = slot.peer
        assert peer is not None
        # Per sender, what came through the old node was sent before what came directly.
        for first in (True, False):
            for frame, addressed, forwarded in buffered.frames:
                if forwarded is first and (addressed or resumed):
                    peer.send(frame)
        for kind, header in room.missed.pop(slot.user_id, ()):
            if int(header["v"]) > version:  # the mirror had it when it came: the slot's part only
                self._apply_event(room, kind, header, mirror=False)

    def _attach(self, slot: ClusterSlot, peer: Peer, epoch: int) -> None:
        slot.peer = peer
        slot.epoch = epoch
        slot.incomplete = False
        slot.stale = None
        if slot.fallback is not None:
            slot.fallback.cancel()
            slot.fallback = None

    def _state(self, slot: ClusterSlot, members: list[list[Any]], *, resumed: bool, recovered: bool = True) -> bytes:
        participants = [{"user_id": m[0], "username": m[1]} for m in members]
        return self._state_frame(slot, participants, resumed=resumed, recovered=recovered)

    async def leave(self, slot: Slot, peer: Peer, reason: str = "left") -> None:
        if slot.peer is not peer or not isinstance(slot, ClusterSlot):
            return
        room = slot.room
        self._remove_local(slot, reason, notify=True)
        if isinstance(room, ClusterRoom):
            self._discard_if_empty(room)
        # Fire and forget: if it fails, the room is reconciled when Redis is back.
        self.link.send_script(
            "LEAVE", room.room_id, slot.user_id, self.node, slot.epoch, reason,
            on_result=self._dirty_on_failure(room.room_id, (slot.user_id, slot.username, reason)),
        )

    async def drop(self, slot: Slot, peer: Peer) -> None:
        if slot.peer is not peer or not isinstance(slot, ClusterSlot):
            return
        if peer.lost:  # frames sent to it may never have been read: the resume must say so
            slot.incomplete = True
        if self.limits.reconnect_grace <= 0:
            await self.leave(slot, peer, "timeout")
            return
        slot.peer = None
        self._hold(slot)

    def _hold(self, slot: ClusterSlot) -> None:
        """Held in Redis for the grace; the reaper's event ends it. A local timer
        ends it instead if Redis is still unreachable when the grace is over."""
        grace = self.limits.reconnect_grace
        if not self.link.send_script(
            "HOLD", slot.room.room_id, slot.user_id, self.node, slot.epoch, int(grace * 1000),
            int(slot.incomplete), on_result=self._dirty_on_failure(slot.room.room_id),
        ):
            slot.incomplete = True
        slot.expiry = None
        loop = asyncio.get_running_loop()
        slot.fallback = loop.call_later(grace + 4 * TICK, self._fallback_expire, slot)

    def _dirty_on_failure(self, room_id: str, gone: tuple[str, str, str] | None = None) -> Callable[[Any], None]:
        """A LEAVE or HOLD that failed, or found no record (Redis restarted empty
        meanwhile): the room is re-registered, at once if Redis is up."""

        def check(result: Any) -> None:
            if isinstance(result, BaseException) or result == 0:
                self._mark_dirty(room_id, gone)
                if self.link.up:
                    self._on_state(True)

        return check

    def _mark_dirty(self, room_id: str, gone: tuple[str, str, str] | None) -> None:
        self._dirty.add(room_id)
        if gone is not None:
            user, username, reason = gone
            self._gone.setdefault(room_id, {})[user] = (username, reason)

    def _fallback_expire(self, slot: ClusterSlot) -> None:
        slot.fallback = None
        if slot.peer is not None or slot.room.slots.get(slot.user_id) is not slot:
            return
        if self.link.up:  # the reaper is on it; look again shortly
            slot.fallback = asyncio.get_running_loop().call_later(2 * TICK, self._fallback_expire, slot)
            return
        self._mark_dirty(slot.room.room_id, (slot.user_id, slot.username, "timeout"))
        self._remove_local(slot, "timeout", notify=True)
        if isinstance(slot.room, ClusterRoom):
            self._discard_if_empty(slot.room)

    def _remove_local(self, slot: Slot, reason: str, *, notify: bool, version: int | None = None) -> None:
        """Drop a local slot; ``notify`` tells the other local members (only those
        whose view predates ``version``, the news that removed it, when given)."""
        room = slot.room
        if room.slots.get(slot.user_id) is not slot:
            return
        del room.slots[slot.user_id]
        if isinstance(slot, ClusterSlot) and slot.fallback is not None:
            slot.fallback.cancel()
            slot.fallback = None
        slot.peer = None
        self.slot_count -= 1
        user = slot.user_id
        self._user_rooms[user] -= 1
        if self._user_rooms[user] <= 0:
            del self._user_rooms[user]
        if notify:
            self.metrics.leaves[reason] += 1
            left = encode_server_message("user_left", {**slot.describe(), "reason": reason}, room.room_id)
            for other in room.slots.values():
                if version is None or not isinstance(other, ClusterSlot) or other.since < version:
                    self._deliver(other, left)

    def _discard_if_empty(self, room: ClusterRoom) -> None:
        if not room.slots and room.joining == 0 and self.rooms.get(room.room_id) is room:
            del self.rooms[room.room_id]

    # -------------------------------------------------------------- delivery

    def route(
        self, slot: Slot, kind: str, payload: dict[str, Any], target: str | None
    ) -> SignalError | None:
        """Deliver locally at once; queue one publish per other node with recipients."""
        room: ClusterRoom = slot.room  # type: ignore[assignment]  # every room here is one (hot path: no check)
        payload["sender_id"] = slot.user_id
        if target is None:
            frame = encode_envelope(kind, payload, slot.user_id, room.room_id)
            for other in room.slots.values():
                if other is not slot:
                    self._deliver(other, frame)
            if room.remote:
                if not self.link.up:
                    self.metrics.relayed[kind] += 1
                    return self._unavailable(slot)
                by_node: dict[str, list[str]] = {}
                for user, remote in room.remote.items():
                    if user in room.inflight:  # resuming here: after its kept frames, before live ones
                        self._buffer(room, user, frame, addressed=True)
                    else:
                        remote.sent = True
                        by_node.setdefault(remote.node, []).append(user)
                queued = True
                for node, users in by_node.items():
                    # Addressed to the members this node believes are there: one who
                    # moved meanwhile gets it forwarded by the registry, and one who
                    # is arriving there gets it only through this copy (never twice).
                    header = b"m" + orjson.dumps({"r": room.room_id, "s": slot.user_id, "t": users}) + b"\n"
                    queued = self._publish(room.room_id, node, users, header + frame, frame) and queued
                if not queued:
                    self.metrics.relayed[kind] += 1
                    return self._unavailable(slot)
        else:
            recipient = room.slots.get(target)
            if recipient is not None:
                if recipient is slot:
                    return SignalError("INVALID_MESSAGE", "a message cannot target its own sender")
                self._deliver(recipient, encode_envelope(kind, payload, slot.user_id, room.room_id))
            else:
                found = room.remote.get(target)
                if found is None:
                    return SignalError("TARGET_NOT_FOUND", f"user {target[:64]!r} is not in this room")
                frame = encode_envelope(kind, payload, slot.user_id, room.room_id)
                if target in room.inflight:  # resuming here: not through its old node and back
                    self._buffer(room, target, frame, addressed=True)
                    self.metrics.relayed[kind] += 1
                    return None
                if not self.link.up:
                    return self._unavailable(slot)
                found.sent = True
                header = b"m" + orjson.dumps({"r": room.room_id, "s": slot.user_id, "t": [target]}) + b"\n"
                if not self._publish(room.room_id, found.node, [target], header + frame, frame):
                    return self._unavailable(slot)
        self.metrics.relayed[kind] += 1
        return None

    def _publish(self, room_id: str, node: str, users: list[str], data: bytes, frame: bytes) -> bool:
        """One publish to ``node``; if nobody listens there (a dead or drained node),
        the frames go to the registry's keep instead, so nothing is lost silently.
        False when Redis is so slow that the queue is full (the sender is told)."""

        def check(receivers: Any) -> None:
            if receivers == 0:
                limits = self.limits
                room = self.rooms.get(room_id)
                for user in users:
                    if isinstance(room, ClusterRoom) and user in room.inflight and user not in room.slots:
                        # The user's resume is in flight here, behind this publish in the
                        # queue: a KEEP now would forward the frame after the resume had
                        # delivered later frames. It waits here, before those.
                        self._buffer(room, user, frame, addressed=True, forwarded=True)
                        continue
                    self.link.send_script_next(
                        "KEEP", room_id, user, node, frame, limits.kept_messages, limits.kept_bytes
                    )

        self.published += 1
        return self.link.publish(node, data, check)

    def _unavailable(self, slot: Slot) -> SignalError | None:
        """UNAVAILABLE (non-fatal), at most once a second per connection."""
        assert isinstance(slot, ClusterSlot)  # off the hot path: only during an outage
        now = time.monotonic()
        if now - slot.unavailable_at < UNAVAILABLE_EVERY:
            return None
        slot.unavailable_at = now
        return unavailable("the cluster relay is unreachable; message not delivered", fatal=False)

    def _deliver(self, slot: Slot, frame: bytes) -> None:
        """To the live peer (counted, see Hub), or kept in Redis for a held slot."""
        peer = slot.peer
        if peer is not None:
            peer.send(frame)
            return
        self._keep(slot, frame)

    def _keep(self, slot: Slot, frame: bytes) -> None:
        """A frame for a held slot of this node: kept in Redis (bounded there), so a
        resume through any node replays it. If it cannot be, the resume says so."""
        room: ClusterRoom = slot.room  # type: ignore[assignment]
        if slot.user_id in room.inflight:  # its resume is in flight here: Redis would drop it
            self._buffer(room, slot.user_id, frame, addressed=True)
            return
        if slot.incomplete:
            return
        limits = self.limits
        if not self.link.up or not self.link.send_script(
            "KEEP", room.room_id, slot.user_id, self.node, frame, limits.kept_messages, limits.kept_bytes,
            on_result=self._keep_failed(slot),
        ):
            self._lost(slot)

    def _keep_failed(self, slot: Slot) -> Callable[[Any], None]:
        def check(result: Any) -> None:
            if isinstance(result, BaseException):
                self._lost(slot)

        return check

    def _lost(self, slot: Slot) -> None:
        """A frame for a held slot could not be kept: the record's lost flag must say
        so, so a resume through any node reports recovered false (written when Redis
        is back, by the room's re-registration)."""
        slot.incomplete = True
        if slot.room.slots.get(slot.user_id) is slot:
            self._mark_dirty(slot.room.room_id, None)
            if self.link.up:
                self._on_state(True)

    def _buffer(self, room: ClusterRoom, user: str, frame: bytes, *, addressed: bool, forwarded: bool = False) -> None:
        buffered = room.inflight[user]
        if len(buffered.frames) >= self.limits.kept_messages:
            buffered.lost = True
            return
        buffered.frames.append((frame, addressed, forwarded))

    # ---------------------------------------------------------------- events

    def _on_message(self, data: bytes) -> None:
        kind = data[:1]
        end = data.index(b"\n")
        header: dict[str, Any] = orjson.loads(data[1:end])
        if kind == b"m":
            self.received += 1
            self._relay_in(header, data[end + 1:])
            return
        if kind in b"qd" or (kind == b"t" and header.get("h")):
            self._on_handoff(kind, header)
            if kind != b"t":
                return
        room = self.rooms.get(header["r"])
        if not isinstance(room, ClusterRoom):
            return
        if room.pending is not None:
            room.pending.append((kind, header))
            return
        self._apply(room, kind, header)

    def _relay_in(self, header: dict[str, Any], frame: bytes) -> None:
        room = self.rooms.get(header["r"])
        targets: list[str] | None = header["t"]
        if targets is None:  # a server message (SEND) to the whole room
            if isinstance(room, ClusterRoom):
                sender = header["s"]
                for slot in room.slots.values():
                    if slot.user_id != sender:
                        self._deliver(slot, frame)
                for user in room.inflight:  # a resume in flight here: delivered if it is one
                    if user != sender and user not in room.slots:
                        self._buffer(room, user, frame, addressed=False)
            return
        for user in targets:
            local = room.slots.get(user) if room is not None else None
            if local is not None:
                if local.stale is not None and header.get("o") == local.stale:  # type: ignore[attr-defined]
                    # A late forward through the node it was resumed from without a hand-off:
                    # sent before frames the slot has had. Dropped; if the slot is held
                    # again meanwhile, its next resume must say so.
                    if local.peer is None:
                        self._lost(local)
                    continue
                self._deliver(local, frame)
            elif isinstance(room, ClusterRoom) and user in room.inflight:  # joining here right now
                self._buffer(room, user, frame, addressed=True, forwarded=bool(header.get("f")))
            else:  # moved on meanwhile: the registry forwards it, or keeps it
                self._forward(header["r"], user, frame)

    def _forward(self, room_id: str, user: str, frame: bytes) -> None:
        """KEEP a frame for a user who is no longer here: kept if held, else forwarded to
        its node. A failure while the user's hand-off is open spoils that hand-off."""
        handoff = self._handoffs.get((room_id, user))

        def check(result: Any) -> None:
            if isinstance(result, BaseException) and handoff is not None:
                handoff.lost = True

        limits = self.limits
        if not self.link.send_script(
            "KEEP", room_id, user, self.node, frame, limits.kept_messages, limits.kept_bytes, on_result=check
        ) and handoff is not None:
            handoff.lost = True

    def _on_handoff(self, kind: bytes, header: dict[str, Any]) -> None:
        """Hand-off traffic of a resume (see :class:`Handoff`).

        ``t`` with ``h``: a held slot was resumed through ``n``; the old node ``o``
        answers with its barrier, any other node sends a marker through ``o``.
        ``q``: a marker reaching the old node, passed on as a barrier behind the frames
        forwarded so far. ``d``: a barrier reaching the resuming node.
        """
        room_id, user, epoch = header["r"], header["u"], int(header["c"])
        if kind == b"d":
            room = self.rooms.get(room_id)
            buffered = room.inflight.get(user) if isinstance(room, ClusterRoom) else None
            if buffered is not None:
                buffered.barriers.append((epoch, header["x"], bool(header["l"])))
                self._count_barriers(buffered)
            return
        if kind == b"q":
            handoff = self._handoffs.get((room_id, user))
            lost = handoff is None or handoff.epoch != epoch or handoff.lost
            self._barrier(room_id, user, epoch, header["n"], header["x"], lost)
            return
        old, new = header["o"], header["n"]
        if new == self.node:
            return
        if old != self.node:
            self._send_marker(room_id, user, epoch, old, new)
            return
        room = self.rooms.get(room_id)
        slot = room.slots.get(user) if room is not None else None
        # Frames this node dropped for the held slot (Redis was unreachable, or the
        # kept ones overflowed here) make the resume incomplete.
        lost = not isinstance(slot, ClusterSlot) or slot.peer is not None or slot.incomplete
        key = (room_id, user)
        handoff = self._handoffs[key] = Handoff(epoch, {self.node}, lost=lost)
        asyncio.get_running_loop().call_later(2 * HANDOFF_WAIT, self._forget_handoff, key, handoff)
        self._barrier(room_id, user, epoch, new, self.node, lost)

    def _barrier(self, room_id: str, user: str, epoch: int, new: str, origin: str, lost: bool) -> None:
        header = {"r": room_id, "u": user, "c": epoch, "x": origin, "l": int(lost)}
        self.link.publish(new, b"d" + orjson.dumps(header) + b"\n")

    def _forget_handoff(self, key: tuple[str, str], handoff: Handoff) -> None:
        if self._handoffs.get(key) is handoff:
            del self._handoffs[key]

    def _apply(self, room: ClusterRoom, kind: bytes, header: dict[str, Any]) -> None:
        version = int(header["v"])
        if room.joining and kind != b"j":
            if kind == b"x":  # a close that a join in flight may have preceded: applied to it once attached
                for user in room.inflight:
                    room.missed.setdefault(user, []).append((kind, header))
            else:
                room.missed.setdefault(header["u"], []).append((kind, header))
        if version <= room.version:
            # A membership list read after it overtook it: the mirror has it already,
            # but local slots admitted before it (a kick, a close) must still hear it.
            self._apply_event(room, kind, header, mirror=False)
            return
        room.version = version
        self._apply_event(room, kind, header)

    def _apply_event(self, room: ClusterRoom, kind: bytes, header: dict[str, Any], *, mirror: bool = True) -> None:
        """Apply one event to the local slots older than it, and (``mirror``) to the mirror."""
        version = int(header["v"])
        if kind == b"x":
            self._closed(room, version, mirror=mirror)
            return
        user: str = header["u"]
        local = room.slots.get(user)
        if not isinstance(local, ClusterSlot) or local.since >= version:
            local = None  # none, or admitted after this news: about an earlier slot of the user
        if kind == b"j":
            if not mirror:
                return
            if header["n"] == self.node or user in room.slots:
                return
            known = room.remote.get(user)
            room.remote[user] = Remote(header["name"], header["n"], int(header["s"]))
            if known is None:
                self._notify(room, "user_joined", {"user_id": user, "username": header["name"]})
        elif kind == b"l":
            if local is not None:
                peer = local.peer
                self._remove_local(local, header["why"], notify=True, version=version)
                self._release(local, header["why"])
                if peer is not None and header["why"] == "kicked":  # the room service removed it
                    peer.close(CloseCode.KICKED, removed_error("KICKED"))
                elif peer is not None:  # the registry let it go (it should have been held): start over
                    peer.close(CloseCode.GOING_AWAY)
            elif mirror and room.remote.pop(user, None) is not None:
                self._notify(
                    room, "user_left", {"user_id": user, "username": header["name"], "reason": header["why"]}
                )
            self._discard_if_empty(room)
        elif kind == b"t":
            node: str = header["n"]
            if local is not None and node != self.node and local.epoch < int(header["c"]):
                self._moved_away(room, local, node)
            elif mirror and user in room.remote and room.remote[user].node != node:
                room.remote[user].node = node
                self.link.barrier()  # what went to its old node is forwarded before what follows

    def _moved_away(self, room: ClusterRoom, slot: ClusterSlot, node: str) -> None:
        """The user took the slot over (or resumed it) through another node."""
        old = slot.peer
        self._remove_local(slot, "moved", notify=False)
        room.remote[slot.user_id] = Remote(slot.username, node, slot.seq)
        if old is not None:
            old.close(
                CloseCode.SESSION_REPLACED,
                SignalError("SESSION_REPLACED", "this user joined the room from another connection"),
            )
        self._discard_if_empty(room)

    def _notify(self, room: ClusterRoom, kind: str, payload: dict[str, Any]) -> None:
        frame = encode_server_message(kind, payload, room.room_id)
        for slot in room.slots.values():
            self._deliver(slot, frame)

    def _sync(self, room: ClusterRoom, members: list[list[Any]], version: int, *, prune: bool = True) -> None:
        """Bring the mirror up to a membership list read at ``version``.

        Local members are told of the differences (so an event this list
        already covers, arriving later, is ignored without anyone missing a
        join or a leave); events held back while the room was new are applied.
        """
        pending = room.pending
        if pending is None and version <= room.version:
            return
        seen: set[str] = set()
        for user, username, node, seq, epoch in members:
            seen.add(user)
            if node == self.node:
                continue  # this node's slots are its own truth (a join in flight adds it)
            local = room.slots.get(user)
            if isinstance(local, ClusterSlot):
                if local.epoch < int(epoch):
                    self._moved_away(room, local, node)
                continue
            known = room.remote.get(user)
            room.remote[user] = Remote(username, node, int(seq))
            if known is None:
                self._notify(room, "user_joined", {"user_id": user, "username": username})
            elif known.node != node:
                self.link.barrier()
        if prune:
            for user in [u for u in room.remote if u not in seen]:
                gone = room.remote.pop(user)
                self._notify(room, "user_left", {"user_id": user, "username": gone.username, "reason": "left"})
        room.version = max(room.version, version)
        room.pending = None
        for kind, header in pending or ():
            self._apply(room, kind, header)

    def _apply_pending(self, room: ClusterRoom) -> None:
        """A read of the membership failed: the events held back for it apply now."""
        pending, room.pending = room.pending, None
        for kind, header in pending or ():
            self._apply(room, kind, header)

    # ---------------------------------------------------------- link events

    def _on_state(self, up: bool) -> None:
        """Back up: reconcile the rooms where a change of ours did not reach Redis."""
        if up and self._dirty:
            self._start_restore()

    def _on_registered(self) -> None:
        """Redis does not know this node (restarted empty, or it found us dead): re-register."""
        # Whatever Redis kept for this node's held slots may be gone with it: their
        # resumes must say recovered false.
        for room in self.rooms.values():
            for slot in room.slots.values():
                if slot.peer is None:
                    slot.incomplete = True
        self._dirty |= set(self.rooms)
        if self.link.up:  # else once the subscriber is back: events of the restore must reach us
            self._start_restore()

    def _on_subscribed(self) -> None:
        """Subscribed again: events published to this node's channel while it was not
        (a killed connection, a network blip) are lost, so read the rooms again (the
        first subscription only learns the registry's generation)."""
        if self._stopping:
            return
        if self._resync is None or self._resync.done():
            self._resync = asyncio.get_running_loop().create_task(self._resync_rooms())

    async def _read_generation(self) -> bytes | None:
        try:
            reply = await self.link.call("MEMBERS", "", _new_generation())
        except (LinkDown, RedisError, OSError):
            return None
        return bytes(reply[2])

    async def _resync_rooms(self) -> None:
        """Bring each room's mirror up to the registry, with pruning: a leave or a join
        this node missed is told to its members once (``_sync`` tells differences only).

        Only on the registry as before (``sig:gen`` unchanged): a Redis that restarted
        empty does not list the members of nodes that have not re-registered yet; the
        re-registration (``_on_registered``) owns that case.
        """
        generation = await self._read_generation()
        if generation is None or generation != self._generation:
            self._generation = generation
            return  # the first subscription, or Redis restarted
        for room in list(self.rooms.values()):
            if not isinstance(room, ClusterRoom) or room.pending is not None:
                continue  # its membership is being read already
            room.pending = []  # events from now on wait for the read, then apply over it
            try:
                reply = await self.link.call("MEMBERS", room.room_id, _new_generation())
            except (LinkDown, RedisError, OSError):
                self._apply_pending(room)
                return  # the next subscription tries again
            if reply[2] != generation:  # Redis restarted meanwhile
                self._apply_pending(room)
                return
            if self.rooms.get(room.room_id) is room:
                self._sync(room, _members(reply[1]), int(reply[0]))
                self._discard_if_empty(room)
        logger.info("cluster: resubscribed; %d rooms read again (node %s)", len(self.rooms), self.node)

    def _start_restore(self) -> None:
        if self._stopping:
            return
        if self._restore is None or self._restore.done():
            self._restore = asyncio.get_running_loop().create_task(self._reregister())

    def _ready_dirty(self) -> set[str]:
        ready = set()
        for name in self._dirty:
            room = self.rooms.get(name)
            if not isinstance(room, ClusterRoom) or room.joining == 0:
                ready.add(name)
        return ready

    async def _reregister(self) -> None:
        """Re-register the dirty rooms, except those with a join in flight (the join
        would look like a record this node has no slot for): they follow it."""
        now = asyncio.get_running_loop().time()
        names = self._ready_dirty()
        self._dirty -= names
        rooms = [self.rooms.get(name) or ClusterRoom(name) for name in sorted(names)]
        restored = 0
        # A room this leaves empty is finished (webhook) only if no other node
        # re-registers members in it within two node TTLs.
        settle_ms = int(2000 * self.link.settings.node_ttl)
        for room in rooms:
            assert isinstance(room, ClusterRoom)
            mine: list[list[Any]] = []
            restoring: list[ClusterSlot] = []
            for slot in list(room.slots.values()):
                assert isinstance(slot, ClusterSlot)
                held_ms = 0
                if slot.peer is None:
                    remaining = (slot.fallback.when() - 4 * TICK - now) if slot.fallback else 0
                    if remaining <= 0:  # its grace ran out while Redis was away
                        self._gone.setdefault(room.room_id, {})[slot.user_id] = (slot.username, "timeout")
                        self._remove_local(slot, "timeout", notify=True)
                        continue
                    held_ms = max(1, int(remaining * 1000))
                mine.append([slot.user_id, slot.username, slot.epoch, held_ms, int(slot.incomplete)])
                restoring.append(slot)
            gone = self._gone.pop(room.room_id, {})
            left = [[user, username, reason] for user, (username, reason) in gone.items()]
            if self.rooms.get(room.room_id) is room:
                # Redis may have restarted empty (its versions start over), and other
                # nodes' events can overtake the reply: they wait for it in pending.
                room.version = 0
                if room.pending is None:
                    room.pending = []
            try:
                reply = await self.link.call(
                    "RESTORE", room.room_id, self.node, orjson.dumps(mine), orjson.dumps(left), settle_ms
                )
            except (LinkDown, RedisError, OSError):
                self._apply_pending(room)
                self._gone.setdefault(room.room_id, {}).update(gone)
                self._dirty |= {r.room_id for r in rooms}
                return  # the next registration (or the next time Redis is up) starts over
            if self.rooms.get(room.room_id) is room:
                version = int(reply[0])
                for slot in restoring:  # they stand on this answer now (Redis may count from 0 again)
                    if room.slots.get(slot.user_id) is slot:
                        slot.since = version
                members = _members(reply[1])
                self._sync(room, members, version, prune=False)
                present = {member[0] for member in members}
                tombstones = reply[2]
                for user_raw, info in zip(tombstones[::2], tombstones[1::2], strict=True):
                    user = user_raw.decode()
                    if user not in present and room.remote.pop(user, None) is not None:
                        username, reason = orjson.loads(info)
                        self._notify(room, "user_left", {"user_id": user, "username": username, "reason": reason})
                self._discard_if_empty(room)
            restored += len(mine)
        logger.info("cluster: re-registered %d slots in %d rooms (node %s)", restored, len(rooms), self.node)
        if self._ready_dirty() and self.link.up:  # marked while this ran: once more, after this task ends
            asyncio.get_running_loop().call_soon(self._on_state, True)

    # ------------------------------------------------- room service (admin API)
    # The registry in Redis is the truth for the whole cluster; the changes go
    # through the scripts, and reach every node as events on its channel.

    async def _registry(self, name: str, *args: Any) -> Any:
        try:
            return await self.link.call(name, *args)
        except (LinkDown, RedisError, OSError):
            raise unavailable("the cluster registry is unreachable; try again later", fatal=True) from None

    async def list_rooms(self) -> list[dict[str, Any]]:
        """Every room of the cluster, read from Redis (a SCAN: for operators, not a hot path)."""
        try:
            redis = self.link.redis
            names: list[str] = []
            async for key in redis.scan_iter(match="sig:{*}:m", count=1000):
                match = _ROOM_KEY.match(key)
                if match:
                    names.append(match.group(1).decode())
            async with redis.pipeline(transaction=False) as pipe:
                for name in names:
                    pipe.hlen(f"sig:{{{name}}}:m")
                    pipe.get(f"sig:{{{name}}}:c")
                replies = await pipe.execute()
        except (RedisError, OSError):
            raise unavailable("the cluster registry is unreachable; try again later", fatal=True) from None
        rooms = []
        for name, count, created in zip(names, replies[::2], replies[1::2], strict=True):
            if count:
                rooms.append({"room_id": name, "participants": int(count), "created_at": _seconds(created)})
        return rooms

    async def describe_room(self, room_id: str) -> list[dict[str, Any]] | None:
        try:
            records = await self.link.redis.hgetall(f"sig:{{{room_id}}}:m")
        except (RedisError, OSError):
            raise unavailable("the cluster registry is unreachable; try again later", fatal=True) from None
        if not records:
            return None
        participants = []
        for user, raw in records.items():
            record = orjson.loads(raw)
            participants.append((int(record.get("s", 0)), {
                "user_id": _text(user),
                "username": record.get("u"),
                "joined_at": _seconds(record.get("j")),
                "state": "held" if record.get("h", 0) > 0 else "live",
                "node": record.get("n"),
            }))
        participants.sort(key=lambda pair: pair[0])  # join order
        return [participant for _, participant in participants]

    async def kick(self, room_id: str, user_id: str, ban: float = 0) -> bool:
        """Through the registry: the node holding the slot closes it when the event reaches it."""
        grace = int(self.limits.reconnect_grace * 1000)
        return int(await self._registry("KICK", room_id, user_id, int(ban * 1000), grace)) == 1

    async def close_room(self, room_id: str, ban: float = 0) -> bool:
        grace = int(self.limits.reconnect_grace * 1000)
        return int(await self._registry("CLOSE", room_id, int(ban * 1000), grace)) > 0

    async def server_message(self, room_id: str, frame: bytes, target: str | None) -> Sent | None:
        """Through the registry: to the nodes with members, or kept for a held target
        (even one whose node died: then not kept, and the answer says so)."""
        limits = self.limits
        result = int(await self._registry(
            "SEND", room_id, target or "", frame, limits.kept_messages, limits.kept_bytes
        ))
        return _SENT.get(result)

    def _closed(self, room: ClusterRoom, version: int, *, mirror: bool) -> None:
        """The room was closed through the room service (at ``version``): close and drop
        every local slot admitted before that; a later one is a member of a new room."""
        error = removed_error("ROOM_CLOSED")
        for slot in list(room.slots.values()):
            if not isinstance(slot, ClusterSlot) or slot.since >= version:
                continue
            if slot.peer is not None:
                slot.peer.close(CloseCode.ROOM_CLOSED, error)
            self.metrics.leaves["room_closed"] += 1
            self._remove_local(slot, "room_closed", notify=False)
            self._release(slot, "room_closed")
        if mirror:
            room.remote.clear()
        self._discard_if_empty(room)

    def _release(self, slot: ClusterSlot, reason: str) -> None:
        """A slot dropped on news from the registry: its record is gone already, unless the
        news was applied to the wrong slot; then this removes it, so no record outlives its
        slot. Epochs never repeat, so a later record of the user is never touched."""
        self.link.send_script("LEAVE", slot.room.room_id, slot.user_id, self.node, slot.epoch, reason)


_SENT: dict[int, Sent] = {1: "sent", 2: "kept", 3: "lost"}  # the SEND script's answers
_ROOM_KEY = re.compile(rb"sig:\{([A-Za-z0-9._~-]{1,64})\}:m\Z")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _new_generation() -> str:
    """A value for ``sig:gen`` if the registry has none (MEMBERS): new at every read, so a
    Redis that restarted empty gets another one even when the node that set the old one
    asks first again (its boot id would come back the same)."""
    return secrets.token_hex(8)


def _seconds(ms: Any) -> float | None:
    """Milliseconds from a script (bytes or a number) as Unix seconds; None when unknown."""
    if ms is None:
        return None
    return round(int(ms) / 1000, 3)


def _members(raw: bytes) -> list[list[Any]]:
    """The scripts' member list, in join order (cjson writes an empty list as ``{}``)."""
    value = orjson.loads(raw)
    members = value if isinstance(value, list) else []
    members.sort(key=lambda member: member[3])
    return members


class _ClusterCollector(Collector):
    """signal_redis_up, signal_cluster_nodes and the cross-node message counters."""

    def __init__(self, hub: ClusterHub) -> None:
        self._hub = hub

    def collect(self) -> Iterator[Metric]:
        hub = self._hub
        yield GaugeMetricFamily("signal_redis_up", "1 while Redis answers through pub/sub", value=int(hub.link.up))
        yield GaugeMetricFamily(
            "signal_cluster_nodes", "Live nodes seen in the registry", value=hub.link.nodes_seen
        )
        yield CounterMetricFamily(
            "signal_cluster_messages_published", "Relayed messages published to other nodes", value=hub.published
        )
        yield CounterMetricFamily(
            "signal_cluster_messages_received", "Relayed messages received from other nodes", value=hub.received
        )

