"""A test agent that writes makima-agent/1 by hand, following a JSON plan.

    python raw_agent.py PLAN_JSON LOG_PATH

PLAN_JSON: {"steps": [...], "resume": [...]} where each step is one of
  {"send": {...message...}, "await": "ack" | "answer" | "task_finished" | "tasks_done" | null}
  {"raw": "text to write as one line", "await": "error" | null}
  {"exit": CODE}                      exit at once with CODE
  {"wait_eof": true}                  wait until stdin closes, then exit 0
"resume" steps run instead of "steps" when the start message carries a restoration;
"resume": "auto" waits for the answer to a still-open question (then runs the
steps after the plan's first "answer" wait), or runs "steps" again from the start.
Every line received is appended to LOG_PATH as it arrives (one JSON per line),
with {"type": "_started"} first and {"type": "_sent", "message": ...} for each
line sent, so tests can read what the agent saw and did.
"""

from __future__ import annotations

import json
import sys
from typing import Any


def main() -> int:
    plan = json.loads(sys.argv[1])
    log = open(sys.argv[2], "a", encoding="utf-8")  # noqa: SIM115

    def record(obj: Any) -> None:
        log.write(json.dumps(obj) + "\n")
        log.flush()

    def receive() -> dict[str, Any] | None:
        line = sys.stdin.readline()
        if not line:
            return None
        message = json.loads(line)
        record(message)
        return message

    def send_line(text: str) -> None:
        record({"type": "_sent", "message": text})
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    record({"type": "_started"})
    start = receive()
    if start is None:
        return 3
    restoration = start.get("restoration") or {}
    answers = list(restoration.get("undelivered_answers") or [])
    steps = plan["steps"]
    if restoration and plan.get("resume") == "auto":
        if restoration.get("pending_questions") or answers:
            first_wait = next(i for i, s in enumerate(steps) if s.get("await") == "answer")
            steps = [{"await": "answer"}, *steps[first_wait + 1 :]]
    elif restoration and "resume" in plan:
        steps = plan["resume"]
    for step in steps:
        if "exit" in step:
            return int(step["exit"])
        if step.get("wait_eof"):
            while receive() is not None:
                pass
            return 0
        if "send" in step:
            send_line(json.dumps(step["send"]))
        elif "raw" in step:
            send_line(step["raw"])
        wanted = step.get("await")
        if wanted == "answer" and answers:
            answers.pop(0)
            continue
        while wanted:
            message = receive()
            if message is None:
                return 4
            if message["type"] == wanted:
                break
            if message["type"] == "cancel":
                return 0
    while receive() is not None:  # wait for stdin to close: never outlive the daemon
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
