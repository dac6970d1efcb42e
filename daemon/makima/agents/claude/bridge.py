"""makima's side of a Claude Code session: its tools, its permission prompts, its answers.

Claude reaches makima through an in-process MCP server named ``makima``
(:func:`mcp_server`), so it sees the tools as ``mcp__makima__<tool>``. A tool
call Claude Code wants permission for becomes a makima question
(:meth:`Bridge.can_use_tool`).

Questions still open from before a restart are the bridge's to deliver,
each answer exactly once (:mod:`makima.sdk` hands them over through
``take_restored_questions``): if Claude asks the same question again (the
same text through ``ask_user``, or the same tool call needing permission),
the answer becomes that call's result; if not, it is sent to Claude as a
message once it arrives (:attr:`Bridge.outbox`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import anyio
import structlog
from anyio.abc import TaskGroup
from claude_agent_sdk import (
    PermissionResultAllow,
    PermissionResultDeny,
    SdkMcpTool,
    ToolPermissionContext,
    create_sdk_mcp_server,
    tool,
)
from claude_agent_sdk.types import McpSdkServerConfig, PermissionResult

from makima.agents.claude import prompts
from makima.agents.claude.settings import ClaudeSettings, PermissionMode
from makima.sdk import Agent, AgentError, OpenQuestion

log = structlog.get_logger("makima.agents.claude")

SERVER_NAME: Final = "makima"
ALLOW: Final = "allow"
DENY: Final = "deny"
TOOL_NAMES: Final = (
    "ask_user",
    "spawn_task",
    "wait_tasks",
    "set_phase",
    "report_progress",
    "done",
    "fail",
)
OWN_TOOLS: Final = tuple(f"{prompts.TOOL_PREFIX}{name}" for name in TOOL_NAMES)


class ToolInputError(ValueError):
    """A tool's input does not have the shape its schema asks for."""


@dataclass(slots=True)
class _Restored:
    question: OpenQuestion
    claimed: anyio.Event = field(default_factory=anyio.Event)
    answer: str | None = None
    answered: anyio.Event = field(default_factory=anyio.Event)


@dataclass(frozen=True, slots=True)
class Finish:
    """Claude asked to finish: ``done`` with a result, or ``fail`` with an error."""

    failed: bool
    result: Any = None
    error: str = ""


class Bridge:
    def __init__(self, agent: Agent, settings: ClaudeSettings) -> None:
        self.agent = agent
        self.settings = settings
        self.finish: Finish | None = None
        self.finish_requested = anyio.Event()
        self._restored: list[_Restored] = []
        self._decided: dict[str, str] = {}  # permission question text -> answer sent as a message
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        self._outbox_send = send
        self.outbox = receive
        """Messages for Claude that wait for the current turn to end."""

    # ------------------------------------------------------------------ restored questions

    def adopt_restored(self, task_group: TaskGroup) -> None:
        """Take the open questions of before the restart and wait for their answers."""
        for question in self.agent.take_restored_questions():
            entry = _Restored(question)
            self._restored.append(entry)
            task_group.start_soon(self._await_restored, entry)

    @property
    def waiting_for_answers(self) -> bool:
        """True while a restored question's answer has yet to reach Claude."""
        return any(entry.answer is None for entry in self._restored)

    async def _await_restored(self, entry: _Restored) -> None:
        answer = await self.agent.wait_answer(entry.question.question_id)
        entry.answer = answer
        entry.answered.set()
        if entry.claimed.is_set():
            return  # the call that claimed it returns the answer
        self._restored.remove(entry)
        if entry.question.choices == (ALLOW, DENY):
            self._decided[entry.question.question] = answer
        log.info("claude.answer_relayed", question_id=entry.question.question_id)
        self._outbox_send.send_nowait(
            prompts.answer_message(entry.question.question_id, entry.question.question, answer)
        )

    async def _claimed_answer(self, question: str) -> str | None:
        for entry in self._restored:
            if entry.question.question == question and not entry.claimed.is_set():
                entry.claimed.set()
                self._restored.remove(entry)
                log.info("claude.question_reclaimed", question_id=entry.question.question_id)
                await entry.answered.wait()
                assert entry.answer is not None
                return entry.answer
        return None

    async def ask(
        self, question: str, choices: list[str] | None = None, context: str | None = None
    ) -> str:
        """Ask a person, unless the same question is still open from before a restart."""
        restored = await self._claimed_answer(question)
        if restored is not None:
            return restored
        return await self.agent.ask(question, choices=choices, context=context)

    # ------------------------------------------------------------------ permission prompts

    async def can_use_tool(
        self, tool_name: str, tool_input: dict[str, Any], context: ToolPermissionContext
    ) -> PermissionResult:
        if tool_name in OWN_TOOLS or self.settings.permission_mode is PermissionMode.ALLOW_ALL:
            return PermissionResultAllow()
        question, details = prompts.permission_question(tool_name, tool_input)
        answer = self._decided.pop(question, None)
        if answer is None:
            answer = await self.ask(question, [ALLOW, DENY], details)
        log.info("claude.permission", tool=tool_name, answer=answer)
        if answer.strip().lower() == ALLOW:
            return PermissionResultAllow()
        return PermissionResultDeny(message=prompts.denial(answer))

    # ------------------------------------------------------------------ the tools

    def tools(self) -> list[SdkMcpTool[Any]]:
        handlers: dict[str, tuple[str, dict[str, Any], Callable[[dict[str, Any]], Awaitable[str]]]]
        handlers = {
            "ask_user": (
                "Ask the person a question and wait for the answer (it may take hours). "
                "Give `choices` when the answer is one of a few options.",
                _schema(
                    {
                        "question": {"type": "string"},
                        "choices": {"type": "array", "items": {"type": "string"}},
                        "context": {"type": "string"},
                    },
                    ["question"],
                ),
                self._ask_user,
            ),
            "spawn_task": (
                "Run a command as a makima task (it survives your restarts); returns its task_id.",
                _schema(
                    {
                        "name": {"type": "string"},
                        "command": {"type": "array", "items": {"type": "string"}},
                        "cwd": {"type": "string"},
                    },
                    ["name", "command"],
                ),
                self._spawn_task,
            ),
            "wait_tasks": (
                "Wait until your makima tasks have finished; returns each one's name, status, "
                "exit code and output tail.",
                _schema({}, []),
                self._wait_tasks,
            ),
            "set_phase": (
                "Enter a named phase of your work (a makima save point).",
                _schema({"phase": {"type": "string"}}, ["phase"]),
                self._set_phase,
            ),
            "report_progress": (
                "Say what you are doing now, optionally with a percentage (0-100).",
                _schema(
                    {
                        "activity": {"type": "string"},
                        "percent": {"type": "integer", "minimum": 0, "maximum": 100},
                    },
                    ["activity"],
                ),
                self._report_progress,
            ),
            "done": (
                "The goal is reached: makima completes the supervisor with this result "
                "(any JSON) when your turn ends. End your turn after calling it.",
                _schema({"result": {}}, []),
                self._done,
            ),
            "fail": (
                "The goal cannot be reached: makima fails the supervisor with this reason "
                "when your turn ends. End your turn after calling it.",
                _schema({"error": {"type": "string"}}, ["error"]),
                self._fail,
            ),
        }
        return [
            tool(name, description, schema)(_wrap(name, handler))
            for name, (description, schema, handler) in handlers.items()
        ]

    def mcp_server(self) -> McpSdkServerConfig:
        return create_sdk_mcp_server(SERVER_NAME, tools=self.tools())

    async def _ask_user(self, args: dict[str, Any]) -> str:
        question = _string(args, "question")
        choices = args.get("choices")
        if choices is not None and (
            not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)
        ):
            raise ToolInputError("'choices' must be an array of strings")
        context = _optional(args, "context")
        return await self.ask(question, choices or None, context)

    async def _spawn_task(self, args: dict[str, Any]) -> str:
        name = _string(args, "name")
        command = args.get("command")
        if (
            not isinstance(command, list)
            or not command
            or not all(isinstance(c, str) for c in command)
        ):
            raise ToolInputError("'command' must be a non-empty array of strings")
        task_id = await self.agent.spawn(name, command, cwd=_optional(args, "cwd"))
        return json.dumps({"task_id": task_id})

    async def _wait_tasks(self, args: dict[str, Any]) -> str:
        finished = await self.agent.wait_tasks()
        return json.dumps(
            [
                {
                    "task_id": t.task_id,
                    "name": t.name,
                    "status": t.status,
                    "exit_code": t.exit_code,
                    "output_tail": t.output_tail,
                }
                for t in finished
            ],
            ensure_ascii=False,
        )

    async def _set_phase(self, args: dict[str, Any]) -> str:
        await self.agent.phase(_string(args, "phase"))
        return "ok"

    async def _report_progress(self, args: dict[str, Any]) -> str:
        percent = args.get("percent")
        if percent is not None and (
            isinstance(percent, bool) or not isinstance(percent, int) or not 0 <= percent <= 100
        ):
            raise ToolInputError("'percent' must be an integer from 0 to 100")
        await self.agent.activity(_string(args, "activity"), percent)
        return "ok"

    async def _done(self, args: dict[str, Any]) -> str:
        self._request_finish(Finish(failed=False, result=prompts.bounded(args.get("result"))))
        return "Recorded: makima completes this supervisor when your turn ends. End your turn now."

    async def _fail(self, args: dict[str, Any]) -> str:
        self._request_finish(Finish(failed=True, error=prompts.bounded(_string(args, "error"))))
        return "Recorded: makima fails this supervisor when your turn ends. End your turn now."

    def _request_finish(self, finish: Finish) -> None:
        if self.finish is None:
            self.finish = finish
            self.finish_requested.set()


def _schema(properties: Mapping[str, Any], required: list[str]) -> dict[str, Any]:
    return {"type": "object", "properties": dict(properties), "required": required}


def _string(args: Mapping[str, Any], key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value.strip():
        raise ToolInputError(f"'{key}' must be a non-empty string")
    return value


def _optional(args: Mapping[str, Any], key: str) -> str | None:
    value = args.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ToolInputError(f"'{key}' must be a string")
    return value


def _wrap(
    name: str, handler: Callable[[dict[str, Any]], Awaitable[str]]
) -> Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]:
    async def call(args: dict[str, Any]) -> dict[str, Any]:
        try:
            text = await handler(args if isinstance(args, dict) else {})
        except (ToolInputError, AgentError) as exc:
            log.info("claude.tool_refused", tool=name, error=str(exc))
            return {
                "content": [{"type": "text", "text": f"makima refused {name}: {exc}"}],
                "is_error": True,
            }
        return {"content": [{"type": "text", "text": text}]}

    return call
