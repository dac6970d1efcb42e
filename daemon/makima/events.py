"""The event bus: the daemon publishes, socket subscribers receive.

Publishing never waits. Each subscriber has a bounded buffer; one that cannot
keep up is dropped (its stream closed), never allowed to stall the daemon.
``supervisor.updated`` (phase, progress, activity, heartbeat: one per live
supervisor at every heartbeat) is lossy instead: a subscriber whose buffer is
half full misses it, and is never dropped on its account; the other half stays
for the events that must not be missed.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Iterable
from typing import Any

import anyio
import structlog
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

log = structlog.get_logger("makima.events")


class EventKind(enum.StrEnum):
    QUESTION_PENDING = "question.pending"
    QUESTION_ASKED = "question.asked"
    QUESTION_REDELIVERED = "question.redelivered"
    QUESTION_ANSWERED = "question.answered"
    SUPERVISOR_STATE_CHANGED = "supervisor.state_changed"
    SUPERVISOR_RESTORED = "supervisor.restored"
    SUPERVISOR_WARNING = "supervisor.warning"
    SUPERVISOR_UPDATED = "supervisor.updated"
    TASK_SPAWNED = "task.spawned"
    TASK_FINISHED = "task.finished"


Event = dict[str, Any]

LOSSY_KINDS = frozenset({EventKind.SUPERVISOR_UPDATED.value})
"""Kinds a lagging subscriber may miss (the next one of the same supervisor
carries the whole picture again): see :meth:`Subscription.offer`."""


class Subscription:
    def __init__(self, bus: EventBus, kinds: frozenset[str] | None, buffer: int) -> None:
        self._bus = bus
        self.kinds = kinds
        self._send: MemoryObjectSendStream[Event]
        self._receive: MemoryObjectReceiveStream[Event]
        self._send, self._receive = anyio.create_memory_object_stream[Event](buffer)
        self.dropped = False
        self.skipped = 0  # lossy events this subscriber missed
        self.internal = False

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def offer(self, event: Event, *, lossy: bool = False) -> bool:
        """Queue without waiting; False (and closed) when the buffer is full. A
        ``lossy`` event is skipped instead once the buffer is half full."""
        if lossy:
            stats = self._send.statistics()
            if stats.current_buffer_used * 2 >= stats.max_buffer_size:
                self.skipped += 1
                return True
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped = True
            self._send.close()
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

    def take_ready(self, limit: int) -> list[Event]:
        """Up to ``limit`` events already queued, without waiting."""
        ready: list[Event] = []
        while len(ready) < limit:
            try:
                ready.append(self._receive.receive_nowait())
            except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                break
        return ready

    async def __aiter__(self) -> AsyncIterator[Event]:
        async with self._receive:
            async for event in self._receive:
                yield event

    def close(self) -> None:
        self._bus.unsubscribe(self)
        self._send.close()
        self._receive.close()


class EventBus:
    def __init__(self, buffer: int = 1000) -> None:
        self.buffer = buffer
        self._subscriptions: set[Subscription] = set()

    def subscribe(
        self, kinds: Iterable[str] | None = None, *, internal: bool = False
    ) -> Subscription:
        """A new subscription; ``internal``: the daemon's own (its events sent to the
        other daemons), not counted among the subscribers."""
        sub = Subscription(self, None if kinds is None else frozenset(kinds), self.buffer)
        sub.internal = internal
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, kind: EventKind, **params: Any) -> None:
        event: Event = {"kind": kind.value, **params}
        lossy = kind.value in LOSSY_KINDS
        for sub in list(self._subscriptions):
            if sub.wants(kind.value) and not sub.offer(event, lossy=lossy):
                self._subscriptions.discard(sub)
                if sub.dropped:
                    log.warning("events.subscriber_dropped", reason="buffer_full", kind=kind.value)

    @property
    def subscriber_count(self) -> int:
        """Subscribers on the socket (the daemon's own subscription not counted)."""
        return sum(1 for sub in self._subscriptions if not sub.internal)
