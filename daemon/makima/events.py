"""The event bus: the daemon publishes, socket subscribers receive.

Publishing never waits. Each subscriber has a bounded buffer; one that cannot
keep up is dropped (its stream closed), never allowed to stall the daemon.
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
    TASK_SPAWNED = "task.spawned"
    TASK_FINISHED = "task.finished"


Event = dict[str, Any]


class Subscription:
    def __init__(self, bus: EventBus, kinds: frozenset[str] | None, buffer: int) -> None:
        self._bus = bus
        self.kinds = kinds
        self._send: MemoryObjectSendStream[Event]
        self._receive: MemoryObjectReceiveStream[Event]
        self._send, self._receive = anyio.create_memory_object_stream[Event](buffer)
        self.dropped = False

    def wants(self, kind: str) -> bool:
        return self.kinds is None or kind in self.kinds

    def offer(self, event: Event) -> bool:
        """Queue without waiting; False (and closed) when the buffer is full."""
        try:
            self._send.send_nowait(event)
        except anyio.WouldBlock:
            self.dropped = True
            self._send.close()
            return False
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return False
        return True

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

    def subscribe(self, kinds: Iterable[str] | None = None) -> Subscription:
        sub = Subscription(self, None if kinds is None else frozenset(kinds), self.buffer)
        self._subscriptions.add(sub)
        return sub

    def unsubscribe(self, sub: Subscription) -> None:
        self._subscriptions.discard(sub)

    def publish(self, kind: EventKind, **params: Any) -> None:
        event: Event = {"kind": kind.value, **params}
        for sub in list(self._subscriptions):
            if sub.wants(kind.value) and not sub.offer(event):
                self._subscriptions.discard(sub)
                if sub.dropped:
                    log.warning("events.subscriber_dropped", reason="buffer_full", kind=kind.value)

    @property
    def subscriber_count(self) -> int:
        return len(self._subscriptions)
