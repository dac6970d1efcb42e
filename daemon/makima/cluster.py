"""Several daemons, one PostgreSQL (DESIGN §13): the lease, and what the daemons
tell each other.

Each daemon holds a lease in ``daemons``, renewed every ``renew`` seconds for
``ttl`` seconds on the database clock, over a connection of its own (named
``makima-lease <daemon_id>`` in ``pg_stat_activity``) that also LISTENs on the
channel ``makima``. A renewal is one round trip that also polls: which of the
supervisors it runs were taken over (fenced), the cancels and resumes asked
for them on other daemons, and the answers given elsewhere and not delivered
yet. LISTEN/NOTIFY makes those act at once; the poll makes a lost notification
a delay, never a loss.

**The timing argument.** Each step names its clock.

1. The daemon sends a renewal at ``s`` on its own boot-time clock
   (``CLOCK_BOOTTIME``: it keeps counting while the machine is suspended, and
   SIGSTOP does not stop it). PostgreSQL runs the statement at ``r`` on the
   database clock and sets ``lease_expires_at = r + ttl``. ``r`` comes after
   ``s``, so the lease certainly lasts until ``s + ttl``, whenever the reply
   arrives.
2. The daemon counts its lease valid until ``s + ttl - guard`` on its boot-time
   clock (``guard`` = a fifth of the TTL, for the two clocks' rates and the
   delivery of a ping). It sends no acknowledgement, answer or other word to
   an agent past that moment.
3. If no renewal succeeds by then, it kills every agent's process group and
   every task at that moment (the lapse watch wakes on the boot-time clock,
   whatever the renewal is blocked on): before ``r + ttl``.
4. A peer claims a supervisor only when ``lease_expires_at < now()`` on the
   database clock: after ``r + ttl``. The claim bumps ``lease_epoch``, and
   every write of the former owner is checked against it in its own statement,
   so none can commit after the claim.
5. A paused daemon does nothing, so its agents watch for it: after each renewal
   the daemon sends each agent ``{"type": "ping", "valid_for": v}`` with ``v``
   the time left until ``s + ttl - guard``. An agent built on makima.sdk stops
   itself when ``v`` passes on its own boot-time clock without a new ping.
   Agents speaking the raw protocol cannot be made to; when the paused daemon
   runs again, its first renewal (or its lapse watch, or the first write) finds
   it fenced and it kills them.

On the embedded database no peer can ever connect: the lease is renewed (for
``makima status``) but never enforced, and no agent is pinged.
"""

from __future__ import annotations

import enum
import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Any

from makima.limits import encoded_size

NOTIFY_LIMIT = 7900  # PostgreSQL refuses payloads of 8000 bytes or more
GUARD_SHARE = 0.2  # of the TTL: the margin between our deadline and the lease's


def boottime() -> float:
    """Seconds on the boot-time clock: it goes on while the machine is suspended."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


@dataclass
class LeaseTimer:
    """This daemon's view of its own lease, on the boot-time clock (pure: the
    moments are given). ``enforced`` False (the embedded database): always valid."""

    ttl: float
    renew: float
    enforced: bool
    valid_until: float = -math.inf

    @property
    def guard(self) -> float:
        return self.ttl * GUARD_SHARE

    def renewed(self, sent_at: float) -> None:
        """A renewal sent at ``sent_at`` succeeded."""
        self.valid_until = max(self.valid_until, sent_at + self.ttl - self.guard)

    def valid(self, now: float) -> bool:
        return not self.enforced or now < self.valid_until

    def valid_for(self, now: float) -> float:
        """Seconds left (0 when past); for a ping."""
        return max(0.0, self.valid_until - now)

    def next_renewal(self, now: float, last_sent: float, failed: bool) -> float:
        """When to try the next renewal: every ``renew`` seconds; after a failure,
        at once a few times within what is left (a quarter of the renew interval
        apart), so that one lost connection costs nothing."""
        if not failed:
            return last_sent + self.renew
        left = self.valid_for(now)
        if left <= 0:  # lost already: keep trying, calmly
            return now + self.renew / 2
        return now + max(0.05, min(self.renew / 4, left / 4))


class Kind(enum.StrEnum):
    """What a notification on the channel says."""

    ANSWER = "answer"  # an answer was recorded: its supervisor's owner delivers it
    REQUEST = "request"  # a cancel or resume was asked: its supervisor's owner acts
    RELEASED = "released"  # a daemon let go of its lease: claim now
    EVENT = "event"  # a daemon's event, for the watchers on the others


@dataclass(frozen=True, slots=True)
class Notice:
    kind: Kind
    daemon_id: uuid.UUID | None = None  # who sent it
    supervisor_id: uuid.UUID | None = None
    item_id: uuid.UUID | None = None  # the question or the request
    event: dict[str, Any] | None = None


def parse_notice(payload: str) -> Notice | None:
    """A notification's payload, or None when it is not one of ours (pure)."""
    try:
        value = json.loads(payload)
        kind = Kind(value["k"])
        return Notice(
            kind,
            _uuid(value.get("d")),
            _uuid(value.get("s")),
            _uuid(value.get("q") or value.get("r")),
            value.get("e") if isinstance(value.get("e"), dict) else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def _uuid(value: Any) -> uuid.UUID | None:
    return None if value is None else uuid.UUID(str(value))


def answer_notice(daemon_id: uuid.UUID, supervisor_id: uuid.UUID, question_id: uuid.UUID) -> str:
    return json.dumps(
        {
            "k": Kind.ANSWER.value,
            "d": str(daemon_id),
            "s": str(supervisor_id),
            "q": str(question_id),
        }
    )


# Fields of an event that may be long, cut first when a notification would be too big.
_LONG_FIELDS = ("context", "question", "error_message", "current_activity", "answer", "command")


def event_notice(daemon_id: uuid.UUID, event: dict[str, Any]) -> str | None:
    """An event as a notification for the other daemons (pure): long fields are cut
    to fit PostgreSQL's payload limit; None when it cannot fit at all."""
    body = {"k": Kind.EVENT.value, "d": str(daemon_id), "e": dict(event)}
    if encoded_size(body) <= NOTIFY_LIMIT:
        return json.dumps(body)
    shown = body["e"]
    assert isinstance(shown, dict)
    for key in _LONG_FIELDS:
        if key in shown and shown[key] is not None:
            text = shown[key] if isinstance(shown[key], str) else json.dumps(shown[key])
            shown[key] = text[:500] + "…" if len(text) > 500 else text
            shown["truncated"] = True
            if encoded_size(body) <= NOTIFY_LIMIT:
                return json.dumps(body)
    return None
