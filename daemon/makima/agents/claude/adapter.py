"""Drive Claude Code through the Claude Agent SDK as a makima agent.

One run of the adapter is one run of the supervisor's agent:

1. The session. On a first start the adapter picks the Claude Code session
   id itself and checkpoints it *before* Claude Code starts, so no crash can
   lose it. After a restart (any restoration source) it resumes that session
   and sends the restoration's ``context_message`` as the next user message.
   If the session cannot be resumed (its transcript is gone), it starts a
   new one, checkpointed the same way, seeded with the goal, the restored
   history and the context message.
2. The conversation. Every prompt, assistant text, tool use and tool result
   is saved as a ``message`` save point, so ``makima history`` shows it.
3. The end. ``mcp__makima__done`` / ``fail`` finish the supervisor when the
   turn ends (saved in the checkpoint at once, so a crash in between still
   finishes it). A turn that ends without either completes the supervisor
   with Claude's final text, unless answers to questions asked before a
   restart are still due: then the adapter waits and relays them. Claude
   Code's usage and cost go into the result. API errors are judged by
   :func:`makima.agents.claude.outcome.judge`.
"""

from __future__ import annotations

import collections
import contextlib
import os
import uuid
import warnings
from typing import Any, Final

import anyio
import structlog
from claude_agent_sdk import (
    AssistantMessage,
    ClaudeAgentOptions,
    ClaudeSDKClient,
    CLINotFoundError,
    ResultMessage,
    SystemMessage,
    TextBlock,
    ToolResultBlock,
    ToolUseBlock,
    UserMessage,
)
from claude_agent_sdk._errors import ClaudeSDKError
from claude_agent_sdk.types import CanUseToolShadowedWarning

from makima.agents.claude import prompts
from makima.agents.claude.bridge import OWN_TOOLS, SERVER_NAME, Bridge, Finish
from makima.agents.claude.outcome import TurnEnd, Verdict, judge
from makima.agents.claude.settings import INSTALL_HINT, ClaudeSettings, PermissionMode
from makima.sdk import Agent

log = structlog.get_logger("makima.agents.claude")

ENTRY_TEXT_LIMIT: Final = 32 * 1024  # characters of one text in a history message
STDERR_LINES: Final = 20
BLOCKED_RETRY_FIRST: Final = 60.0
BLOCKED_RETRY_MAX: Final = 30 * 60.0
# A tool call or permission prompt may wait hours for a person: no timeout of
# Claude Code's may cut it short. (Milliseconds; about 24 days.)
LONG_WAIT_MS: Final = str(2**31 - 1)
CHILD_ENV: Final = {
    "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    "MCP_TOOL_TIMEOUT": LONG_WAIT_MS,
}


class ResumeFailedError(Exception):
    """Claude Code could not resume the checkpointed session."""


class Adapter:
    def __init__(self, agent: Agent, settings: ClaudeSettings) -> None:
        self.agent = agent
        self.settings = settings
        self.bridge = Bridge(agent, settings)
        saved = agent.checkpoint_data
        self.saved: dict[str, Any] = dict(saved) if isinstance(saved, dict) else {}
        self.stderr: collections.deque[str] = collections.deque(maxlen=STDERR_LINES)
        self.final_text: str | None = None
        # Claude Code's counts, over every run of this supervisor's agent (checkpointed).
        spent = self.saved.get("spent")
        spent = spent if isinstance(spent, dict) else {}
        self.turns = int(spent.get("turns", 0))
        self.cost_usd = float(spent.get("cost_usd", 0.0))
        usage = spent.get("usage")
        usage = usage if isinstance(usage, dict) else {}
        self.usage: dict[str, int] = {k: v for k, v in usage.items() if isinstance(v, int)}
        self._last_assistant_error: str | None = None
        self._blocked_for = 0.0
        # If the daemon goes silent past its lease, a peer may run this supervisor's
        # agent anew: no Claude Code of ours may go on working beside it.
        self._client: ClaudeSDKClient | None = None
        agent.on_daemon_lost(self._on_daemon_lost)

    # ------------------------------------------------------------------ the run

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            self.bridge.adopt_restored(tg)
            await self._run()
            tg.cancel_scope.cancel()

    async def _run(self) -> None:
        finish = self.saved.get("finish")
        if isinstance(finish, dict):  # Claude finished just before the crash
            await self._finish(
                Finish(
                    failed=bool(finish.get("failed")),
                    result=finish.get("result"),
                    error=str(finish.get("error", "")),
                )
            )
            return
        restoration = self.agent.restoration
        session = self.saved.get("session_id")
        if restoration is None:
            await self._new_session(self.agent.goal)
            return
        context = restoration.context_message
        if isinstance(session, str) and session:
            try:
                await self._session(prompts.resumed_message(context), resume=session)
            except ResumeFailedError as exc:
                log.warning("claude.resume_failed", session_id=session, error=str(exc))
            else:
                return
        seed = prompts.seeded_prompt(self.agent.goal, restoration.history, context)
        await self._new_session(seed)

    async def _new_session(self, prompt: str) -> None:
        session = str(uuid.uuid4())
        await self._save(session_id=session)
        await self._session(prompt, new_session=session)

    # ------------------------------------------------------------------ one Claude Code session

    def options(self, *, resume: str | None, new_session: str | None) -> ClaudeAgentOptions:
        return ClaudeAgentOptions(
            system_prompt={
                "type": "preset",
                "preset": "claude_code",
                "append": prompts.SYSTEM_PROMPT,
            },
            mcp_servers={SERVER_NAME: self.bridge.mcp_server()},
            allowed_tools=[*OWN_TOOLS, *self.settings.allow_tools],
            permission_mode=(
                "acceptEdits"
                if self.settings.permission_mode is PermissionMode.ACCEPT_EDITS
                else "default"
            ),
            can_use_tool=self.bridge.can_use_tool,
            model=self.settings.model,
            max_turns=self.settings.max_turns,
            cwd=os.getcwd(),
            env=dict(CHILD_ENV),
            resume=resume,
            session_id=new_session,
            stderr=self._on_stderr,
        )

    async def _session(
        self, prompt: str, *, resume: str | None = None, new_session: str | None = None
    ) -> None:
        options = self.options(resume=resume, new_session=new_session)
        with warnings.catch_warnings():
            # makima's own tools are pre-allowed on purpose: the callback is for the rest.
            warnings.simplefilter("ignore", CanUseToolShadowedWarning)
            client = ClaudeSDKClient(options)
            self._client = client
            try:
                await client.connect()
            except CLINotFoundError:
                await self.agent.fail(
                    f"Claude Code cannot start: its binary was not found; install it with: "
                    f"{INSTALL_HINT}"
                )
                return
            except ClaudeSDKError as exc:
                if resume is not None:
                    raise ResumeFailedError(self._why(exc)) from exc
                raise
        finished = False
        try:
            await self._converse(client, prompt, resuming=resume is not None)
            finished = True
        finally:
            if not finished:
                _kill(client)
            with anyio.CancelScope(shield=True), anyio.move_on_after(10):
                await client.disconnect()

    async def _converse(self, client: ClaudeSDKClient, prompt: str, *, resuming: bool) -> None:
        first = resuming
        while True:
            await self._say(client, prompt)
            try:
                end, answered = await self._turn(client)
            except ClaudeSDKError as exc:
                if first:
                    raise ResumeFailedError(self._why(exc)) from exc
                raise
            if first and not answered and end.is_error and _not_resumable(end):
                raise ResumeFailedError(end.text or "; ".join(end.errors) or end.subtype)
            first = False
            if self.bridge.finish is not None:
                await self._finish(self.bridge.finish)
                return
            await self._save(
                spent={"turns": self.turns, "cost_usd": self.cost_usd, "usage": self.usage}
            )
            judgement = judge(end)
            if judgement.verdict is Verdict.FAILED:
                await self.agent.fail(judgement.reason)
                return
            if judgement.verdict is Verdict.BLOCKED:
                prompt = await self._blocked(judgement.reason)
                continue
            self._blocked_for = 0.0
            next_prompt = self._next_message()
            if next_prompt is None and self.bridge.waiting_for_answers:
                log.info("claude.waiting_for_restored_answers")
                next_prompt = await self.bridge.outbox.receive()
            if next_prompt is None:
                await self._finish(Finish(failed=False, result=self.final_text))
                return
            prompt = next_prompt

    def _next_message(self) -> str | None:
        try:
            return self.bridge.outbox.receive_nowait()
        except anyio.WouldBlock:
            return None

    async def _blocked(self, reason: str) -> str:
        """Say why Claude cannot go on; wait (or for a relayed answer); return the next prompt."""
        self._blocked_for = min(
            BLOCKED_RETRY_MAX, self._blocked_for * 2 if self._blocked_for else BLOCKED_RETRY_FIRST
        )
        log.warning("claude.blocked", reason=reason, retry_in=self._blocked_for)
        await self.agent.blocked(f"{reason} (makima retries in {int(self._blocked_for)} s)")
        message = None
        with anyio.move_on_after(self._blocked_for):
            message = await self.bridge.outbox.receive()
        await self.agent.activity("retrying the Claude API")
        retry = "[makima] The Claude API was unavailable; continue where you left off."
        return retry if message is None else f"{retry}\n\n{message}"

    async def _say(self, client: ClaudeSDKClient, prompt: str) -> None:
        await self._record("user", _clip(prompt))
        await client.query(prompt)

    async def _turn(self, client: ClaudeSDKClient) -> tuple[TurnEnd, bool]:
        """Take one turn's messages, saving them; return how it ended and whether
        Claude said anything (a resume that fails says nothing)."""
        answered = False
        self._last_assistant_error = None
        async for message in client.receive_response():
            if isinstance(message, AssistantMessage):
                answered = answered or message.error is None
                await self._assistant(message)
            elif isinstance(message, UserMessage):
                await self._user(message)
            elif isinstance(message, SystemMessage):
                await self._system(message)
            elif isinstance(message, ResultMessage):
                return self._result(message), answered
        raise ClaudeSDKError("Claude Code ended the turn without a result")

    async def _assistant(self, message: AssistantMessage) -> None:
        if message.error is not None:
            self._last_assistant_error = message.error
        texts: list[str] = []
        for block in message.content:
            if isinstance(block, TextBlock):
                texts.append(block.text)
                await self._record("assistant", {"text": _clip(block.text)})
            elif isinstance(block, ToolUseBlock):
                await self._record(
                    "assistant",
                    {
                        "tool_use": {
                            "id": block.id,
                            "name": block.name,
                            "input": prompts.bounded(block.input),
                        }
                    },
                )
                if block.name not in OWN_TOOLS:
                    subject = prompts.permission_question(block.name, block.input)[0]
                    await self._activity(subject.removeprefix("Allow ").removesuffix("?"))
        if texts and message.parent_tool_use_id is None:
            self.final_text = "\n".join(texts)

    async def _user(self, message: UserMessage) -> None:
        if isinstance(message.content, str):
            return  # our own prompt, already saved
        for block in message.content:
            if isinstance(block, ToolResultBlock):
                await self._record(
                    "tool",
                    {
                        "tool_use_id": block.tool_use_id,
                        "content": prompts.bounded(block.content),
                        "is_error": bool(block.is_error),
                    },
                )

    async def _system(self, message: SystemMessage) -> None:
        if message.subtype != "init":
            return
        session = message.data.get("session_id")
        if isinstance(session, str) and session and session != self.saved.get("session_id"):
            await self._save(session_id=session)

    def _result(self, message: ResultMessage) -> TurnEnd:
        self.turns += message.num_turns
        if message.total_cost_usd is not None:
            self.cost_usd += message.total_cost_usd
        for key, value in (message.usage or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                self.usage[key] = self.usage.get(key, 0) + value
        if message.session_id and message.session_id != self.saved.get("session_id"):
            self.saved["session_id"] = message.session_id  # saved with the next checkpoint
        if message.result and not message.is_error:
            self.final_text = message.result
        return TurnEnd(
            is_error=message.is_error,
            subtype=message.subtype,
            text=message.result,
            api_error_status=message.api_error_status,
            errors=tuple(message.errors or ()),
            assistant_error=self._last_assistant_error,
            stop_reason=message.stop_reason,
        )

    # ------------------------------------------------------------------ makima side

    async def _finish(self, finish: Finish) -> None:
        if self.saved.get("finish") is None:
            await self._save(
                finish={"failed": finish.failed, "result": finish.result, "error": finish.error}
            )
        if finish.failed:
            await self.agent.fail(finish.error or "Claude called fail")
            return
        await self.agent.done({"result": finish.result, "claude": self._report()})

    def _report(self) -> dict[str, Any]:
        report: dict[str, Any] = {
            "session_id": self.saved.get("session_id"),
            "turns": self.turns,
            "usage": self.usage,
        }
        if self.cost_usd:
            report["cost_usd"] = round(self.cost_usd, 6)
        return report

    async def _save(self, **fields: Any) -> None:
        self.saved.update(fields)
        await self.agent.checkpoint(self.saved)

    async def _record(self, role: str, content: Any) -> None:
        if self.agent.finished is None and not self.agent.closed:
            await self.agent.message(role, content)

    async def _activity(self, text: str) -> None:
        if self.agent.finished is None and not self.agent.closed:
            await self.agent.activity(_clip(text, 500))

    def _on_daemon_lost(self) -> None:
        if self._client is not None:
            log.warning("claude.daemon_lost", action="killing Claude Code")
            _kill(self._client)

    def _on_stderr(self, line: str) -> None:
        line = line.rstrip()
        if line:
            self.stderr.append(_clip(line, 1000))
            log.info("claude.stderr", line=_clip(line, 1000))

    def _why(self, exc: BaseException) -> str:
        tail = "; ".join(self.stderr)
        return f"{exc}{f' ({tail})' if tail else ''}"


def _kill(client: ClaudeSDKClient) -> None:
    """End Claude Code at once, as a crash would, when the adapter stops early
    (or when its daemon has gone silent past its lease: then the agent process
    exits right after, and Claude Code must not outlive it).

    Stopped gently, Claude Code records the turn in flight as interrupted, and a
    later resume first re-runs that turn before it reads makima's restoration
    message. Killed, its transcript stays as it was, so the resumed session gets
    the restoration message in its first request (with a synthetic result for
    the cut-off tool call). The SDK does not expose the process, hence the
    private attributes; without them the stop is the gentle one.
    """
    transport = getattr(client, "_transport", None)
    process = getattr(transport, "_process", None)
    if process is not None and getattr(process, "returncode", 0) is None:
        with contextlib.suppress(ProcessLookupError):
            process.kill()


def _not_resumable(end: TurnEnd) -> bool:
    detail = " ".join([end.text or "", *end.errors]).lower()
    return "no conversation found" in detail or ("session" in detail and "not found" in detail)


def _clip(text: str, limit: int = ENTRY_TEXT_LIMIT) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"
