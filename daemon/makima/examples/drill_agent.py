"""The cluster drill's agent (``python -m makima.examples.drill_agent``).

It loops over steps: a phase, a short task spawned and waited for, a question
("continue" or "finish") waited for, a checkpoint of the next step; it stops
with ``done`` after the answer "finish" or after ``MAKIMA_DRILL_STEPS`` steps.
After a restoration it resumes at the checkpointed step, and the SDK claims
the step's question if it is still open instead of asking it again.

For every acknowledgement it receives (every awaited SDK call that returned)
it appends ``{pid, supervisor_id, what, t, …}`` to a record file of its own
process, ``MAKIMA_DRILL_DIR/<supervisor id>-<pid>.jsonl``, one JSON line per
write; ``t`` is ``time.monotonic()``, comparable across the processes of one
host. Its first line (``what: start``) names its daemon (``ppid``) and the
restoration source, its last (``what: exit``, when the process gets to write
it) the exit status. The daemon's lines as this process read them go to
``trace-<supervisor id>-<pid>.jsonl`` beside it (the SDK's MAKIMA_AGENT_TRACE).
See :mod:`makima.cluster_drill.checks` for what the drill makes of them.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import makima.sdk
from makima.sdk import Agent

DIR_ENV = "MAKIMA_DRILL_DIR"
PACE_ENV = "MAKIMA_DRILL_PACE"
STEPS_ENV = "MAKIMA_DRILL_STEPS"
CHOICES = ("continue", "finish")
DEFAULT_STEPS = 10_000


def question_text(step: int) -> str:
    return f"Step {step} is done. Go on?"


class Recorder:
    """Appends one JSON line per event to this process's record file."""

    def __init__(self, directory: Path, supervisor_id: str) -> None:
        self.pid = os.getpid()
        self.supervisor_id = supervisor_id
        self.path = directory / f"{supervisor_id}-{self.pid}.jsonl"
        # O_APPEND and one write per line: a line is never interleaved or half
        # written, unless the process dies inside that very write.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
        self.exited = False

    def record(self, what: str, **fields: Any) -> None:
        line = {
            "pid": self.pid,
            "supervisor_id": self.supervisor_id,
            "what": what,
            "t": time.monotonic(),
            **fields,
        }
        os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode())

    def exit(self, code: object) -> None:
        if not self.exited:
            self.exited = True
            self.record("exit", code=code if isinstance(code, int) else None)


async def drive(agent: Agent, recorder: Recorder, *, steps: int, pace: float) -> dict[str, Any]:
    restoration = agent.restoration
    recorder.record(
        "start",
        ppid=os.getppid(),
        source=None if restoration is None else restoration.source,
        restoration_count=0 if restoration is None else restoration.restoration_count,
    )
    data = agent.checkpoint_data
    step = data.get("step", 0) if isinstance(data, dict) else 0
    while step < steps:
        await agent.phase(f"step-{step}")
        recorder.record("phase", step=step)
        task_id = await agent.spawn(f"step-{step}", ["true"])
        recorder.record("spawn", task_id=task_id)
        await agent.wait_tasks()
        recorder.record("wait_tasks")
        question_id = await agent.submit_question(question_text(step), choices=CHOICES)
        recorder.record("ask", question_id=question_id)
        answer = await agent.wait_answer(question_id)
        recorder.record("answer", question_id=question_id, answer=answer)
        step += 1
        await agent.checkpoint({"step": step, "last_answer": answer})
        recorder.record("checkpoint", step=step)
        if answer == "finish":
            break
        await asyncio.sleep(pace)
    await agent.done({"steps": step})
    recorder.record("done")
    return {"steps": step}


def main() -> None:
    directory = Path(os.environ[DIR_ENV])
    supervisor_id = os.environ.get("MAKIMA_SUPERVISOR_ID", "unknown")
    steps = int(os.environ.get(STEPS_ENV, str(DEFAULT_STEPS)))
    pace = float(os.environ.get(PACE_ENV, "0.2"))
    recorder = Recorder(directory, supervisor_id)
    os.environ[makima.sdk.TRACE_ENV] = str(
        directory / f"trace-{supervisor_id}-{recorder.pid}.jsonl"
    )

    async def run(agent: Agent) -> dict[str, Any]:
        return await drive(agent, recorder, steps=steps, pace=pace)

    try:
        makima.sdk.run(run)
    except SystemExit as exc:
        recorder.exit(exc.code)
        raise
    finally:
        recorder.exit(None)


if __name__ == "__main__":
    main()
