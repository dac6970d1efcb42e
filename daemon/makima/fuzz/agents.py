"""The runner's agents: ``python -m makima.fuzz canary | lines PLAN LOG | sink``."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import select
import sys
import threading
from collections.abc import Sequence
from typing import Any

from makima.fuzz.oracle import SYNC_PREFIX

# --------------------------------------------------------------------------- the runner's agents

CANARY_PHASE = "makima-fuzz-canary"
CANARY_CHOICES = ("yes", "no")
LINES_FINISHED = "makima fuzz: every line sent"
SINK_QUESTION = "makima fuzz: the sink agent is writing and will read nothing"
TRACE_ENV = "MAKIMA_AGENT_TRACE"


def canary_question(n: int) -> str:
    return f"makima fuzz canary question {n}"


async def _canary(agent: Any) -> None:
    """Phase, then question after question, each answer checkpointed before the next."""
    data = agent.checkpoint_data
    answered = data.get("answered", 0) if isinstance(data, dict) else 0
    await agent.phase(CANARY_PHASE)
    while True:
        answer = await agent.ask(canary_question(answered), choices=list(CANARY_CHOICES))
        answered += 1
        await agent.checkpoint({"answered": answered, "last": answer})


def _lines_agent(plan_path: str, log_path: str) -> int:
    """Write every line of the plan, each followed by a sync activity, and log the
    replies that came before the sync's ack; then report blocked with LINES_FINISHED
    and wait for stdin to close."""
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    with open(log_path, "a", encoding="utf-8") as log, open(plan_path, encoding="utf-8") as plan:

        def record(entry: dict[str, object]) -> None:
            log.write(json.dumps(entry) + "\n")
            log.flush()

        start = stdin.readline()
        if not start:
            return 3
        if json.loads(start).get("restoration"):
            record({"restarted": True})
            while stdin.readline():
                pass
            return 0
        for i, text in enumerate(plan):
            entry = json.loads(text)
            data = base64.b64decode(entry["data"])
            at = 0
            for size in (*entry["chunks"], len(data)):
                stdout.write(data[at : at + size])
                stdout.flush()
                at += size
            sync = f"{SYNC_PREFIX}{i}"
            stdout.write(json.dumps({"type": "activity", "text": "sync", "ref": sync}).encode())
            stdout.write(b"\n")
            stdout.flush()
            replies: list[dict[str, object]] = []
            while True:
                raw = stdin.readline()
                if not raw:
                    record({"i": i, "replies": replies, "eof": True})
                    return 4
                try:
                    message = json.loads(raw)
                except ValueError:
                    replies.append({"type": "unreadable", "size": len(raw)})
                    continue
                if not isinstance(message, dict) or message.get("type") not in ("ack", "error"):
                    continue
                if message.get("ref") == sync:
                    record({"i": i, "replies": replies, "sync": message.get("type")})
                    break
                replies.append(
                    {
                        "type": message.get("type"),
                        "ref": message.get("ref"),
                        "code": message.get("code"),
                        "message": str(message.get("message", ""))[:300],
                        "question_id": message.get("question_id"),
                        "size": len(raw),
                    }
                )
        record({"finished": True})
        finish = {"type": "blocked", "reason": LINES_FINISHED, "ref": f"{SYNC_PREFIX}end"}
        stdout.write(json.dumps(finish).encode() + b"\n")
        stdout.flush()
        while stdin.readline():
            pass
    return 0


def _sink_agent() -> int:
    """Ask one question, then write far more than the daemon's replies can fit in
    a pipe, and read nothing; exit when stdin closes (POLLHUP, without reading)."""
    out = sys.stdout.buffer

    def flood() -> None:
        with contextlib.suppress(OSError):
            out.write(json.dumps({"type": "ask", "question": SINK_QUESTION, "ref": "q"}).encode())
            out.write(b"\n")
            big = "r" * 200_000
            for k in range(4):
                out.write(json.dumps({"type": "fuzz-sink", "ref": f"{k}{big}"}).encode() + b"\n")
            for k in range(3000):
                out.write(json.dumps({"type": "fuzz-sink", "ref": f"s{k:064d}"}).encode() + b"\n")
            out.flush()

    threading.Thread(target=flood, daemon=True).start()
    poller = select.poll()
    poller.register(sys.stdin.fileno(), 0)  # POLLHUP only: the daemon closed our stdin
    poller.poll()
    os._exit(0)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m makima.fuzz canary | lines PLAN LOG | sink``: the runner's agents."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args == ["canary"]:
        from makima import sdk

        sdk.run(_canary)
    if len(args) == 3 and args[0] == "lines":
        return _lines_agent(args[1], args[2])
    if args == ["sink"]:
        return _sink_agent()
    print("usage: python -m makima.fuzz canary | lines PLAN LOG | sink", file=sys.stderr)
    return 2
