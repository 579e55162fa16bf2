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
"""

from __future__ import annotations

import asyncio
import logging
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Protocol

from .auth import Identity
from .errors import CloseCode, SignalError
from .metrics import Metrics
from .protocol import encode_envelope, encode_server_message

__all__ = ["Peer", "Slot", "Room", "Hub", "HubLimits"]

logger = logging.getLogger(__name__)


class Peer(Protocol):
    """One live connection, as the hub sees it.

    ``send`` must not block and must not call back into the hub; a peer that
    cannot keep up closes itself later, and its handler then tells the hub.
    """

    def send(self, frame: bytes) -> None: ...

    def close(self, code: CloseCode, error: SignalError | None = None) -> None: ...


@dataclass(frozen=True)
class HubLimits:
    max_participants: int = 8
    reconnect_grace: float = 20.0
    kept_messages: int = 256
    kept_bytes: int = 1024 * 1024
    max_rooms_per_user: int = 16


class Slot:
    """A participant's place in a room, live (``peer`` set) or held."""

    __slots__ = ("user_id", "username", "room", "peer", "kept", "kept_bytes", "overflowed", "expiry")

    def __init__(self, user_id: str, username: str, room: Room, peer: Peer) -> None:
        self.user_id = user_id
        self.username = username
        self.room = room
        self.peer: Peer | None = peer
        self.kept: deque[bytes] | None = None  # made when held: an idle slot keeps nothing
        self.kept_bytes = 0
        self.overflowed = False
        self.expiry: asyncio.TimerHandle | None = None

    def describe(self) -> dict[str, str]:
        return {"user_id": self.user_id, "username": self.username}


class Room:
    __slots__ = ("room_id", "slots")

    def __init__(self, room_id: str) -> None:
        self.room_id = room_id
        self.slots: dict[str, Slot] = {}


class Hub:
    """Single-node rooms. One instance per app, behind an ``AppKey``."""

    def __init__(self, limits: HubLimits, metrics: Metrics) -> None:
        self.limits = limits
        self.metrics = metrics
        self.rooms: dict[str, Room] = {}
        self._user_rooms: Counter[str] = Counter()

    # ------------------------------------------------------------ membership

    async def join(self, room_id: str, identity: Identity, peer: Peer) -> Slot:
        """Put ``peer`` in the room: a new slot, a resume, or a takeover.

        The joiner gets ``room_state`` first, then (on a resume) every kept
        message in order, then live traffic.

        Raises:
            SignalError: ``ROOM_FULL`` or ``TOO_MANY_ROOMS``.
        """
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
        if room is None:
            room = self.rooms[room_id] = Room(room_id)
        slot = Slot(identity.user_id, identity.username, room, peer)
        room.slots[identity.user_id] = slot
        self._user_rooms[identity.user_id] += 1
        self.metrics.joins += 1
        peer.send(self._room_state(slot, resumed=False))
        joined = encode_server_message("user_joined", slot.describe(), room_id)
        for other in room.slots.values():
            if other is not slot:
                self._deliver(other, joined)
        return slot

    def _reattach(self, slot: Slot, peer: Peer) -> None:
        """Resume a held slot, or take over a live one. Others see nothing."""
        self.metrics.joins += 1
        self.metrics.resumes += 1
        old = slot.peer
        slot.peer = peer
        if old is None:
            if slot.expiry is not None:
                slot.expiry.cancel()
                slot.expiry = None
            recovered = not slot.overflowed
            peer.send(self._room_state(slot, resumed=True, recovered=recovered))
            for frame in slot.kept or ():
                peer.send(frame)
        else:
            # The old connection may have died unnoticed with frames in flight,
            # so nothing can be promised about them: recovered is false.
            old.close(
                CloseCode.SESSION_REPLACED,
                SignalError("SESSION_REPLACED", "this user joined the room from another connection"),
            )
            peer.send(self._room_state(slot, resumed=True, recovered=False))
        slot.kept = None
        slot.kept_bytes = 0
        slot.overflowed = False

    def _room_state(self, slot: Slot, *, resumed: bool, recovered: bool = True) -> bytes:
        payload: dict[str, Any] = {
            "participants": [s.describe() for s in slot.room.slots.values()],
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
        del room.slots[slot.user_id]
        if slot.expiry is not None:
            slot.expiry.cancel()
            slot.expiry = None
        slot.peer = None
        slot.kept = None
        user = slot.user_id
        self._user_rooms[user] -= 1
        if self._user_rooms[user] <= 0:
            del self._user_rooms[user]
        self.metrics.leaves[reason] += 1
        if not room.slots:
            del self.rooms[room.room_id]
            return
        left = encode_server_message("user_left", {**slot.describe(), "reason": reason}, room.room_id)
        for other in room.slots.values():
            self._deliver(other, left)

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
        peer = slot.peer
        if peer is not None:
            peer.send(frame)
            return
        # Held: keep it for the resume, bounded. Past the bound keep nothing
        # at all (the contract forbids a partial replay).
        if slot.overflowed:
            return
        limits = self.limits
        kept = slot.kept
        if kept is None:
            kept = slot.kept = deque()
        if len(kept) >= limits.kept_messages or slot.kept_bytes + len(frame) > limits.kept_bytes:
            slot.kept = None
            slot.kept_bytes = 0
            slot.overflowed = True
            self.metrics.kept_overflows += 1
            return
        kept.append(frame)
        slot.kept_bytes += len(frame)

    # ------------------------------------------------------------- lifecycle

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
