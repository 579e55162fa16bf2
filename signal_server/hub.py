"""The room registry and the delivery path: who is in which room, and who gets what.

A participant owns a :class:`Slot` in a room. The slot, not the connection,
is the unit of membership: when a connection drops without a clean close the
slot stays (held) for the reconnect grace, keeps every message routed to it,
and a new connection of the same user resumes it. All the state a resume
needs lives here, behind ``join``/``leave``/``drop``/``route``, so that a
Redis-backed hub can keep the same interface and the handlers stay as they
are. ``join``, ``leave`` and ``drop`` are coroutines for that reason (a
shared registry needs I/O); ``route`` is synchronous because it is the hot
path: it encodes a message once and hands the bytes to every recipient's
:class:`Peer` without awaiting any of them.

Everything here runs on one event loop and never awaits between reading and
changing a room, so concurrent joins admit exactly ``max_participants``.
Every change is all-or-nothing: whatever can fail (encoding a message, a
limit) happens before the first mutation, so an exception never leaves a
half-joined slot behind.

``recovered: true`` is a promise that nothing meant for the slot was lost.
Any frame dropped for a slot, held (over a bound) or live (its connection
closing, aborted or too slow), marks the slot ``incomplete``, and the next
resume says ``recovered: false``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, TypeAlias

from .auth import Identity
from .errors import CloseCode, SignalError
from .metrics import Metrics
from .protocol import encode_envelope, encode_server_message

if TYPE_CHECKING:
    from .webhooks import EventSource

__all__ = ["Peer", "Slot", "Room", "Hub", "HubLimits", "removed_error"]

logger = logging.getLogger(__name__)


class Peer(Protocol):
    """One live connection, as the hub sees it.

    ``send`` (a message that would be kept for a held slot: relayed, joins,
    leaves) and ``notify`` (replies to the client itself, room state) must
    not block and must not call back into the hub; a peer that cannot keep
    up closes itself later, and its handler then tells the hub. ``lost`` is
    true once the peer has dropped a frame, or cannot show that the client
    read every relayed one.
    """

    @property
    def lost(self) -> bool: ...

    def send(self, frame: bytes) -> None: ...

    def notify(self, frame: bytes) -> None: ...

    def close(self, code: CloseCode, error: SignalError | None = None) -> None: ...


# What became of a server message: sent to live connections; for a held target,
# kept for its resume, or not (past the kept bounds, or already lost).
Sent: TypeAlias = Literal["sent", "kept", "lost"]

# (event, room id, user id, username, reason): membership news for the webhooks
# (webhooks.WebhookSender.hub_event); called after the change, never on the relay path.
EventSink: TypeAlias = "Callable[[str, str, str | None, str | None, str | None], None]"


# What a participant the room service removed is told: when it happens, and when it
# comes back within the grace (its client's automatic reconnect must learn it too).
_REMOVED = {"KICKED": "removed from the room by the server", "ROOM_CLOSED": "the room was closed by the server"}


def removed_error(code: str) -> SignalError:
    """``KICKED`` or ``ROOM_CLOSED`` (close 4411 / 4412), with the usual detail."""
    return SignalError(code, _REMOVED[code])


@dataclass(frozen=True)
class HubLimits:
    max_participants: int = 8
    reconnect_grace: float = 20.0
    kept_messages: int = 256
    kept_bytes: int = 1024 * 1024
    max_rooms_per_user: int = 16
    max_slots: int = 20000  # live and held slots of the process together
    max_kept_total: int = 256 * 1024 * 1024  # kept bytes of every held slot together


class Slot:
    """A participant's place in a room, live (``peer`` set) or held."""

    __slots__ = (
        "user_id", "username", "room", "peer", "kept", "kept_bytes", "incomplete", "expiry", "joined_at",
    )

    def __init__(self, user_id: str, username: str, room: Room, peer: Peer) -> None:
        self.user_id = user_id
        self.username = username
        self.room = room
        self.peer: Peer | None = peer
        self.kept: deque[bytes] | None = None  # made when held: an idle slot keeps nothing
        self.kept_bytes = 0
        self.incomplete = False  # a frame for this slot was dropped since its last resume
        self.expiry: asyncio.TimerHandle | None = None
        self.joined_at = time.time()  # for the room service API

    def describe(self) -> dict[str, str]:
        return {"user_id": self.user_id, "username": self.username}


class Room:
    __slots__ = ("room_id", "slots", "created_at")

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.slots: dict[str, Slot] = {}
        self.created_at = time.time()  # for the room service API


class Hub:
    """Single-node rooms. One instance per app, behind an ``AppKey``."""

    node: str | None = None  # this node's id in a cluster; None alone

    def __init__(self, limits: HubLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.rooms: dict[str, Room] = {}
        self._user_rooms: Counter[str] = Counter()
        self.slot_count = 0
        self.kept_total = 0  # bytes kept for held slots, all together
        # Bans of the room service API: (room, user or None for the whole room, the error a
        # join gets) -> monotonic end. FORBIDDEN for a ?ban=; KICKED or ROOM_CLOSED for the
        # grace after a user was kicked or its room closed (its reconnect must not undo that).
        self._bans: dict[tuple[str, str | None, str], float] = {}
        self.on_event: EventSink | None = None  # set when webhooks are configured (one node)

    # ------------------------------------------------------------ membership

    async def join(self, room_id: str, identity: Identity, peer: Peer) -> Slot:
        """Put ``peer`` in the room: a new slot, a resume, or a takeover.

        The joiner gets ``room_state`` first, then (on a resume) every kept
        message in order, then live traffic.

        Raises:
            SignalError: ``ROOM_FULL``, ``TOO_MANY_ROOMS``, or ``FORBIDDEN`` (banned).
        """
        if self._bans:
            self._check_ban(room_id, identity.user_id)
        room = self.rooms.get(room_id)
        slot = room.slots.get(identity.user_id) if room is not None else None
        if slot is not None:
            self._reattach(slot, peer)
            return slot
        limits = self.limits
        if room is not None and len(room.slots) >= limits.max_participants:
            raise SignalError(
                "ROOM_FULL",
                f"room {room_id!r} is full ({len(room.slots)} of {limits.max_participants})",
            )
        if self._user_rooms[identity.user_id] >= limits.max_rooms_per_user:
            self.metrics.refused["rooms_per_user"] += 1
            raise SignalError(
                "TOO_MANY_ROOMS", f"a user may be in at most {limits.max_rooms_per_user} rooms"
            )
        if self.slot_count >= limits.max_slots:
            self.metrics.refused["server_slots"] += 1
            raise SignalError("SERVER_BUSY", "the server holds as many participants as it may")
        # Encode everything first: nothing below the mutations can fail.
        new_room = room is None
        if room is None:
            room = Room(room_id)
        slot = Slot(identity.user_id, identity.username, room, peer)
        members = [*room.slots.values(), slot]
        state = self._room_state(slot, members, resumed=False)
        joined = encode_server_message("user_joined", slot.describe(), room_id)
        if new_room:
            self.rooms[room_id] = room
        room.slots[identity.user_id] = slot
        self._user_rooms[identity.user_id] += 1
        self.slot_count += 1
        self.metrics.joins += 1
        peer.notify(state)
        for other in members:
            if other is not slot:
                self._deliver(other, joined)
        if self.on_event is not None:
            if new_room:
                self.on_event("room_started", room_id, None, None, None)
            self.on_event("participant_joined", room_id, slot.user_id, slot.username, None)
        return slot

    def _reattach(self, slot: Slot, peer: Peer) -> None:
        """Resume a held slot, or take over a live one. Others see nothing."""
        old = slot.peer
        members = list(slot.room.slots.values())
        # The old connection of a takeover may have died unnoticed with frames
        # in flight, so nothing can be promised about them: recovered is false.
        recovered = old is None and not slot.incomplete
        state = self._room_state(slot, members, resumed=True, recovered=recovered)
        self.metrics.joins += 1
        self.metrics.resumes += 1
        if self.on_event is not None:
            self.on_event("participant_resumed", slot.room.room_id, slot.user_id, slot.username, None)
        slot.peer = peer
        kept = slot.kept
        self._forget_kept(slot)
        slot.incomplete = False
        if old is None:
            if slot.expiry is not None:
                slot.expiry.cancel()
                slot.expiry = None
            peer.notify(state)
            for frame in kept or ():
                peer.send(frame)
        else:
            old.close(
                CloseCode.SESSION_REPLACED,
                SignalError("SESSION_REPLACED", "this user joined the room from another connection"),
            )
            peer.notify(state)

    def _room_state(self, slot: Slot, members: list[Slot], *, resumed: bool, recovered: bool = True) -> bytes:
        return self._state_frame(slot, [s.describe() for s in members], resumed=resumed, recovered=recovered)

    def _state_frame(
        self, slot: Slot, participants: list[dict[str, str]], *, resumed: bool, recovered: bool = True
    ) -> bytes:
        """The ``room_state`` message (a cluster hub lists participants from Redis)."""
        payload: dict[str, Any] = {
            "participants": participants,
            "self": slot.describe(),
            "max_participants": self.limits.max_participants,
            "reconnect_grace": self.limits.reconnect_grace,
            "resumed": resumed,
        }
        if resumed:
            payload["recovered"] = recovered
        return encode_server_message("room_state", payload, slot.room.room_id)

    async def leave(self, slot: Slot, peer: Peer, reason: str = "left") -> None:
        """The participant left for good (a clean close): tell the others now."""
        if slot.peer is peer:
            self._remove(slot, reason)

    async def drop(self, slot: Slot, peer: Peer) -> None:
        """The connection ended without a clean close: hold the slot for the grace."""
        if slot.peer is not peer:
            return  # taken over meanwhile; the slot belongs to the new connection
        if peer.lost:
            slot.incomplete = True
        if self.limits.reconnect_grace <= 0:
            self._remove(slot, "timeout")
            return
        slot.peer = None
        loop = asyncio.get_running_loop()
        slot.expiry = loop.call_later(self.limits.reconnect_grace, self._expire, slot)

    def _expire(self, slot: Slot) -> None:
        slot.expiry = None
        if slot.peer is None:
            self._remove(slot, "timeout")

    def _remove(self, slot: Slot, reason: str) -> None:
        room = slot.room
        if room.slots.get(slot.user_id) is not slot:
            return
        left = encode_server_message("user_left", {**slot.describe(), "reason": reason}, room.room_id)
        del room.slots[slot.user_id]
        if slot.expiry is not None:
            slot.expiry.cancel()
            slot.expiry = None
        slot.peer = None
        self._forget_kept(slot)
        self.slot_count -= 1
        user = slot.user_id
        self._user_rooms[user] -= 1
        if self._user_rooms[user] <= 0:
            del self._user_rooms[user]
        self.metrics.leaves[reason] += 1
        if self.on_event is not None:
            self.on_event("participant_left", room.room_id, slot.user_id, slot.username, reason)
            if not room.slots:
                self.on_event("room_finished", room.room_id, None, None, None)
        if not room.slots:
            del self.rooms[room.room_id]
            return
        for other in room.slots.values():
            self._deliver(other, left)

    def _forget_kept(self, slot: Slot) -> None:
        self.kept_total -= slot.kept_bytes
        slot.kept = None
        slot.kept_bytes = 0

    # -------------------------------------------------------------- delivery

    def route(
        self, slot: Slot, kind: str, payload: dict[str, Any], target: str | None
    ) -> SignalError | None:
        """Stamp and deliver one relayed message; return a non-fatal error, if any."""
        room = slot.room
        payload["sender_id"] = slot.user_id
        if target is None:
            frame = encode_envelope(kind, payload, slot.user_id, room.room_id)
            for other in room.slots.values():
                if other is not slot:
                    self._deliver(other, frame)
        else:
            recipient = room.slots.get(target)
            if recipient is None:
                return SignalError("TARGET_NOT_FOUND", f"user {target[:64]!r} is not in this room")
            if recipient is slot:
                return SignalError("INVALID_MESSAGE", "a message cannot target its own sender")
            self._deliver(recipient, encode_envelope(kind, payload, slot.user_id, room.room_id))
        self.metrics.relayed[kind] += 1
        return None

    def _deliver(self, slot: Slot, frame: bytes) -> None:
        """A message for the slot (relayed, or a join or leave): to the live peer, or kept.

        What would be kept for a held slot is counted by a live peer (its
        ``send``), so a resume is ``recovered`` only when the client read it.
        """
        peer = slot.peer
        if peer is not None:
            peer.send(frame)
            return
        # Held: keep it for the resume, bounded per slot and per process.
        # Past a bound keep nothing at all (the contract forbids a partial
        # replay): the resume will say recovered: false.
        if slot.incomplete:
            return
        limits = self.limits
        kept = slot.kept
        if kept is None:
            kept = slot.kept = deque()
        size = len(frame)
        if (
            len(kept) >= limits.kept_messages
            or slot.kept_bytes + size > limits.kept_bytes
            or self.kept_total + size > limits.max_kept_total
        ):
            self._forget_kept(slot)
            slot.incomplete = True
            self.metrics.kept_overflows += 1
            return
        kept.append(frame)
        slot.kept_bytes += size
        self.kept_total += size

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        """Connect what the hub needs before the first join (nothing here; Redis in a cluster)."""

    async def stop(self) -> None:
        """Let go of what :meth:`start` took (after every connection was closed)."""

    @property
    def available(self) -> bool:
        """False while the hub cannot admit joins (a cluster hub without Redis)."""
        return True

    def webhook_source(self) -> EventSource | None:
        """Where a cluster's webhook events wait (cluster/events.py); None alone: the hub calls ``on_event``."""
        return None

    def close_all(self, code: CloseCode) -> None:
        """Close every live connection (shutdown). Slots stay held: not a leave."""
        for room in list(self.rooms.values()):
            for slot in list(room.slots.values()):
                if slot.peer is not None:
                    slot.peer.close(code)

    def cancel_timers(self) -> None:
        """Stop every grace timer (app cleanup)."""
        for room in self.rooms.values():
            for slot in room.slots.values():
                if slot.expiry is not None:
                    slot.expiry.cancel()
                    slot.expiry = None

    # ------------------------------------------------- room service (admin API)
    # Called by admin.py for the app's backend; never on the relay path.

    async def list_rooms(self) -> list[dict[str, Any]]:
        """Every room: id, participant count (live and held), creation time."""
        return [
            {"room_id": room.room_id, "participants": len(room.slots), "created_at": round(room.created_at, 3)}
            for room in self.rooms.values()
        ]

    async def describe_room(self, room_id: str) -> list[dict[str, Any]] | None:
        """The room's participants, or None when there is no such room."""
        room = self.rooms.get(room_id)
        if room is None:
            return None
        return [
            {
                "user_id": slot.user_id,
                "username": slot.username,
                "joined_at": round(slot.joined_at, 3),
                "state": "live" if slot.peer is not None else "held",
                "node": self.node,
            }
            for slot in room.slots.values()
        ]

    async def kick(self, room_id: str, user_id: str, ban: float = 0) -> bool:
        """Remove a participant now (no grace): ``KICKED`` and close 4411 to it,
        ``user_left`` reason ``kicked`` to the others; ``ban`` seconds keep it out
        (``FORBIDDEN``), and for the grace its joins are told ``KICKED`` again (a held
        or half-open connection's reconnect). False when the participant is not in the room."""
        room = self.rooms.get(room_id)
        slot = room.slots.get(user_id) if room is not None else None
        if slot is None:
            return False
        if ban > 0:
            self._ban(room_id, user_id, ban)
        self._ban(room_id, user_id, self.limits.reconnect_grace, "KICKED")
        peer = slot.peer
        self._remove(slot, "kicked")  # slot.peer is None now: the handler's leave or drop is a no-op
        if peer is not None:
            peer.close(CloseCode.KICKED, removed_error("KICKED"))
        return True

    async def close_room(self, room_id: str, ban: float = 0) -> bool:
        """End the room: ``ROOM_CLOSED`` and close 4412 to everyone, no slot held; for the
        grace its members' joins are told ``ROOM_CLOSED`` again. ``ban`` seconds keep the room
        from being reopened by anyone. False when there is no such room."""
        room = self.rooms.get(room_id)
        if room is None:
            return False
        if ban > 0:
            self._ban(room_id, None, ban)
        slots = list(room.slots.values())
        for slot in slots:  # closed first, so nobody is sent the others' user_left
            self._ban(room_id, slot.user_id, self.limits.reconnect_grace, "ROOM_CLOSED")
            if slot.peer is not None:
                slot.peer.close(CloseCode.ROOM_CLOSED, removed_error("ROOM_CLOSED"))
        for slot in slots:
            self._remove(slot, "room_closed")
        return True

    async def server_message(self, room_id: str, frame: bytes, target: str | None) -> Sent | None:
        """Deliver a ``server_message`` (encoded by the caller) to the room or one
        participant, kept for held slots like any message. None when nobody is there."""
        room = self.rooms.get(room_id)
        if room is None:
            return None
        if target is None:
            for slot in room.slots.values():
                self._deliver(slot, frame)
            return "sent"
        recipient = room.slots.get(target)
        if recipient is None:
            return None
        if recipient.peer is not None:
            self._deliver(recipient, frame)
            return "sent"
        self._deliver(recipient, frame)
        return "lost" if recipient.incomplete else "kept"

    def _ban(self, room_id: str, user_id: str | None, seconds: float, code: str = "FORBIDDEN") -> None:
        if seconds <= 0:
            return
        now = time.monotonic()
        for key in [key for key, end in self._bans.items() if end <= now]:
            del self._bans[key]  # expired ones go, so the table holds only live bans
        self._bans[(room_id, user_id, code)] = now + seconds

    def _check_ban(self, room_id: str, user_id: str) -> None:
        now = time.monotonic()
        for key in (
            (room_id, None, "FORBIDDEN"), (room_id, user_id, "FORBIDDEN"),
            (room_id, user_id, "KICKED"), (room_id, user_id, "ROOM_CLOSED"),
        ):
            end = self._bans.get(key)
            if end is None or end <= now:
                continue
            if key[2] != "FORBIDDEN":
                raise removed_error(key[2])
            what = "this room is closed" if key[1] is None else "this user was removed from this room"
            raise SignalError("FORBIDDEN", f"{what} for another {int(end - now) + 1} s")
