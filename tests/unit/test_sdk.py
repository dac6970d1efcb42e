"""The agent SDK (makima.sdk) and the example release manager, driven as real
subprocesses over pipes by a hand-played daemon (tests/unit/fake_daemon.py)."""

from __future__ import annotations

import asyncio
import json
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from makima import sdk
from tests.unit.fake_daemon import (
    RELEASE_MANAGER,
    FakeDaemon,
    Message,
    fake_daemon,
    write_agent,
)

pytestmark = pytest.mark.anyio

QUESTION = "Ship release 1.0.0?"
CHECKS_DONE = [
    {"name": "lint", "status": "succeeded", "exit_code": 0, "summary": "All checks passed"},
    {"name": "unit-tests", "status": "succeeded", "exit_code": 0, "summary": "coverage 91%"},
    {"name": "changelog", "status": "succeeded", "exit_code": 0, "summary": "3 features"},
]


def restoration(**overrides: Any) -> dict[str, Any]:
    """A ``restoration`` block as the daemon sends it, for a crash during the decision."""
    base: dict[str, Any] = {
        "source": "daemon_restart",
        "restoration_count": 1,
        "context_message": "You were waiting for a person to decide whether to ship 1.0.0.",
        "phase": "decision",
        "state": "waiting_for_user",
        "progress": 50,
        "current_activity": "waiting for a person to decide",
        "checkpoint": {"version": "1.0.0", "phases_done": ["checks"], "checks": CHECKS_DONE},
        "history": [{"seq": 1, "role": "assistant", "content": {"checks": CHECKS_DONE}}],
        "pending_questions": [],
        "undelivered_answers": [],
        "tasks": [
            {
                "task_id": f"old-{c['name']}",
                "name": c["name"],
                "command": ["true"],
                "status": "succeeded",
                "exit_code": 0,
                "output_tail": c["summary"],
            }
            for c in CHECKS_DONE
        ],
    }
    base.update(overrides)
    return base


def pending(question_id: str, question: str = QUESTION) -> dict[str, Any]:
    return {
        "id": question_id,
        "question": question,
        "choices": ["ship", "hold"],
        "context": "3/3 checks passed",
        "asked_at": "2026-01-02T03:04:05+00:00",
    }


def assert_clean_stderr(daemon: FakeDaemon) -> None:
    assert "Traceback" not in daemon.stderr, daemon.stderr


# --------------------------------------------------------------------------- release manager


@pytest.mark.parametrize("finish_tasks", ["at_spawn", "at_wait"])
async def test_release_manager_ships(tmp_path: Path, finish_tasks: Any) -> None:
    async with fake_daemon(RELEASE_MANAGER, "--version", "2.0.0", tmp_path=tmp_path) as daemon:
        await daemon.start()
        final = await daemon.drive(
            answers={"Ship release 2.0.0?": "ship"}, finish_tasks=finish_tasks
        )
        await daemon.close_stdin()
        assert await daemon.wait_exit() == 0

    assert final["type"] == "done"
    assert [m["phase"] for m in daemon.of_type("phase")] == ["checks", "decision", "release"]
    assert [m["name"] for m in daemon.of_type("spawn")] == [
        "lint",
        "unit-tests",
        "changelog",
        "publish",
    ]
    (ask,) = daemon.of_type("ask")
    assert ask["question"] == "Ship release 2.0.0?"
    assert ask["choices"] == ["ship", "hold"]
    assert "3/3 checks passed" in ask["context"]
    assert "- lint: succeeded (All checks passed)" in ask["context"]
    checkpoints = [m["data"] for m in daemon.of_type("checkpoint")]
    assert [c["phases_done"] for c in checkpoints] == [
        ["checks"],
        ["checks", "decision"],
        ["checks", "decision", "release"],
    ]
    assert checkpoints[1]["decision"] == "ship"
    progress = [m["progress"] for m in daemon.of_type("activity") if "progress" in m]
    assert progress == sorted(progress)
    assert progress[-1] == 100
    result = final["result"]
    assert result["version"] == "2.0.0"
    assert result["decision"] == "ship"
    assert result["released"] is True
    assert result["checks"] == {
        "lint": "succeeded",
        "unit-tests": "succeeded",
        "changelog": "succeeded",
    }
    assert result["publish"]["status"] == "succeeded"
    assert result["publish"]["summary"] == "tagged v2.0.0; release published"
    refs = [m["ref"] for m in daemon.received]
    assert len(set(refs)) == len(refs)
    assert_clean_stderr(daemon)


async def test_release_manager_holds_when_a_check_fails(tmp_path: Path) -> None:
    args = ("--checks", "2", "--fail-check", "unit-tests")
    async with fake_daemon(RELEASE_MANAGER, *args, tmp_path=tmp_path) as daemon:
        await daemon.start()
        final = await daemon.drive(answers={QUESTION: "hold"})
        assert await daemon.wait_exit() == 0

    assert [m["name"] for m in daemon.of_type("spawn")] == ["lint", "unit-tests"]
    (ask,) = daemon.of_type("ask")
    assert "1/2 checks passed" in ask["context"]
    assert "Failing: unit-tests" in ask["context"]
    assert final["result"]["decision"] == "hold"
    assert final["result"]["released"] is False
    assert final["result"]["checks"] == {"lint": "succeeded", "unit-tests": "failed"}


@pytest.mark.parametrize("when", ["right_after_start", "after_phase"])
async def test_restored_pending_question_is_not_asked_again(tmp_path: Path, when: str) -> None:
    answer = {"type": "answer", "question_id": "q-before-crash", "answer": "ship"}

    def hook(message: Message) -> list[Message]:
        if when == "after_phase" and message["type"] == "phase" and message["phase"] == "decision":
            return [answer]
        return []

    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start(restoration(pending_questions=[pending("q-before-crash")]))
        if when == "right_after_start":
            await daemon.send(answer)  # buffered by the SDK until ask() claims the question
        final = await daemon.drive(forbid=("ask",), hook=hook)
        assert await daemon.wait_exit() == 0

    # The checks were not run again; only the publish task was spawned.
    assert [m["name"] for m in daemon.of_type("spawn")] == ["publish"]
    assert [m["phase"] for m in daemon.of_type("phase")] == ["decision", "release"]
    assert daemon.received[0]["type"] == "activity"
    assert "already done: checks" in daemon.received[0]["text"]
    assert final["result"]["decision"] == "ship"
    assert final["result"]["released"] is True
    assert final["result"]["checks"] == {c["name"]: "succeeded" for c in CHECKS_DONE}


async def test_restored_undelivered_answer_is_used(tmp_path: Path) -> None:
    undelivered = {"question_id": "q-answered", "answer": "hold", "question": QUESTION}
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start(restoration(state="working", undelivered_answers=[undelivered]))
        # The daemon may also re-send it as an answer message: still delivered once.
        await daemon.send({"type": "answer", "question_id": "q-answered", "answer": "hold"})
        final = await daemon.drive(forbid=("ask", "spawn"))
        assert await daemon.wait_exit() == 0

    assert final["result"]["decision"] == "hold"
    assert final["result"]["released"] is False


async def test_restored_running_publish_is_not_started_twice(tmp_path: Path) -> None:
    checkpoint = {
        "version": "1.0.0",
        "phases_done": ["checks", "decision"],
        "checks": CHECKS_DONE,
        "decision": "ship",
    }
    publish = {
        "task_id": "t-publish",
        "name": "publish",
        "command": ["true"],
        "status": "running",
        "exit_code": None,
        "output_tail": "uploading lumen-1.0.0.tar.gz ... ok",
    }
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start(
            restoration(
                phase="release", state="waiting_for_tasks", checkpoint=checkpoint, tasks=[publish]
            )
        )
        daemon.results["t-publish"] = {
            "type": "task_finished",
            "task_id": "t-publish",
            "status": "succeeded",
            "exit_code": 0,
            "output_tail": "tagged v1.0.0; release published",
        }
        final = await daemon.drive(forbid=("ask", "spawn"))
        assert await daemon.wait_exit() == 0

    assert len(daemon.of_type("wait_tasks")) == 1
    assert final["result"]["publish"] == {
        "task_id": "t-publish",
        "status": "succeeded",
        "exit_code": 0,
        "summary": "tagged v1.0.0; release published",
    }


async def test_restored_after_everything_only_says_done(tmp_path: Path) -> None:
    checkpoint = {
        "version": "1.0.0",
        "phases_done": ["checks", "decision", "release"],
        "checks": CHECKS_DONE,
        "decision": "hold",
        "publish": None,
    }
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start(restoration(checkpoint=checkpoint, source="agent_restart"))
        final = await daemon.drive(forbid=("ask", "spawn", "phase", "checkpoint"))
        assert await daemon.wait_exit() == 0
    assert final["result"]["decision"] == "hold"


async def test_checkpoint_of_another_version_is_ignored(tmp_path: Path) -> None:
    async with fake_daemon(RELEASE_MANAGER, "--version", "1.1.0", tmp_path=tmp_path) as daemon:
        await daemon.start(restoration(pending_questions=[pending("q-old")]))
        final = await daemon.drive(answers={"Ship release 1.1.0?": "hold"})
        assert await daemon.wait_exit() == 0
    assert len(daemon.of_type("spawn")) == 3  # the 1.0.0 checks do not count for 1.1.0
    assert final["result"]["version"] == "1.1.0"


# --------------------------------------------------------------------------- questions


async def test_each_answer_is_returned_exactly_once(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                a = await agent.ask("A?")
                b = await agent.ask("B?", choices=["yes", "no"])
                try:
                    await agent.wait_answer("q-a")
                except sdk.AgentError as exc:
                    again = str(exc)
                c = await agent.ask("A?")  # no restored question left: asked anew
                return {"a": a, "b": b, "c": c, "again": again}
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start(
            restoration(
                checkpoint=None,
                pending_questions=[pending("q-b", "B?")],
                undelivered_answers=[{"question_id": "q-a", "answer": "first", "question": "A?"}],
            )
        )
        for _ in range(2):  # duplicates must not produce a second delivery
            await daemon.send({"type": "answer", "question_id": "q-a", "answer": "first"})
            await daemon.send({"type": "answer", "question_id": "q-b", "answer": "no"})
        final = await daemon.drive(answers={"A?": "third"})
        assert await daemon.wait_exit() == 0

    assert [m["question"] for m in daemon.of_type("ask")] == ["A?"]
    result = final["result"]
    assert (result["a"], result["b"], result["c"]) == ("first", "no", "third")
    assert "already returned" in result["again"]


async def test_undelivered_answer_without_text_is_available_by_id(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                (undelivered,) = agent.restoration.undelivered_answers
                return {"answer": await agent.wait_answer(undelivered.question_id)}
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start(
            restoration(undelivered_answers=[{"question_id": "q-x", "answer": "hold"}])
        )
        final = await daemon.expect("done")
        await daemon.ack(final)
        assert await daemon.wait_exit() == 0
    assert final["result"] == {"answer": "hold"}
    assert "came without its text" in daemon.stderr


# --------------------------------------------------------------------------- replies, tasks


async def test_error_reply_raises_daemon_error(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                try:
                    await agent.phase("bogus")
                except sdk.DaemonError as exc:
                    return {"request": exc.request, "code": exc.code,
                            "message": exc.message, "ref": exc.ref, "text": str(exc)}
                return {"raised": False}
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        phase = await daemon.expect("phase")
        await daemon.error(phase, "illegal_state", "no phase change while blocked")
        final = await daemon.expect("done")
        await daemon.ack(final)
        assert await daemon.wait_exit() == 0

    result = final["result"]
    assert result["request"] == "phase"
    assert result["code"] == "illegal_state"
    assert result["message"] == "no phase change while blocked"
    assert result["ref"] == phase["ref"]
    assert "illegal_state" in result["text"]


async def test_uncaught_error_exits_1_without_fail(tmp_path: Path) -> None:
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start()
        phase = await daemon.expect("phase")
        await daemon.error(phase, "internal", "database unavailable")
        assert await daemon.stdout_closed()
        assert await daemon.wait_exit() == sdk.EXIT_ERROR
    assert "DaemonError" in daemon.stderr
    assert "database unavailable" in daemon.stderr
    assert not daemon.of_type("fail")


async def test_wait_tasks_reports_each_finished_task_once(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                py = sys.executable
                a = await agent.spawn("a", [py, "-c", "print('a')"])
                b = await agent.spawn("b", [py, "-c", "print('b')"], env={"X": "1"})
                first = await agent.wait_tasks()
                c = await agent.spawn("c", [py, "-c", "print('c')"], cwd="/")
                second = await agent.wait_tasks()
                third = await agent.wait_tasks()
                return {
                    "first": [(r.name, r.status, r.output_tail.strip()) for r in first],
                    "second": [(r.name, r.ok) for r in second],
                    "third": [r.name for r in third],
                    "known": sorted(t.name for t in agent.tasks.values()),
                    "finished": all(t.finished for t in agent.tasks.values()),
                }
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        final = await daemon.drive(finish_tasks="at_spawn")
        assert await daemon.wait_exit() == 0

    spawns = daemon.of_type("spawn")
    assert spawns[1]["env"] == {"X": "1"}
    assert spawns[2]["cwd"] == "/"
    assert "cwd" not in spawns[0]
    assert final["result"] == {
        "first": [["a", "succeeded", "a"], ["b", "succeeded", "b"]],
        "second": [["c", True]],
        "third": [],
        "known": ["a", "b", "c"],
        "finished": True,
    }


async def test_tasks_done_before_the_ack_is_not_lost(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                return {"finished": [r.task_id for r in await agent.wait_tasks()]}
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        wait = await daemon.expect("wait_tasks")
        await daemon.send(
            {
                "type": "task_finished",
                "task_id": "t-9",
                "status": "failed",
                "exit_code": 2,
                "output_tail": "boom",
            }
        )
        await daemon.send({"type": "tasks_done"})
        await daemon.ack(wait)
        final = await daemon.expect("done")
        await daemon.ack(final)
        assert await daemon.wait_exit() == 0
    assert final["result"] == {"finished": ["t-9"]}


# --------------------------------------------------------------------------- stdio and exits


async def test_stdout_carries_only_protocol_lines(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                print("printed in main")
                sys.stdout.write("written to sys.stdout\\n")
                os.write(1, b"written to fd 1\\n")
                subprocess.run(["echo", "from a child"], check=True)
                assert sys.stdin.read() == ""  # stdin is not the protocol channel
                return {"ok": True}  # returning without done(): the SDK sends done
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        final = await daemon.expect("done")
        await daemon.ack(final)
        assert await daemon.wait_exit() == 0
    assert final["result"] == {"ok": True}
    for text in (
        "printed in main",
        "written to sys.stdout",
        "written to fd 1",
        "from a child",
    ):
        assert text in daemon.stderr


async def test_too_long_message_is_refused_before_sending(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                try:
                    await agent.checkpoint("x" * (1 << 20))
                except sdk.AgentError as exc:
                    await agent.done({"error": str(exc)})
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        final = await daemon.expect("done")  # nothing was sent before it
        await daemon.ack(final)
        assert await daemon.wait_exit() == 0
    assert "at most 1048576 (1 MiB)" in final["result"]["error"]


async def test_stdin_eof_exits_promptly(tmp_path: Path) -> None:
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start()
        await daemon.expect("phase")  # left unacknowledged: the agent is waiting
        await daemon.close_stdin()
        assert await daemon.wait_exit(within=5) == sdk.EXIT_DAEMON_GONE
    assert_clean_stderr(daemon)


async def test_stdin_eof_before_start_exits(tmp_path: Path) -> None:
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.close_stdin()
        assert await daemon.wait_exit(within=5) == sdk.EXIT_DAEMON_GONE
    assert_clean_stderr(daemon)


async def test_stdin_eof_ends_an_agent_stuck_in_blocking_code(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                # Send without waiting for the ack (the line is written at once),
                # then block the event loop: only the watchdog can end this.
                sending = asyncio.ensure_future(agent.activity("blocking now"))
                await asyncio.sleep(0)
                time.sleep(60)
            """
        ),
        run="sdk.run(main, exit_grace=0.2)",
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        await daemon.expect("activity")
        await daemon.close_stdin()
        assert await daemon.wait_exit(within=5) == sdk.EXIT_DAEMON_GONE
    assert "still running 0.2s after stdin closed; exiting now" in daemon.stderr


async def test_cancel_exits(tmp_path: Path) -> None:
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.start(restoration(pending_questions=[pending("q-1")]))
        while (message := await daemon.receive())["type"] != "activity" or (
            "decide" not in message["text"]
        ):
            await daemon.ack(message)
        await daemon.ack(message)  # now it waits for the answer
        await daemon.send({"type": "cancel", "reason": "operator"})
        assert await daemon.wait_exit(within=5) == sdk.EXIT_CANCELLED
    assert_clean_stderr(daemon)
    assert not daemon.of_type("done")


async def test_cancel_lets_main_clean_up(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                try:
                    await agent.ask("Go on?")
                except asyncio.CancelledError:
                    await agent.message("assistant", {"cancelled": agent.cancel_reason})
                    raise
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        await daemon.ack(await daemon.expect("ask"), question_id="q-1")
        await daemon.send({"type": "cancel", "reason": "operator"})
        goodbye = await daemon.expect("message")
        await daemon.ack(goodbye)
        assert await daemon.wait_exit(within=5) == sdk.EXIT_CANCELLED
    assert goodbye["content"] == {"cancelled": "operator"}


async def test_bad_start_exits_with_protocol_error(tmp_path: Path) -> None:
    async with fake_daemon(RELEASE_MANAGER, tmp_path=tmp_path) as daemon:
        await daemon.send({"type": "start", "protocol": 2, "supervisor_id": "x"})
        assert await daemon.wait_exit(within=5) == sdk.EXIT_PROTOCOL
    assert "makima-agent/2" in daemon.stderr
    assert_clean_stderr(daemon)


async def test_garbage_from_the_daemon_is_ignored(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                await agent.activity("one")
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        activity = await daemon.expect("activity")
        await daemon.send_raw(b"not json\n[1, 2]\n\n")
        await daemon.send({"type": "something_new", "x": 1})
        await daemon.send({"type": "ack", "ref": "r999"})
        await daemon.ack(activity)
        await daemon.ack(await daemon.expect("done"))
        assert await daemon.wait_exit() == 0
    assert "not JSON" in daemon.stderr
    assert "unknown message type 'something_new'" in daemon.stderr


# --------------------------------------------------------------------------- the core, in process


async def test_core_parses_start_and_buffers_answers() -> None:
    frames: list[bytes] = []
    sent = asyncio.Event()

    def write(frame: bytes) -> None:
        frames.append(frame)
        sent.set()

    agent = sdk.Agent(write)
    agent.feed_line(
        b'{"type":"start","protocol":1,"supervisor_id":"s1","name":"n","goal":"g",'
        b'"restoration":{"source":"manual","pending_questions":[{"id":"q1","question":"Q?",'
        b'"choices":["a","b"],"context":null,"asked_at":null}],"checkpoint":{"k":1}}}'
    )
    start = await agent.started()
    assert start.supervisor_id == "s1"
    assert start.restoration is not None
    assert start.restoration.pending_questions[0].choices == ("a", "b")
    assert agent.checkpoint_data == {"k": 1}
    agent.feed_line(b'{"type":"answer","question_id":"q1","answer":"b"}')
    with anyio.fail_after(1):
        assert await agent.ask("Q?", choices=["a", "b"]) == "b"
    assert frames == []  # the restored question was not asked again

    with anyio.fail_after(1):
        async with anyio.create_task_group() as tg:
            answers: list[str] = []

            async def ask_other() -> None:
                answers.append(await agent.ask("Other?"))

            tg.start_soon(ask_other)
            await sent.wait()
            assert json.loads(frames[-1]) == {"type": "ask", "ref": "r1", "question": "Other?"}
            # The answer may overtake the ack: it is kept until ask() wants it.
            agent.feed_line(b'{"type":"answer","question_id":"q2","answer":"fine"}')
            agent.feed_line(b'{"type":"ack","ref":"r1","question_id":"q2"}')
    assert answers == ["fine"]

    agent.feed_eof()
    assert agent.closed
    with pytest.raises(sdk.DaemonGoneError):
        await agent.activity("too late")


def test_start_message_rejects_other_protocols() -> None:
    with pytest.raises(sdk.ProtocolError, match="makima-agent/2"):
        sdk.StartMessage.from_json({"type": "start", "protocol": 2, "supervisor_id": "s"})
    with pytest.raises(sdk.ProtocolError, match="restoration"):
        sdk.StartMessage.from_json(
            {"type": "start", "protocol": 1, "supervisor_id": "s", "restoration": []}
        )


@pytest.mark.parametrize("ended", ["newline", "stream"])
async def test_a_dropped_line_is_an_error_not_a_hang(tmp_path: Path, ended: str) -> None:
    """A line over 1 MiB from the daemon was dropped with a warning, and the agent
    waited for its ack forever. Now every wait fails and the agent exits, so that
    the daemon restarts it through restoration."""
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                await agent.phase("waiting for an ack that is dropped")
                return {"unreachable": True}
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start()
        phase = await daemon.expect("phase")
        tail = b"\n" if ended == "newline" else b""
        await daemon.send_raw(b'{"type":"ack","ref":"' + b"x" * (sdk.MAX_LINE + 10) + b'"}' + tail)
        assert await daemon.stdout_closed()
        assert await daemon.wait_exit() != 0
    assert "over 1048576 bytes, which was dropped" in daemon.stderr
    assert phase["ref"] and not daemon.of_type("done")


async def test_history_pages_back(tmp_path: Path) -> None:
    agent = write_agent(
        tmp_path,
        textwrap.dedent(
            """
            async def main(agent):
                messages, more = await agent.history(before=5, limit=2)
                return {"seqs": [m["seq"] for m in messages], "more": more,
                        "before": agent.restoration.history_before}
            """
        ),
    )
    async with fake_daemon(agent, tmp_path=tmp_path) as daemon:
        await daemon.start(restoration=restoration(history_before=5, history_more=True))
        page = await daemon.expect("history")
        assert page["before"] == 5 and page["limit"] == 2
        await daemon.ack(page, messages=[{"seq": 3}, {"seq": 4}], more=True)
        final = await daemon.expect("done")
        await daemon.ack(final)
    assert final["result"] == {"seqs": [3, 4], "more": True, "before": 5}
