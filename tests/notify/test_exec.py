"""``makima notify --exec``: the notice as JSON on stdin and in MAKIMA_* variables,
no shell, bounded in time (the process group killed at the timeout)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from makima.control.client import ControlClient
from tests.harness import until
from tests.notify.helpers import HANG_EXEC, RECORD_EXEC, ask, notify_process

pytestmark = pytest.mark.anyio


def alive(pid: int) -> bool:
    """Whether ``pid`` still runs (a zombie waiting for its reaper does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def test_the_command_gets_the_question_on_stdin_and_in_its_environment(
    daemon: object, client: ControlClient, short_tmp: Path, tmp_path: Path
) -> None:
    socket_path = daemon.config.socket_path  # type: ignore[attr-defined]
    out = tmp_path / "out dir; rm -rf x"  # a space and a semicolon: no shell sees them
    out.mkdir()
    args = [
        "--exec",
        f"{sys.executable} {RECORD_EXEC} '{out}'",
        "--on",
        "asked",
        "--on",
        "answered",
        "--state-file",
        str(tmp_path / "notify.json"),
    ]
    async with notify_process(tmp_path, socket_path, args, MAKIMA_WEBHOOK_SECRET="hush") as proc:
        sid, qid = await ask(client, short_tmp, "release", "Ship $HOME `id`?", ["ship", "hold"])
        asked = out / f"{qid}.question.asked.json"
        await until(asked.exists, "the command run for the question")
        await client.call("question.answer", {"question_id": qid, "answer": "hold"})
        answered = out / f"{qid}.question.answered.json"
        await until(answered.exists, "the command run for the answer")
        assert await proc.stop() == 0

    seen = json.loads(asked.read_text())
    body = json.loads(seen["stdin"])
    assert body["question_id"] == qid
    assert body["supervisor_id"] == sid
    assert body["supervisor_name"] == "release"
    assert body["question"] == "Ship $HOME `id`?"
    assert body["choices"] == ["ship", "hold"]
    env = seen["env"]
    assert env["MAKIMA_EVENT"] == "question.asked"
    assert env["MAKIMA_QUESTION_ID"] == qid
    assert env["MAKIMA_SUPERVISOR_ID"] == sid
    assert env["MAKIMA_SUPERVISOR_NAME"] == "release"
    assert env["MAKIMA_QUESTION"] == "Ship $HOME `id`?"
    assert env["MAKIMA_CHOICES"] == "ship\nhold"
    assert json.loads(env["MAKIMA_CHOICES_JSON"]) == ["ship", "hold"]
    assert "MAKIMA_WEBHOOK_SECRET" not in env
    after = json.loads(answered.read_text())
    assert after["env"]["MAKIMA_EVENT"] == "question.answered"
    assert after["env"]["MAKIMA_ANSWER"] == "hold"
    assert json.loads(after["stdin"])["answer"] == "hold"


async def test_a_command_that_hangs_is_killed_with_its_group_at_the_timeout(
    daemon: object, client: ControlClient, short_tmp: Path, tmp_path: Path
) -> None:
    socket_path = daemon.config.socket_path  # type: ignore[attr-defined]
    out = tmp_path / "hang"
    out.mkdir()
    args = [
        "--exec",
        f"{sys.executable} {HANG_EXEC} {out}",
        "--exec-timeout",
        "1",
        "--state-file",
        str(tmp_path / "notify.json"),
    ]
    async with notify_process(tmp_path, socket_path, args) as proc:
        _, qid = await ask(client, short_tmp, "release", "Ship it?", ["ship", "hold"])
        await until(lambda: any(out.glob("*.pids")), "the command started")
        first = json.loads(next(out.glob("*.pids")).read_text())
        assert first["pgid"] == first["pid"]  # a process group of its own
        assert first["pgid"] != os.getpgid(0)
        await until(
            lambda: not alive(first["pid"]) and not alive(first["child"]),
            "the command and its child killed",
        )
        await until(
            lambda: any(e.get("event") == "notify.exec_timeout" for e in proc.events()),
            "the timeout logged",
        )
        assert await proc.stop() == 0
    # Stopping the command kills a retry that was running, too.
    started = [json.loads(p.read_text()) for p in out.glob("*.pids")]
    every = [pid for pids in started for pid in (pids["pid"], pids["child"])]
    await until(lambda: not any(alive(pid) for pid in every), "no leftovers")
    timeouts = [e for e in proc.events() if e.get("event") == "notify.exec_timeout"]
    assert timeouts[0]["question_id"] == qid
    failures = [e for e in proc.events() if e.get("event") == "notify.delivery_failed"]
    assert failures and failures[0]["failures"] == 1
