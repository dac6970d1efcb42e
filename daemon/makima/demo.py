"""``makima demo``: the quick start.

Runs a daemon in this process on the embedded database, starts the example
release-manager agent under it, shows the events live as a client of the
control socket would see them, and lets the person answer the agent's
question right there. Exits 0 when the supervisor completes.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console

from makima import logs
from makima.config import DaemonConfig, default_state_dir
from makima.control.client import ControlClient, RemoteError
from makima.daemon import Daemon
from makima.prompt import prompt_answer

console = Console(stderr=True, highlight=False)

AGENT_MODULE = "makima.examples.release_manager"
CLAUDE_GOAL = (
    "You work in an empty scratch folder. Ask me with ask_user which of these file names "
    "to use: notes.md, haiku.txt, poem.md. Write a short haiku about durable agents into "
    "that file, then call done with the file name as the result."
)


def demo_state_dir(given: Path | None) -> Path:
    if given is not None:
        return given
    return default_state_dir(os.environ, is_root=os.geteuid() == 0) / "demo"


def describe(event: dict[str, Any]) -> str | None:
    """One line for a person, or None for events the demo does not show."""
    kind = event["kind"]
    if kind == "supervisor.state_changed":
        extra = f" ({event['error_message']})" if event.get("error_message") else ""
        return f"state      {event['old_state']} -> {event['state']}{extra}"
    if kind == "task.spawned":
        return f"task       {event['name']} started"
    if kind == "task.finished":
        return f"task       {event['name']} {event['status']} (exit {event['exit_code']})"
    if kind in ("question.asked", "question.redelivered", "question.pending"):
        return f"question   {event['question']}  [{' / '.join(event['choices']) or 'free text'}]"
    if kind == "question.answered":
        return f"answered   {event['answer']!r}"
    if kind == "supervisor.restored":
        count, outcome = event["restoration_count"], event["outcome"]
        return f"restored   {event['name']} (restoration {count}, {outcome})"
    return None


async def run_demo(
    state_dir: Path | None, preset: str | None, limit: float, claude: bool = False
) -> int:
    directory = demo_state_dir(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        directory.chmod(
            directory.stat().st_mode | 0o011
        )  # the embedded server's account passes through
    log_path = directory / "daemon.log"
    log_file = log_path.open("a", encoding="utf-8")
    logs.configure(stream=log_file, json=True)
    config = DaemonConfig.resolve(state_dir=directory, socket=directory / "makima.sock")
    console.print(f"[bold]makima demo[/bold]  state in {directory}  (daemon log: {log_path})")
    console.print(
        "starting the daemon on the embedded PostgreSQL (the first run takes a few seconds)…"
    )
    daemon = Daemon(config, handle_signals=True)
    interactive = sys.stdin.isatty() and preset is None
    outcome = 1
    try:
        async with anyio.create_task_group() as tg:
            await tg.start(daemon.run)
            console.print(f"daemon ready; control socket {config.socket_path}")
            with anyio.move_on_after(limit) as deadline:
                create = _claude_supervisor(directory) if claude else _release_supervisor()
                outcome = await _drive(config.socket_path, create, preset, interactive)
            if deadline.cancelled_caught:
                console.print(f"[red]the demo did not finish within {limit:.0f}s[/red]")
            daemon.request_shutdown()
    finally:
        log_file.close()
    console.print("daemon stopped cleanly." if outcome == 0 else "daemon stopped.")
    return outcome


def _release_supervisor() -> dict[str, Any]:
    return {
        "name": "release-1.0.0",
        "goal": "Check, decide and publish release 1.0.0",
        "command": [sys.executable, "-m", AGENT_MODULE, "--version", "1.0.0"],
    }


def _claude_supervisor(directory: Path) -> dict[str, Any]:
    """Claude Code on a small goal, in a scratch folder of the demo's state directory."""
    scratch = directory / "claude-scratch"
    scratch.mkdir(exist_ok=True)
    return {"name": "claude-demo", "goal": CLAUDE_GOAL, "claude": {}, "cwd": str(scratch)}


async def _drive(
    socket_path: Path, create: dict[str, Any], preset: str | None, interactive: bool
) -> int:
    async with (
        ControlClient.connect(socket_path, timeout=30.0) as client,
        client.events() as events,
    ):
        try:
            created = await client.call("supervisor.create", create)
        except RemoteError as exc:  # e.g. no API key for --claude
            console.print(f"makima: {exc.message}", markup=False)
            return 1
        mine = created["supervisor_id"]
        console.print(f"started supervisor {mine[:8]} ({create['name']})\n")
        answered: set[str] = set()
        async for event in events:
            if event.get("supervisor_id") != mine:
                continue
            line = describe(event)
            if line:
                console.print(f"  {line}", markup=False)
            kind = event["kind"]
            if kind in ("question.asked", "question.redelivered", "question.pending"):
                qid = event["question_id"]
                if qid in answered:
                    continue
                answered.add(qid)
                if interactive:
                    text = await anyio.to_thread.run_sync(prompt_answer, event)
                else:
                    text = preset or (event["choices"][0] if event["choices"] else "yes")
                    console.print(f"  (answering {text!r}; pass --answer to choose)", markup=False)
                try:
                    await client.call("question.answer", {"question_id": qid, "answer": text})
                except RemoteError as exc:  # e.g. --answer names no choice
                    console.print(f"makima: {exc.message}", markup=False)
                    return 1
            if kind == "supervisor.state_changed" and event["state"] in ("completed", "failed"):
                body = await client.call("supervisor.get", {"supervisor_id": mine})
                reason = f" ({body['error_message']})" if body.get("error_message") else ""
                console.print(
                    f"\nsupervisor {body['state']}{reason}: phase {body['phase']}, "
                    f"{len(body['tasks'])} tasks, {body['progress']}%"
                )
                return 0 if body["state"] == "completed" else 1
    return 1
