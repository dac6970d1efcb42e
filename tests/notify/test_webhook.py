"""``makima notify --webhook``: one signed POST per question, across a kill -9 of
the daemon and a restart of the command; a receiver that fails gets the
question once it recovers, without holding up the other notifiers."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import anyio
import pytest

from makima.control.client import ControlClient
from makima.embedded import ConnectParams
from makima.notify.signature import SIGNATURE_HEADER, TIMESTAMP_HEADER, verify
from makima.notify.state import NotifyState
from tests.harness import DEADLINE, until
from tests.notify.helpers import RECORD_EXEC, Request, ask, notify_process, receiver
from tests.process import daemon_process

pytestmark = pytest.mark.anyio

SECRET = "correct horse battery staple"


def signed(request: Request) -> bool:
    return verify(
        SECRET,
        request.body,
        request.headers.get(TIMESTAMP_HEADER.lower()),
        request.headers.get(SIGNATURE_HEADER.lower()),
        now=time.time(),
    )


def attempts(events: list[dict[str, object]]) -> list[tuple[object, object, object]]:
    return [
        (e["question_id"], e["attempt"], e.get("status", e.get("error")))
        for e in events
        if e.get("event") == "notify.webhook_attempt"
    ]


async def test_one_post_per_question_across_daemon_kill_and_notify_restart(
    db_params: ConnectParams, short_tmp: Path, tmp_path: Path
) -> None:
    state_file = tmp_path / "notify.json"
    args = ["--webhook-secret", SECRET, "--state-file", str(state_file)]
    async with receiver() as rx, daemon_process(short_tmp, db_params) as daemon:
        await daemon.start()
        args += ["--webhook", rx.url]
        async with notify_process(tmp_path, daemon.socket_path, args) as first:
            async with ControlClient.connect(daemon.socket_path, timeout=DEADLINE) as client:
                _, q1 = await ask(client, short_tmp, "release", "Ship 2.1.0?", ["ship", "hold"])
            await rx.wait_for(lambda: len(rx.for_question(q1)) == 1, "the first question")

            # kill -9: the daemon comes back on the same state dir and re-sends q1
            # (question.redelivered, then question.pending in the new subscription).
            assert await daemon.kill() == -9
            await daemon.start()
            async with ControlClient.connect(daemon.socket_path, timeout=DEADLINE) as client:
                _, q2 = await ask(client, short_tmp, "docs", "Publish the docs?", ["yes", "no"])
            await rx.wait_for(lambda: len(rx.for_question(q2)) == 1, "the second question")
            assert await first.stop() == 0
        first_attempts = attempts(first.events())

        # A new `makima notify` on the same record: the snapshot re-sends q1 and q2,
        # and nobody is told again; q3 is told.
        async with notify_process(tmp_path, daemon.socket_path, args) as second:
            async with ControlClient.connect(daemon.socket_path, timeout=DEADLINE) as client:
                _, q3 = await ask(client, short_tmp, "deploy", "Deploy now?", ["now", "later"])
            await rx.wait_for(lambda: len(rx.for_question(q3)) == 1, "the third question")
            assert await second.stop() == 0
        second_attempts = attempts(second.events())

    assert [len(rx.for_question(q)) for q in (q1, q2, q3)] == [1, 1, 1], rx.requests
    assert len(rx.requests) == 3
    for request in rx.requests:
        assert request.method == "POST"
        assert request.path == "/hook/secret-topic"
        assert request.headers["content-type"] == "application/json"
        assert signed(request), request.headers
        body = request.json()
        assert body["type"] == "question.asked"
        assert request.headers["x-makima-delivery"] == body["delivery_id"]
    assert rx.for_question(q1)[0].json()["supervisor_name"] == "release"
    assert rx.for_question(q1)[0].json()["choices"] == ["ship", "hold"]
    assert first_attempts == [(q1, 1, 200), (q2, 1, 200)]
    assert second_attempts == [(q3, 1, 200)]
    # A tampered body or another secret does not verify.
    sample = rx.requests[0]
    tampered = Request(**{**sample.__dict__, "body": sample.body.replace(b"Ship", b"Sink")})
    assert not signed(tampered)
    assert not verify(
        "another secret",
        sample.body,
        sample.headers["x-makima-timestamp"],
        sample.headers["x-makima-signature"],
        now=time.time(),
    )
    print("webhook deliveries:", json.dumps(first_attempts + second_attempts))


async def test_failing_receiver_gets_it_later_and_holds_up_nobody(
    daemon: object, client: ControlClient, short_tmp: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exec"
    out.mkdir()
    socket_path = daemon.config.socket_path  # type: ignore[attr-defined]
    # 500, then 500 held until the exec notifier has told, then 200.
    released = anyio.Event()
    async with receiver(statuses=[500, 500], hold={2: released}) as rx:
        args = [
            "--webhook",
            rx.url,
            "--webhook-timeout",
            str(DEADLINE),
            "--exec",
            f"{sys.executable} {RECORD_EXEC} {out}",
            "--state-file",
            str(tmp_path / "notify.json"),
        ]
        async with notify_process(tmp_path, socket_path, args) as proc:
            _, qid = await ask(client, short_tmp, "release", "Ship it?", ["ship", "hold"])
            # The exec notifier tells while the webhook's second attempt hangs.
            await until(lambda: (out / f"{qid}.question.asked.json").exists(), "exec told")
            assert [r.status for r in rx.requests] == [500]
            released.set()
            await rx.wait_for(lambda: len(rx.ok()) == 1, "a successful POST")
            await until(
                lambda: any(
                    e.get("event") == "notify.told" and str(e.get("notifier")).startswith("webhook")
                    for e in proc.events()
                ),
                "the webhook notice recorded",
            )
            assert await proc.stop() == 0
        assert [r.status for r in rx.requests] == [500, 500, 200]
        assert {r.json()["question_id"] for r in rx.requests} == {qid}
        assert attempts(proc.events()) == [(qid, 1, 500), (qid, 2, 500), (qid, 3, 200)]
    state, problems = NotifyState.from_json(json.loads((tmp_path / "notify.json").read_text()))
    assert problems == []
    assert len(state.entries[qid].told[next(iter(state.entries[qid].told))]) == 2


async def test_a_question_not_told_before_a_restart_is_told_after_it(
    daemon: object, client: ControlClient, short_tmp: Path, tmp_path: Path
) -> None:
    """Told counts only once the receiver took it: a receiver down while the command
    stops still gets the question from the next run."""
    socket_path = daemon.config.socket_path  # type: ignore[attr-defined]
    state_file = tmp_path / "notify.json"
    async with receiver(statuses=[503] * 4) as rx:
        args = ["--webhook", rx.url, "--state-file", str(state_file)]
        async with notify_process(tmp_path, socket_path, args) as first:
            _, qid = await ask(client, short_tmp, "release", "Ship it?", ["ship", "hold"])
            await rx.wait_for(lambda: len(rx.requests) == 4, "four failed attempts")
            await until(
                lambda: any(e.get("event") == "notify.delivery_failed" for e in first.events()),
                "the failure logged",
            )
            assert await first.stop() == 0
        assert rx.ok() == []
        async with notify_process(tmp_path, socket_path, args) as second:
            await rx.wait_for(lambda: len(rx.ok()) == 1, "the question after the restart")
            assert await second.stop() == 0
    assert rx.ok()[0].json()["question_id"] == qid
