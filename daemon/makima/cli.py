"""The ``makima`` command.

Data goes to stdout, messages to stderr. Exit codes: 0 ok, 1 failure,
2 usage, 3 (``status`` only) no daemon answers. Tables on a terminal,
``--json`` on every read command, NDJSON from ``watch``.
"""

from __future__ import annotations

import json
import os
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click
import structlog
from rich.console import Console
from rich.table import Column, Table
from rich.text import Text

from makima import __version__, eventloop, logs
from makima.agents.claude.settings import ClaudeSettings, PermissionMode
from makima.cluster_drill import ClusterSettings
from makima.config import DaemonConfig, TaskRestartPolicy, client_socket_path
from makima.control.client import ControlClient, DaemonNotRunningError, RemoteError
from makima.drill import Check, DrillSettings
from makima.errors import InvalidValueError, MakimaError
from makima.fuzz import FuzzSettings
from makima.notify.command import notify_command
from makima.prompt import prompt_answer
from makima.resources import raise_open_files_limit
from makima.top.command import top_command

T = TypeVar("T")

DRILL_DEFAULTS = DrillSettings()
CLUSTER_DEFAULTS = ClusterSettings()
FUZZ_DEFAULTS = FuzzSettings()
EXIT_FAILURE = 1
EXIT_NO_DAEMON = 3

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

socket_option = click.option(
    "--socket",
    "socket_path",
    envvar="MAKIMA_SOCKET",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Control socket of the daemon (env MAKIMA_SOCKET).",
)
json_option = click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")


def fail(message: str, code: int = EXIT_FAILURE) -> NoReturn:
    err.print(f"makima: {message}", markup=False, highlight=False)
    sys.exit(code)


def resolve_socket(socket_path: Path | None) -> Path:
    if socket_path is not None:
        return socket_path
    return client_socket_path(os.environ, is_root=os.geteuid() == 0)


def run_client(
    socket_path: Path | None,
    action: Callable[[ControlClient], Awaitable[T]],
    *,
    no_daemon_code: int = EXIT_FAILURE,
    timeout: float = 30.0,
) -> T:
    path = resolve_socket(socket_path)
    logs.configure()  # stderr: stdout carries the command's output (tables, JSON, NDJSON)

    async def main() -> T:
        async with ControlClient.connect(path, timeout=timeout) as client:
            return await action(client)

    try:
        return eventloop.run(main)
    except DaemonNotRunningError as exc:
        fail(str(exc), no_daemon_code)
    except RemoteError as exc:
        fail(exc.message if hasattr(exc, "message") else str(exc))
    except MakimaError as exc:
        fail(str(exc))


def print_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, ensure_ascii=False))


async def resolve_id(client: ControlClient, text: str, kind: str) -> str:
    """A full UUID, or a unique prefix of a supervisor or question id."""
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    if kind == "supervisor":
        rows = (await client.call("supervisor.list", {"all": True}))["supervisors"]
        ids = [r["supervisor_id"] for r in rows]
    else:
        rows = (await client.call("question.list"))["questions"]
        ids = [r["question_id"] for r in rows]
    matches = [str(i) for i in ids if str(i).startswith(text.lower())]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        if kind == "question":
            raise MakimaError(
                f"no open question id starts with {text!r} (`makima questions` lists them;"
                " an answered one is no longer open)"
            )
        raise MakimaError(f"no {kind} id starts with {text!r}")
    raise MakimaError(f"{text!r} matches {len(matches)} {kind}s; give more characters")


def short(value: str | None) -> str:
    return (value or "")[:8]


def cell(value: object) -> Text:
    """A table cell shown as it is: names, questions and activities are data, not markup."""
    return Text("" if value is None else str(value))


def line(value: object) -> Text:
    """A listing cell: data as it is, on one line, cut with an ellipsis when too long."""
    return Text("" if value is None else str(value), no_wrap=True, overflow="ellipsis")


def key(header: str, *, right: bool = False, width: int | None = None) -> Column:
    """A listing column not cut: ids, states, numbers (``width``: what it must keep)."""
    return Column(header, no_wrap=True, justify="right" if right else "left", min_width=width)


def free(header: str, *, max_width: int | None = None) -> Column:
    """A listing column of free text (cells made with :func:`line`), the one to shrink."""
    return Column(header, overflow="ellipsis", max_width=max_width)


WIDE = 100
"""Terminal columns from which ``ls`` also shows phase and restoration count (piped
output always has them)."""


def listing(*columns: Column) -> Table:
    """Rows to scan, one line each, at any terminal width: ids and states are whole,
    free text is cut (``show`` and ``--json`` have all of it)."""
    return Table(*columns, box=None, pad_edge=False, padding=(0, 1), header_style="bold")


# --------------------------------------------------------------------------- group


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="makima")
def main() -> None:
    """makima: a durable supervisor daemon for AI agents."""


main.add_command(notify_command)
main.add_command(top_command)


# --------------------------------------------------------------------------- daemon


@main.command()
@click.option(
    "--state-dir",
    envvar="MAKIMA_STATE_DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Where makima keeps its data (env MAKIMA_STATE_DIR).",
)
@click.option(
    "--database-url",
    envvar="MAKIMA_DATABASE_URL",
    help="PostgreSQL URL (env MAKIMA_DATABASE_URL); none runs the embedded database.",
)
@socket_option
@click.option("--heartbeat-interval", type=float, default=5.0, show_default=True)
@click.option(
    "--task-restart-policy",
    type=click.Choice([p.value for p in TaskRestartPolicy]),
    default=TaskRestartPolicy.INTERRUPT.value,
    show_default=True,
    help="What happens to tasks that were running when the daemon or an agent stopped.",
)
@click.option("--agent-restart-limit", type=click.IntRange(min=0), default=5, show_default=True)
@click.option(
    "--agent-restart-window",
    type=click.FloatRange(min=0, min_open=True),
    default=300.0,
    show_default=True,
)
@click.option(
    "--max-connections",
    envvar="MAKIMA_MAX_CONNECTIONS",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Control connections served at once; more are refused (env MAKIMA_MAX_CONNECTIONS).",
)
@click.option(
    "--lease-ttl",
    envvar="MAKIMA_LEASE_TTL",
    type=click.FloatRange(min=0, min_open=True),
    default=15.0,
    show_default=True,
    help="Seconds a daemon's lease lasts without renewal; past it, peers take its "
    "supervisors over (env MAKIMA_LEASE_TTL).",
)
@click.option(
    "--lease-renew",
    envvar="MAKIMA_LEASE_RENEW",
    type=click.FloatRange(min=0, min_open=True),
    default=5.0,
    show_default=True,
    help="Seconds between lease renewals (env MAKIMA_LEASE_RENEW).",
)
@click.option(
    "--handover/--no-handover",
    envvar="MAKIMA_HANDOVER",
    default=True,
    show_default=True,
    help="On SIGTERM with live peers, release the lease so that they take the supervisors "
    "over at once (env MAKIMA_HANDOVER).",
)
def daemon(
    state_dir: Path | None,
    database_url: str | None,
    socket_path: Path | None,
    heartbeat_interval: float,
    task_restart_policy: str,
    agent_restart_limit: int,
    agent_restart_window: float,
    max_connections: int,
    lease_ttl: float,
    lease_renew: float,
    handover: bool,
) -> None:
    """Run the daemon in the foreground (what systemd runs)."""
    from makima.daemon import Daemon
    from makima.faults import FaultHook
    from makima.systemd import Notifier, listen_fds

    logs.configure()
    try:
        config = DaemonConfig.resolve(
            state_dir=state_dir,
            socket=socket_path,
            database_url=database_url,
            heartbeat_interval=heartbeat_interval,
            task_restart_policy=TaskRestartPolicy(task_restart_policy),
            agent_restart_limit=agent_restart_limit,
            agent_restart_window=agent_restart_window,
            max_connections=max_connections,
            lease_ttl=lease_ttl,
            lease_renew=lease_renew,
            handover=handover,
        )
        files = raise_open_files_limit()
        structlog.get_logger("makima.daemon").info(
            "daemon.open_files_limit", before=files.before, now=files.after, hard=files.hard
        )
        sockets = listen_fds()
        the_daemon = Daemon(
            config,
            notifier=Notifier(),
            listen_socket=sockets[0] if sockets else None,
            faults=FaultHook.from_env(),
        )
        eventloop.run(the_daemon.run)
    except MakimaError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        sys.exit(0)


def _progress(label: str, as_json: bool) -> Any:
    """A drill's progress line on stderr (none with --json)."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(
        TextColumn(f"[bold]{label}[/bold]"),
        BarColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=err,
        transient=False,
        disable=as_json,
    )


# --------------------------------------------------------------------------- supervisors


def _parse_env(pairs: Sequence[str]) -> dict[str, str]:
    env: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("name")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.option("--goal", default="", help="What the agent should achieve.")
@click.option(
    "--claude",
    "claude_goal",
    metavar="GOAL",
    help="Run Claude Code on GOAL instead of a command (needs makima[claude]).",
)
@click.option("--model", help="With --claude: the model Claude Code uses.")
@click.option(
    "--permission-mode",
    type=click.Choice([m.value for m in PermissionMode]),
    help="With --claude: what Claude Code may do without asking (default: ask).",
)
@click.option(
    "--allow-tool",
    "allow_tools",
    multiple=True,
    metavar="TOOL",
    help="With --claude: a tool (or rule such as 'Bash(git status)') allowed without asking.",
)
@click.option("--max-turns", type=click.IntRange(1, 10_000), help="With --claude: a turn limit.")
@click.option(
    "--cwd",
    type=click.Path(file_okay=False),
    help="Working directory of the agent (default: the current directory).",
)
@click.option("--env", "env_pairs", multiple=True, metavar="KEY=VALUE", help="Extra environment.")
@socket_option
def start(
    name: str,
    command: tuple[str, ...],
    goal: str,
    claude_goal: str | None,
    model: str | None,
    permission_mode: str | None,
    allow_tools: tuple[str, ...],
    max_turns: int | None,
    cwd: str | None,
    env_pairs: tuple[str, ...],
    socket_path: Path | None,
) -> None:
    """Start a supervisor running COMMAND, or Claude Code on a goal.

    \b
      makima start NAME -- CMD ARGS...
      makima start NAME --claude "GOAL" [--permission-mode ask|accept-edits|allow-all]
    """
    env = _parse_env(env_pairs)
    params: dict[str, Any] = {"name": name, "goal": goal, "env": env}
    claude_only = {
        "--model": model,
        "--permission-mode": permission_mode,
        "--allow-tool": allow_tools or None,
        "--max-turns": max_turns,
    }
    if claude_goal is not None:
        if command:
            raise click.UsageError("give either --claude GOAL or a COMMAND, not both")
        if goal:
            raise click.UsageError("with --claude, GOAL is the goal: leave out --goal")
        try:
            settings = ClaudeSettings(
                model=model,
                permission_mode=PermissionMode(permission_mode or PermissionMode.ASK),
                allow_tools=allow_tools,
                max_turns=max_turns,
            )
        except InvalidValueError as exc:
            raise click.UsageError(str(exc)) from None
        params["goal"] = claude_goal
        params["claude"] = settings.to_params()
    else:
        given = [flag for flag, value in claude_only.items() if value is not None]
        if given:
            raise click.UsageError(f"{given[0]} goes with --claude GOAL")
        if not command:
            raise click.UsageError("give the agent's COMMAND (after --) or --claude GOAL")
        params["command"] = list(command)
    # Relative paths in the command mean what they mean where it was typed.
    params["cwd"] = os.path.abspath(cwd if cwd is not None else os.curdir)
    result = run_client(socket_path, lambda c: c.call("supervisor.create", params))
    click.echo(result["supervisor_id"])


@main.command(name="ls")
@click.option("--all", "show_all", is_flag=True, help="Include completed and failed supervisors.")
@json_option
@socket_option
def list_command(show_all: bool, as_json: bool, socket_path: Path | None) -> None:
    """List supervisors."""
    result = run_client(socket_path, lambda c: c.call("supervisor.list", {"all": show_all}))
    rows = result["supervisors"]
    if as_json:
        print_json(rows)
        return
    if not rows:
        err.print("no supervisors" + ("" if show_all else " (unfinished; --all for every one)"))
        return
    # Narrow terminals get the columns to act on; show and --json have the rest.
    wide = not out.is_terminal or out.width >= WIDE
    columns = [
        key("id", width=8),
        free("name", max_width=24),
        key("state", width=max(len(r["state"]) for r in rows)),
        *([free("phase", max_width=16)] if wide else []),
        key("progress", right=True),
        key("questions", right=True),
        *([key("restored", right=True)] if wide else []),
        free("activity"),
    ]
    table = listing(*columns)
    for r in rows:
        cells = [
            short(r["supervisor_id"]),
            line(r["name"]),
            r["state"],
            *([line(r["phase"])] if wide else []),
            f"{r['progress']}%",
            str(r["pending_questions"]),
            *([str(r["restoration_count"])] if wide else []),
            line(r["current_activity"] or r.get("error_message")),
        ]
        table.add_row(*cells)
    out.print(table)


@main.command()
@click.argument("supervisor")
@json_option
@socket_option
def show(supervisor: str, as_json: bool, socket_path: Path | None) -> None:
    """Show one supervisor (id or unique id prefix)."""

    async def action(client: ControlClient) -> Any:
        sid = await resolve_id(client, supervisor, "supervisor")
        return await client.call("supervisor.get", {"supervisor_id": sid})

    body = run_client(socket_path, action)
    if as_json:
        print_json(body)
        return
    table = Table.grid(padding=(0, 2))
    for field in (
        "supervisor_id",
        "name",
        "goal",
        "state",
        "phase",
        "progress",
        "current_activity",
        "error_message",
        "restoration_count",
        "restoration_source",
        "last_restored_at",
        "last_heartbeat",
        "created_at",
    ):
        table.add_row(field, cell(body.get(field)))
    out.print(table)
    if body.get("result") is not None:
        out.print("\nresult:")
        out.print(json.dumps(body["result"], indent=2, ensure_ascii=False), markup=False)
    if body.get("pending_questions"):
        out.print("\nopen questions:")
        for q in body["pending_questions"]:
            choices = f"  [{' / '.join(q['choices'])}]" if q["choices"] else ""
            out.print(f"  {short(q['id'])}  {q['question']}{choices}", markup=False)
    if body.get("tasks"):
        tasks = listing(
            key("task", width=8),
            free("name"),
            key("status"),
            key("exit", right=True),
            key("attempts", right=True),
        )
        for t in body["tasks"]:
            code = "" if t["exit_code"] is None else str(t["exit_code"])
            tasks.add_row(
                short(t["task_id"]), line(t["name"]), t["status"], code, str(t["attempts"])
            )
        out.print()
        out.print(tasks)


@main.command()
@click.argument("supervisor")
@json_option
@socket_option
def resume(supervisor: str, as_json: bool, socket_path: Path | None) -> None:
    """Restore a supervisor now and restart its agent with the restoration context."""

    async def action(client: ControlClient) -> Any:
        sid = await resolve_id(client, supervisor, "supervisor")
        return await client.call("supervisor.resume", {"supervisor_id": sid})

    info = run_client(socket_path, action, timeout=120.0)
    if as_json:
        print_json(info)
        return
    validation = info["validation"]
    verdict = (
        "valid"
        if validation["valid"]
        else f"{validation['action']}: " + "; ".join(validation["issues"])
    )
    out.print(
        f"resumed {info['supervisor_id']} (restoration {info['restoration_count']}, {verdict})",
        markup=False,
    )
    if info["redelivered_question_ids"]:
        out.print(f"re-delivered {len(info['redelivered_question_ids'])} open question(s)")
    out.print(info["context_message"], markup=False, highlight=False)


@main.command()
@click.argument("supervisor")
@socket_option
def cancel(supervisor: str, socket_path: Path | None) -> None:
    """Cancel a supervisor: its agent and tasks are stopped, its state becomes failed."""

    async def action(client: ControlClient) -> Any:
        sid = await resolve_id(client, supervisor, "supervisor")
        return await client.call("supervisor.cancel", {"supervisor_id": sid})

    result = run_client(socket_path, action)
    err.print(f"cancelled {result['supervisor_id']}: {result['state']}", markup=False)


@main.command()
@click.argument("supervisor")
@click.option("--limit", type=click.IntRange(min=1), help="Only the last N messages.")
@click.option(
    "--before", type=click.IntRange(min=1), help="Only messages older than this seq (paging)."
)
@json_option
@socket_option
def history(
    supervisor: str, limit: int | None, before: int | None, as_json: bool, socket_path: Path | None
) -> None:
    """Show a supervisor's conversation history (the newest that fit one reply)."""

    async def action(client: ControlClient) -> Any:
        sid = await resolve_id(client, supervisor, "supervisor")
        params: dict[str, Any] = {"supervisor_id": sid}
        if limit is not None:
            params["limit"] = limit
        if before is not None:
            params["before"] = before
        return await client.call("supervisor.history", params)

    result = run_client(socket_path, action)
    messages = result["messages"]
    if as_json:
        print_json(messages)
    else:
        if not messages:
            err.print("no messages")
        for m in messages:
            content = m["content"] if isinstance(m["content"], str) else json.dumps(m["content"])
            out.print(Text.assemble((f"{m['seq']:>4} {m['role']}", "bold"), "  ", content))
    if result.get("more") and messages:
        err.print(f"older messages not shown: add --before {messages[0]['seq']}")


# --------------------------------------------------------------------------- questions


@main.command()
@click.option("--supervisor", help="Only this supervisor's questions.")
@json_option
@socket_option
def questions(supervisor: str | None, as_json: bool, socket_path: Path | None) -> None:
    """List the questions waiting for an answer."""

    async def action(client: ControlClient) -> Any:
        params: dict[str, Any] = {}
        if supervisor:
            params["supervisor_id"] = await resolve_id(client, supervisor, "supervisor")
        return await client.call("question.list", params)

    listed = run_client(socket_path, action)
    rows = listed["questions"]
    if listed.get("omitted"):
        err.print(
            f"{listed['omitted']} newer open questions are not shown (one reply holds at most "
            "1 MiB): answer these first, or narrow with --supervisor",
            markup=False,
        )
    if as_json:
        print_json(rows)
        return
    if not rows:
        err.print("no open questions")
        return
    table = listing(
        key("question", width=8),
        key("supervisor", width=8),
        key("asked", width=8),
        free("question text"),
        free("choices", max_width=30),
    )
    for q in rows:
        table.add_row(
            short(q["question_id"]),
            short(q["supervisor_id"]),
            q["asked_at"][11:19],
            line(q["question"]),
            line(" / ".join(q["choices"]) or "(free text)"),
        )
    out.print(table)


@main.command()
@click.argument("question")
@click.argument("text", required=False)
@socket_option
def answer(question: str, text: str | None, socket_path: Path | None) -> None:
    """Answer a question (id or unique prefix). Without TEXT, prompts on a terminal."""
    if text is None and not sys.stdin.isatty():
        raise click.UsageError("give the answer TEXT (stdin is not a terminal to prompt on)")
    target = question
    if text is None:
        # Look the question up, then prompt with no connection open and no event loop
        # running: a person may take their time, and Ctrl-C at the prompt must end it.
        async def lookup(client: ControlClient) -> dict[str, Any]:
            qid = await resolve_id(client, question, "question")
            rows = (await client.call("question.list"))["questions"]
            found: dict[str, Any] | None = next((q for q in rows if q["question_id"] == qid), None)
            if found is None:
                raise MakimaError(f"question {qid} is not open")
            return found

        found = run_client(socket_path, lookup)
        target = found["question_id"]
        text = prompt_answer(found)
    answer_text = text

    async def action(client: ControlClient) -> Any:
        qid = await resolve_id(client, target, "question")
        return await client.call("question.answer", {"question_id": qid, "answer": answer_text})

    result = run_client(socket_path, action)
    err.print(f"answered {result['question_id']}: {result['answer']}", markup=False)


# --------------------------------------------------------------------------- watch, status


@main.command()
@click.option("--kind", "kinds", multiple=True, help="Only these event kinds (repeatable).")
@socket_option
def watch(kinds: tuple[str, ...], socket_path: Path | None) -> None:
    """Print events as they happen, one JSON object per line (NDJSON)."""

    async def action(client: ControlClient) -> None:
        async with client.events(list(kinds) or None) as events:
            async for event in events:
                click.echo(json.dumps(event, ensure_ascii=False))

    try:
        run_client(socket_path, action, timeout=60.0)
    except KeyboardInterrupt:
        sys.exit(0)


@main.command()
@json_option
@socket_option
def status(as_json: bool, socket_path: Path | None) -> None:
    """Show the daemon's status (exit 3 when no daemon answers)."""
    result = run_client(
        socket_path, lambda c: c.call("daemon.status"), no_daemon_code=EXIT_NO_DAEMON
    )
    if as_json:
        print_json(result)
        return
    grid = Table.grid(padding=(0, 2))
    grid.add_row(
        "daemon", f"{result['daemon_id']} (pid {result['pid']}, version {result['version']})"
    )
    grid.add_row("started", result["started_at"])
    grid.add_row("database", "embedded" if result["database"]["embedded"] else "external URL")
    grid.add_row("agents running", str(result["running_agents"]))
    if result.get("agents_starting"):
        grid.add_row("agents starting", str(result["agents_starting"]))
    grid.add_row("open questions", str(result["pending_questions"]))
    counts = ", ".join(f"{k} {v}" for k, v in result["supervisors"].items() if v)
    grid.add_row("supervisors", counts or "none")
    cluster = result.get("cluster") or {}
    lease = cluster.get("lease")
    if lease:
        held = "held" if lease["valid"] else "LOST (agents stopped until it is renewed)"
        grid.add_row(
            "lease",
            f"{held}; TTL {lease['ttl']:g}s, renewed every {lease['renew']:g}s"
            if lease["enforced"]
            else "not needed (embedded database: no other daemon can share it)",
        )
    out.print(grid)
    daemons = cluster.get("daemons") or []
    if lease and lease["enforced"] and daemons:
        table = listing(
            key("daemon"),
            free("host", max_width=24),
            key("pid", right=True),
            key("alive"),
            key("age", right=True),
            key("renewed", right=True),
            key("supervisors", right=True),
        )
        for d in daemons:
            table.add_row(
                cell(short(d["daemon_id"]) + (" (this)" if d["self"] else "")),
                cell(d["host"]),
                cell(d["pid"]),
                cell("yes" if d["alive"] else ("released" if d["released_at"] else "no")),
                cell(_ago(d["age_s"])),
                cell(_ago(d["renewed_s_ago"]) + " ago"),
                cell(d["supervisors"]),
            )
        out.print(table)
    report = result.get("last_startup_report")
    if report:
        summary = ", ".join(f"{k} {v}" for k, v in report["counts"].items())
        out.print(f"last startup: {summary}")
        for outcome in ("repaired", "reverted", "fresh", "failed"):
            for entry in report.get(outcome, []):
                issues = "; ".join(entry["issues"])
                out.print(
                    f"  {outcome}: {entry['name']} ({short(entry['supervisor_id'])}) {issues}",
                    markup=False,
                )


def _ago(seconds: float) -> str:
    """A duration the way a person reads it: 4s, 3m, 2h, 5d."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{int(seconds // size)}{unit}"
    return f"{max(0, int(seconds))}s"


# --------------------------------------------------------------------------- demo, drill


@main.command()
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="State directory for the demo (default: a 'demo' folder in makima's state dir).",
)
@click.option("--answer", "preset", help="Answer the agent's question with this, without asking.")
@click.option("--timeout", type=float, default=180.0, show_default=True)
@click.option(
    "--claude",
    is_flag=True,
    help="Run Claude Code on a small goal instead (needs makima[claude] and an API key).",
)
def demo(state_dir: Path | None, preset: str | None, timeout: float, claude: bool) -> None:
    """Run the daemon on the embedded database with the example release agent."""
    from makima.demo import run_demo

    try:
        code = eventloop.run(run_demo, state_dir, preset, timeout, claude)
    except MakimaError as exc:
        fail(str(exc))
    sys.exit(code)


@main.command()
@click.option(
    "--agents",
    type=click.IntRange(1, 50),
    default=DRILL_DEFAULTS.agents,
    show_default=True,
    help="Supervisors running at once.",
)
@click.option(
    "--kills",
    type=click.IntRange(0, 1000),
    default=DRILL_DEFAULTS.kills,
    show_default=True,
    help="How many times the daemon is killed with SIGKILL.",
)
@click.option("--seed", type=int, help="Random seed (printed, to repeat a run).")
@click.option("--database-url", help="Use this PostgreSQL instead of an embedded one.")
@click.option(
    "--scratch",
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep the drill's files here (default: a temporary directory).",
)
@click.option(
    "--fuzz",
    "fuzz_frames",
    type=click.IntRange(min=1),
    is_flag=False,
    flag_value=FUZZ_DEFAULTS.frames,
    default=None,
    metavar="[N]",
    help=(
        "Fuzz instead of killing: N hostile control frames (default "
        f"{FUZZ_DEFAULTS.frames}), hostile agent lines and stalled clients against the daemon;"
        " checks that it answers, loses nothing acknowledged and keeps its RSS bounded."
    ),
)
@click.option(
    "--daemons",
    type=click.IntRange(1, 16),
    default=1,
    show_default=True,
    help=(
        "2 or more: the cluster drill instead - that many daemons on one PostgreSQL, each in"
        " turn killed, paused past its lease and cut from its lease connection."
    ),
)
@click.option(
    "--supervisors",
    type=click.IntRange(1, 1000),
    default=CLUSTER_DEFAULTS.supervisors,
    show_default=True,
    help="Cluster drill: supervisors spread over the daemons.",
)
@click.option(
    "--lease-ttl",
    type=click.FloatRange(min=0.5),
    default=CLUSTER_DEFAULTS.lease_ttl,
    show_default=True,
    help="Cluster drill: the daemons' lease TTL, seconds.",
)
@click.option(
    "--lease-renew",
    type=click.FloatRange(min=0.1),
    default=CLUSTER_DEFAULTS.lease_renew,
    show_default=True,
    help="Cluster drill: the daemons' lease renewal interval, seconds.",
)
@click.option(
    "--rounds",
    type=click.IntRange(1, 100),
    default=CLUSTER_DEFAULTS.rounds,
    show_default=True,
    help="Cluster drill: how many times the three scenarios are played.",
)
@json_option
def drill(
    agents: int,
    kills: int,
    seed: int | None,
    database_url: str | None,
    scratch: Path | None,
    fuzz_frames: int | None,
    daemons: int,
    supervisors: int,
    lease_ttl: float,
    lease_renew: float,
    rounds: int,
    as_json: bool,
) -> None:
    """Crash-and-restart drill on a scratch state dir; exits 1 on any violation.

    With --fuzz, a fuzz drill instead: hostile input, then the figures (frames,
    replies by code, crashes, hangs, RSS before, during and after). With
    --daemons N (N >= 2), the cluster drill: N daemons sharing one PostgreSQL,
    takeovers after kill -9, a pause past the lease and a lost lease connection.
    """

    from makima.drill import DrillProgress, run_drill

    logs.configure(level="warning")
    if fuzz_frames is not None:
        fuzz_drill(
            fuzz_frames, seed=seed, database_url=database_url, scratch=scratch, as_json=as_json
        )
    if daemons >= 2:
        if lease_renew > lease_ttl / 2:
            raise click.BadParameter(
                f"{lease_renew:g} is more than half --lease-ttl ({lease_ttl:g})",
                param_hint="--lease-renew",
            )
        cluster_drill(
            ClusterSettings(
                daemons=daemons,
                supervisors=supervisors,
                lease_ttl=lease_ttl,
                lease_renew=lease_renew,
                rounds=rounds,
                seed=seed,
                database_url=database_url,
                scratch=scratch,
            ),
            as_json=as_json,
        )
    settings = DrillSettings(
        agents=agents, kills=kills, seed=seed, database_url=database_url, scratch=scratch
    )
    progress = _progress("drill", as_json)
    task = progress.add_task("starting", total=max(kills, 1))

    def show(state: DrillProgress) -> None:
        progress.update(
            task,
            completed=state.kills_done,
            description=(
                f"kills {state.kills_done}/{state.kills_planned} · supervisors "
                f"{state.finished}/{state.created} done · {state.questions_answered} answers · "
                f"{state.phase}"
            ),
        )

    try:
        with progress:
            report = eventloop.run(run_drill, settings, show)
    except MakimaError as exc:
        fail(str(exc))
    if as_json:
        print_json(
            {
                "ok": report.ok,
                "seed": report.seed,
                "kills_survived": report.kills_survived,
                "supervisors": report.supervisors,
                "questions": report.questions,
                "answers": report.answers,
                "tasks": report.tasks,
                "seconds": round(report.seconds, 1),
                "checks": [{"name": c.name, "ok": c.ok, "detail": c.detail} for c in report.checks],
            }
        )
    else:
        out.print(_checks_table("makima drill", report.checks))
        out.print(
            f"{report.kills_survived} kills survived, {report.supervisors} supervisors, "
            f"{report.questions} questions, {report.answers} answers, {report.tasks} tasks "
            f"in {report.seconds:.0f}s (seed {report.seed})"
        )
        if not report.ok:
            out.print(f"files kept in {report.scratch}", markup=False)
    sys.exit(0 if report.ok else EXIT_FAILURE)


def _checks_table(title: str, checks: Sequence[Check]) -> Table:
    """A drill's checks: each ok or VIOLATED, with its detail."""
    table = Table("check", "result", "detail", title=title)
    for c in checks:
        table.add_row(
            cell(c.name), Text("ok", "green") if c.ok else Text("VIOLATED", "red"), cell(c.detail)
        )
    return table


def cluster_drill(settings: ClusterSettings, *, as_json: bool) -> NoReturn:
    """``makima drill --daemons N``: run makima.cluster_drill, print its checks and takeovers."""

    from makima.cluster_drill import ClusterProgress, run_cluster_drill

    progress = _progress("cluster drill", as_json)
    task = progress.add_task("starting", total=max(settings.rounds * len(settings.scenarios), 1))

    def show(state: ClusterProgress) -> None:
        progress.update(
            task,
            completed=state.steps_done,
            description=(
                f"supervisors {state.finished}/{state.created} done · {state.answers} answers"
                f" · {state.phase}"
            ),
        )

    try:
        with progress:
            report = eventloop.run(run_cluster_drill, settings, show)
    except MakimaError as exc:
        fail(str(exc))
    if as_json:
        print_json(report.to_json())
        sys.exit(0 if report.ok else EXIT_FAILURE)
    out.print(_checks_table(f"makima drill --daemons {report.daemons}", report.checks))
    takeovers = Table(
        "scenario",
        "resumed",
        "restored: median / worst",
        "agent started: median / worst",
        "limit",
        title="takeovers (seconds after the kill, pause or cut)",
    )

    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}s"

    for row in report.takeover_rows():
        takeovers.add_row(
            row.scenario,
            str(row.resumed),
            f"{seconds(row.restored.median)} / {seconds(row.restored.worst)}",
            f"{seconds(row.started.median)} / {seconds(row.started.worst)}",
            f"{row.limit:g}s",
        )
    out.print(takeovers)
    for line in report.notes:
        err.print(f"note: {line}", markup=False, highlight=False)
    out.print(
        f"{report.daemons} daemons, {report.supervisors} supervisors, {report.processes} agent "
        f"processes, {report.questions} questions, {report.answers} answers "
        f"({' / '.join(map(str, report.answers_by_daemon))} by daemon), {report.tasks} tasks "
        f"in {report.seconds:.0f}s (seed {report.seed})",
        markup=False,
        highlight=False,
    )
    if not report.ok:
        out.print(f"files kept in {report.scratch}", markup=False)
    sys.exit(0 if report.ok else EXIT_FAILURE)


def fuzz_drill(
    frames: int, *, seed: int | None, database_url: str | None, scratch: Path | None, as_json: bool
) -> NoReturn:
    """``makima drill --fuzz``: run makima.fuzz against a scratch daemon, print the figures."""

    from makima.fuzz import FuzzReport, mib, run_fuzz_drill

    settings = FuzzSettings(frames=frames, seed=seed)
    progress = _progress("fuzz", as_json)
    task = progress.add_task("starting", total=frames)

    def show(report: FuzzReport) -> None:
        progress.update(
            task,
            completed=report.frames,
            description=(
                f"{report.frames}/{frames} frames · {report.agent_lines} agent lines · "
                f"{report.crashes} crashes · {report.hangs} hangs"
            ),
        )

    async def main() -> FuzzReport:
        return await run_fuzz_drill(
            settings, database_url=database_url, scratch=scratch, progress=show
        )

    try:
        with progress:
            report = eventloop.run(main)
    except MakimaError as exc:
        fail(str(exc))
    if as_json:
        print_json(report.to_json())
        sys.exit(0 if report.ok else EXIT_FAILURE)

    figures = Table("figure", "value", title="makima drill --fuzz")
    figures.add_row("control frames", str(report.frames))
    for name, count in sorted(report.replies.items()):
        figures.add_row(f"  replies: {name}", str(count))
    figures.add_row("agent lines", str(report.agent_lines))
    for name, count in sorted(report.agent_replies.items()):
        figures.add_row(f"  replies: {name}", str(count))
    figures.add_row("crashes", str(report.crashes))
    figures.add_row("hangs", str(report.hangs))
    figures.add_row(
        "RSS before / max during / after",
        " / ".join(mib(v) for v in (report.rss_before, report.rss_max, report.rss_after)),
    )
    out.print(figures)
    checks = Table("check", "result", "detail", title="checks")
    for c in report.checks():
        checks.add_row(
            cell(c.name), Text("ok", "green") if c.ok else Text("VIOLATED", "red"), cell(c.detail)
        )
    out.print(checks)
    out.print(f"{report.frames} frames in {report.seconds:.0f}s (seed {report.seed})")
    if not report.ok:
        for name, examples in report.problems.items():
            out.print(f"{name}:", markup=False)
            for example in examples:
                out.print(f"  {example}", markup=False, highlight=False)
        out.print(f"files kept in {report.scratch}", markup=False)
    sys.exit(0 if report.ok else EXIT_FAILURE)
