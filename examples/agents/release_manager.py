#!/usr/bin/env python3
"""A release manager agent for an imaginary project, "lumen": a makima example.

Run under makima (``makima start release -- python examples/agents/release_manager.py``),
it goes through three phases:

1. **checks** - spawns the release checks as makima tasks (lint, unit tests,
   changelog, licence audit; ``--checks N`` picks the first N), waits for them
   with ``wait_tasks`` and reports activity and progress as they finish.
2. **decision** - asks a person "Ship release X?" with the choices ship/hold
   and a context summarising the check results, and waits for the answer.
3. **release** - on "ship", spawns a "publish" task; on "hold", holds. Then
   sends ``done`` with a result dict.

What it shows:

- the ``makima.sdk`` API: ``phase``, ``activity``, ``message``, ``spawn``,
  ``wait_tasks``, ``ask``, ``checkpoint``, ``done``/``fail``;
- durable progress: after each phase it saves a checkpoint. When makima
  restores it (daemon restart, agent crash), ``agent.checkpoint_data`` holds
  that checkpoint and the agent skips the phases already finished: it does not
  re-run the checks after a crash during the decision, and it does not ask
  again - the SDK's restoration-aware ``ask`` waits for the answer to the
  question that was still open (or returns the answer recorded but never
  delivered). A publish task that was started before a crash is found in the
  restored task list and not started twice.

Checkpoint data (``version`` ties it to one release; a checkpoint for another
version is ignored)::

    {"version": "1.0.0",
     "phases_done": ["checks", "decision"],
     "checks": [{"name": "lint", "status": "succeeded", "exit_code": 0,
                 "summary": "All checks passed"}, ...],
     "decision": "ship",                       # after "decision"
     "publish": {"task_id": ..., "status": "succeeded", "exit_code": 0}}  # after "release"

The check and publish tasks are tiny ``python -c`` programs that print a few
lines and exit at once; ``--fail-check NAME`` makes one of them fail, to see
the decision context flag it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import makima.sdk
from makima.sdk import Agent, TaskResult

PROJECT = "lumen"
QUESTION = "Ship release {version}?"
CHOICES = ("ship", "hold")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    title: str
    lines: tuple[str, ...]


CHECKS: tuple[Check, ...] = (
    Check("lint", "Lint", ("ruff: checking 87 files", "All checks passed")),
    Check(
        "unit-tests",
        "Unit tests",
        ("collected 214 items", "214 passed in 0.01s", "coverage 91%"),
    ),
    Check(
        "changelog",
        "Changelog",
        ("CHANGELOG.md: entry for {version} found", "3 features, 5 fixes"),
    ),
    Check("licences", "Licence audit", ("42 dependencies scanned", "no copyleft licences")),
)


def check_command(check: Check, version: str, *, fail: bool) -> list[str]:
    """A fast, real command for a check: prints its lines, exits 0 (or 1 when failing)."""
    lines = [line.format(version=version) for line in check.lines]
    if fail:
        lines.append(f"{check.title}: FAILED (simulated)")
    code = f"import sys\nfor line in {lines!r}:\n    print(line)\nsys.exit({1 if fail else 0})\n"
    return [sys.executable, "-c", code]


def publish_command(version: str) -> list[str]:
    artefacts = [f"{PROJECT}-{version}.tar.gz", f"{PROJECT}-{version}-py3-none-any.whl"]
    code = (
        f"for name in {artefacts!r}:\n"
        "    print('uploading', name, '... ok')\n"
        f"print('tagged v{version}; release published')\n"
    )
    return [sys.executable, "-c", code]


def summary_line(result: TaskResult) -> str:
    """The last line a task printed, as its one-line summary."""
    tail = (result.output_tail or "").strip().splitlines()
    return tail[-1] if tail else f"exit code {result.exit_code}"


def load_state(agent: Agent, version: str) -> dict[str, Any]:
    """The checkpoint to resume from, or a fresh one."""
    data = agent.checkpoint_data
    if isinstance(data, dict) and data.get("version") == version:
        return dict(data)
    return {"version": version, "phases_done": [], "checks": []}


def phase_done(state: dict[str, Any], phase: str) -> bool:
    done: list[str] = state.get("phases_done", [])
    return phase in done


async def finish_phase(agent: Agent, state: dict[str, Any], phase: str) -> None:
    state["phases_done"] = [*state.get("phases_done", []), phase]
    await agent.checkpoint(state)


async def run_checks(agent: Agent, state: dict[str, Any], count: int, failing: str | None) -> None:
    version = state["version"]
    checks = CHECKS[:count]
    await agent.phase("checks")
    await agent.activity(f"starting {len(checks)} release checks for {version}", progress=5)
    names: dict[str, str] = {}
    for check in checks:
        command = check_command(check, version, fail=check.name == failing)
        names[await agent.spawn(check.name, command)] = check.name
    await agent.activity(f"waiting for {len(checks)} checks", progress=10)
    results: dict[str, TaskResult] = {}
    while len(results) < len(names):
        finished = [r for r in await agent.wait_tasks() if r.task_id in names]
        if not finished:
            break  # nothing of ours is running any more
        for result in finished:
            results[names[result.task_id]] = result
        await agent.activity(
            f"{len(results)}/{len(names)} checks finished",
            progress=10 + 30 * len(results) // len(names),
        )
    state["checks"] = [
        {
            "name": check.name,
            "status": results[check.name].status if check.name in results else "unknown",
            "exit_code": results[check.name].exit_code if check.name in results else None,
            "summary": summary_line(results[check.name]) if check.name in results else "",
        }
        for check in checks
    ]
    await agent.message("assistant", {"checks": state["checks"]})
    await finish_phase(agent, state, "checks")


def decision_context(state: dict[str, Any]) -> str:
    checks: list[dict[str, Any]] = state["checks"]
    failed = [c["name"] for c in checks if c["status"] != "succeeded"]
    passed = len(checks) - len(failed)
    lines = [f"{PROJECT} {state['version']}: {passed}/{len(checks)} checks passed."]
    lines += [f"- {c['name']}: {c['status']} ({c['summary']})" for c in checks]
    if failed:
        lines.append(f"Failing: {', '.join(failed)}. Holding is recommended.")
    return "\n".join(lines)


async def decide(agent: Agent, state: dict[str, Any]) -> None:
    await agent.phase("decision")
    await agent.activity("waiting for a person to decide", progress=50)
    # After a restart this does not ask again: the SDK finds the open question
    # (or its undelivered answer) by its text and waits for that answer.
    answer = await agent.ask(
        QUESTION.format(version=state["version"]),
        choices=list(CHOICES),
        context=decision_context(state),
    )
    state["decision"] = answer
    await agent.message("user", {"decision": answer})
    await finish_phase(agent, state, "decision")


def previous_publish(agent: Agent) -> TaskResult | None:
    """A publish task started before a restart, if any (the latest one)."""
    found = [t for t in agent.tasks.values() if t.name == "publish"]
    return found[-1] if found else None


async def release(agent: Agent, state: dict[str, Any]) -> None:
    version = state["version"]
    await agent.phase("release")
    if state["decision"] != "ship":
        await agent.activity(f"holding {version}", progress=100)
        state["publish"] = None
        await finish_phase(agent, state, "release")
        return
    await agent.activity(f"publishing {version}", progress=70)
    earlier = previous_publish(agent)
    if earlier is not None and earlier.status in ("succeeded", "pending", "running"):
        task_id = earlier.task_id  # do not publish twice
    else:
        task_id = await agent.spawn("publish", publish_command(version))
    if not agent.tasks[task_id].finished:
        await agent.wait_tasks()
    result = agent.tasks[task_id]
    state["publish"] = {
        "task_id": task_id,
        "status": result.status,
        "exit_code": result.exit_code,
        "summary": summary_line(result) if result.finished else "",
    }
    await agent.activity(f"publish {result.status}", progress=100)
    await finish_phase(agent, state, "release")


async def release_manager(agent: Agent, args: argparse.Namespace) -> None:
    state = load_state(agent, args.version)
    if agent.restoration is not None:
        done_so_far = ", ".join(state["phases_done"]) or "nothing"
        await agent.activity(
            f"restored ({agent.restoration.source}); already done: {done_so_far}",
            progress=agent.restoration.progress,
        )
    if not phase_done(state, "checks"):
        await run_checks(agent, state, args.checks, args.fail_check)
    if not phase_done(state, "decision"):
        await decide(agent, state)
    if not phase_done(state, "release"):
        await release(agent, state)
    publish = state.get("publish")
    if publish is not None and publish["status"] != "succeeded":
        await agent.fail(f"publishing {state['version']} {publish['status']}: {publish['summary']}")
        return
    await agent.done(
        {
            "version": state["version"],
            "decision": state["decision"],
            "released": publish is not None,
            "checks": {c["name"]: c["status"] for c in state["checks"]},
            "publish": publish,
        }
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--version", default="1.0.0", help="the release to ship (default 1.0.0)")
    parser.add_argument(
        "--checks",
        type=int,
        default=3,
        choices=range(1, len(CHECKS) + 1),
        metavar="N",
        help=f"how many release checks to run, 1-{len(CHECKS)} (default 3)",
    )
    parser.add_argument(
        "--fail-check",
        choices=[c.name for c in CHECKS],
        help="make this check fail (to see the decision context flag it)",
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)

    async def entry(agent: Agent) -> None:
        await release_manager(agent, args)

    makima.sdk.run(entry)


if __name__ == "__main__":
    main()
