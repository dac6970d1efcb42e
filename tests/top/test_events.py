"""The event bus's lossy kind: supervisor.updated never costs a subscriber its
subscription (no I/O)."""

from __future__ import annotations

from makima.events import EventBus, EventKind


def test_supervisor_updated_is_lossy_for_a_slow_subscriber() -> None:
    """One supervisor.updated per live supervisor at every heartbeat must never cost a
    slow subscriber its subscription; past half its buffer they are skipped."""
    bus = EventBus(buffer=10)
    sub = bus.subscribe()
    for n in range(100):
        bus.publish(EventKind.SUPERVISOR_UPDATED, supervisor_id=str(n))
    assert bus.subscriber_count == 1 and not sub.dropped
    assert sub.skipped == 95
    for n in range(5):  # the other half is there for what must not be missed
        bus.publish(EventKind.QUESTION_ASKED, supervisor_id=str(n))
    assert bus.subscriber_count == 1
    bus.publish(EventKind.QUESTION_ASKED, supervisor_id="x")  # one too many: dropped
    assert bus.subscriber_count == 0 and sub.dropped
    sub.close()
