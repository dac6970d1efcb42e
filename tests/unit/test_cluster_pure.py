"""The lease's timing and the channel's messages (pure parts of makima.cluster)."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from makima.cluster import (
    NOTIFY_LIMIT,
    Kind,
    LeaseTimer,
    answer_notice,
    event_notice,
    parse_notice,
)
from makima.config import DaemonConfig
from makima.errors import InvalidValueError


def test_the_lease_counts_from_when_the_renewal_was_sent() -> None:
    timer = LeaseTimer(ttl=15.0, renew=5.0, enforced=True)
    assert not timer.valid(0.0)  # never renewed
    timer.renewed(sent_at=100.0)
    # Valid until sent + TTL - guard (a fifth of the TTL), whenever the reply came.
    assert timer.valid_until == 112.0
    assert timer.valid(111.9) and not timer.valid(112.0)
    assert timer.valid_for(110.0) == 2.0 and timer.valid_for(200.0) == 0.0
    timer.renewed(sent_at=99.0)  # a late reply to an older renewal never shortens it
    assert timer.valid_until == 112.0


def test_renewals_retry_quickly_within_the_lease_and_calmly_past_it() -> None:
    timer = LeaseTimer(ttl=15.0, renew=5.0, enforced=True)
    timer.renewed(sent_at=0.0)
    assert timer.next_renewal(now=1.0, last_sent=0.0, failed=False) == 5.0
    assert timer.next_renewal(now=5.0, last_sent=5.0, failed=True) == 5.0 + 1.25
    assert timer.next_renewal(now=11.0, last_sent=11.0, failed=True) == 11.0 + 0.25
    assert timer.next_renewal(now=20.0, last_sent=20.0, failed=True) == 22.5


def test_an_unenforced_lease_is_always_valid() -> None:
    timer = LeaseTimer(ttl=1.0, renew=0.5, enforced=False)
    assert timer.valid(1e9)


def test_the_renew_interval_leaves_room_for_a_retry(tmp_path: Path) -> None:
    with pytest.raises(InvalidValueError, match=r"more than half the lease TTL 10.0s"):
        DaemonConfig(
            state_dir=tmp_path, socket_path=tmp_path / "s", lease_ttl=10.0, lease_renew=6.0
        )


def test_notices_round_trip_and_strangers_are_ignored() -> None:
    d, s, q = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    notice = parse_notice(answer_notice(d, s, q))
    assert notice is not None
    assert (notice.kind, notice.daemon_id, notice.supervisor_id, notice.item_id) == (
        Kind.ANSWER,
        d,
        s,
        q,
    )
    for bad in ("", "nope", "[]", '{"k": "other"}', '{"k": "answer", "s": "not-a-uuid"}'):
        assert parse_notice(bad) is None


def test_a_big_event_is_cut_to_fit_a_notification() -> None:
    d = uuid.uuid4()
    event = {
        "kind": "question.asked",
        "supervisor_id": str(uuid.uuid4()),
        "question": "q" * 6000,
        "context": "c" * 6000,
    }
    payload = event_notice(d, event)
    assert payload is not None and len(payload.encode()) <= NOTIFY_LIMIT
    parsed = parse_notice(payload)
    assert parsed is not None and parsed.event is not None
    assert parsed.event["truncated"] is True and parsed.event["question"].startswith("q")
    small = event_notice(d, {"kind": "task.spawned", "supervisor_id": "x"})
    assert small is not None and json.loads(small)["e"] == {
        "kind": "task.spawned",
        "supervisor_id": "x",
    }
    hopeless = {"kind": "x", "other": "z" * 9000}  # nothing that may be cut
    assert event_notice(d, hopeless) is None
