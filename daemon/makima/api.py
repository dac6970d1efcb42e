"""What each makima-control/1 method does (DESIGN §9).

Parameters are checked here and refused with a clear InvalidParamsError;
calls that need the database fail fast with DatabaseUnavailableError while it
is away (the server maps both to JSON-RPC errors).
"""

from __future__ import annotations

import os
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

from makima import __version__
from makima.agents.claude import settings as claude
from makima.cluster import LeaseTimer
from makima.config import DaemonConfig
from makima.control.server import MethodNotFoundError, Peer, Reply, Stream
from makima.database import Database
from makima.errors import InvalidParamsError, InvalidValueError, NotFoundError
from makima.events import EventBus, EventKind
from makima.limits import (
    ANSWER_LIMIT,
    GOAL_LIMIT,
    HISTORY_LIMIT,
    LINE_BUDGET,
    MAX_SEQ,
    NAME_LIMIT,
    encoded_size,
    fit_newest,
)
from makima.model import (
    QuestionRecord,
    SupervisorSpec,
    SupervisorState,
    SupervisorStateEnum,
    brief,
    parse_command,
    parse_env,
    parse_string_list,
    parse_uuid,
)
from makima.store import Store
from makima.supervisor import Supervisor, question_event_fields


class Daemon(Protocol):
    """What the control API needs of the daemon (which builds it: no import back)."""

    daemon_id: uuid.UUID
    started_at: datetime
    config: DaemonConfig
    bus: EventBus
    startup_report: dict[str, Any] | None
    timer: LeaseTimer

    def lease_valid(self) -> bool: ...

    @property
    def db(self) -> Database: ...

    @property
    def store(self) -> Store: ...

    @property
    def supervisors(self) -> Mapping[uuid.UUID, Supervisor]: ...

    @property
    def agents_starting(self) -> int: ...

    async def create_supervisor(self, spec: SupervisorSpec) -> Supervisor: ...

    async def answer_question(
        self, question_id: uuid.UUID, answer: str, uid: int | None
    ) -> tuple[QuestionRecord, Callable[[], Awaitable[None]] | None]: ...

    async def cancel_supervisor(self, supervisor_id: uuid.UUID, uid: int) -> dict[str, Any]: ...

    async def resume_supervisor(self, supervisor_id: uuid.UUID) -> dict[str, Any]: ...


PROTOCOL = "makima-control/1"
HISTORY_PAGE = 1000
"""Messages ``supervisor.history`` reads when no ``limit`` is given."""

Handler = Callable[[Peer, dict[str, Any]], Awaitable[Reply | Stream]]


# --------------------------------------------------------------------------- params


def _require(params: dict[str, Any], key: str) -> Any:
    if key not in params:
        raise InvalidParamsError(f"missing parameter {key!r}")
    return params[key]


def _uuid(params: dict[str, Any], key: str) -> uuid.UUID:
    value = _require(params, key)
    try:
        return parse_uuid(value, f"parameter {key!r}")
    except InvalidValueError as exc:
        raise InvalidParamsError(str(exc)) from None


def _optional_str(params: dict[str, Any], key: str) -> str | None:
    value = params.get(key)
    if value is None or isinstance(value, str):
        return value
    raise InvalidParamsError(f"parameter {key!r} must be a string; got {brief(value)}")


def _optional_bool(params: dict[str, Any], key: str) -> bool:
    value = params.get(key, False)
    if isinstance(value, bool):
        return value
    raise InvalidParamsError(f"parameter {key!r} must be true or false; got {brief(value)}")


def _optional_limit(params: dict[str, Any], key: str, maximum: int) -> int | None:
    value = params.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= maximum:
        raise InvalidParamsError(
            f"parameter {key!r} must be an integer from 1 to {maximum}; got {brief(value)}"
        )
    return value


def _only(params: dict[str, Any], allowed: set[str]) -> None:
    unknown = set(params) - allowed
    if unknown:
        expected = ", ".join(sorted(allowed)) or "none"
        raise InvalidParamsError(
            f"unknown parameter(s) {', '.join(sorted(unknown))}; expected {expected}"
        )


# --------------------------------------------------------------------------- views


def supervisor_summary(spec: SupervisorSpec, state: SupervisorState) -> dict[str, Any]:
    return {
        "supervisor_id": str(spec.supervisor_id),
        "name": spec.name,
        "state": state.state.value,
        "phase": state.phase,
        "progress": state.progress,
        "current_activity": state.current_activity,
        "pending_questions": len(state.pending_questions),
        "restoration_count": state.restoration_count,
        "last_heartbeat": None
        if state.last_heartbeat is None
        else state.last_heartbeat.isoformat(),
        "error_message": state.error_message,
        "created_at": None if spec.created_at is None else spec.created_at.isoformat(),
        "owner_daemon_id": None if state.owner_daemon_id is None else str(state.owner_daemon_id),
    }


def daemon_view(row: dict[str, Any], me: uuid.UUID) -> dict[str, Any]:
    """One daemon of the cluster for ``daemon.status``; ages in seconds on the
    database clock."""
    now = row["db_now"]
    return {
        "daemon_id": str(row["daemon_id"]),
        "self": row["daemon_id"] == me,
        "host": row["host"],
        "pid": row["pid"],
        "alive": bool(row["alive"]),
        "started_at": row["started_at"].isoformat(),
        "last_renewed_at": row["last_seen_at"].isoformat(),
        "lease_expires_at": row["lease_expires_at"].isoformat(),
        "released_at": None if row["released_at"] is None else row["released_at"].isoformat(),
        "age_s": round((now - row["started_at"]).total_seconds(), 1),
        "renewed_s_ago": round((now - row["last_seen_at"]).total_seconds(), 1),
        "supervisors": int(row["supervisors"]),
    }


def question_view(record: QuestionRecord) -> dict[str, Any]:
    return {
        **question_event_fields(record, record.supervisor_id),
        "redelivery_count": record.redelivery_count,
    }


REPORT_BUDGET = 256 * 1024
"""Bytes of startup-report entries ``daemon.status`` carries (its counts always)."""


def fit_report(report: dict[str, Any] | None, budget: int = REPORT_BUDGET) -> Any:
    """The startup report as ``daemon.status`` sends it: every count, and the entries
    that need a look (failed, fresh, reverted, repaired) before the restored ones,
    as many as fit in ``budget``; ``omitted`` counts the others (pure)."""
    if report is None:
        return None
    fitted: dict[str, Any] = {"counts": report.get("counts", {})}
    used = 0
    omitted = 0
    for outcome in ("failed", "fresh", "reverted", "repaired", "restored"):
        entries = report.get(outcome, [])
        kept: list[Any] = []
        for entry in entries:
            used += encoded_size(entry) + 1
            if used > budget:
                omitted += len(entries) - len(kept)
                break
            kept.append(entry)
        fitted[outcome] = kept
    fitted["omitted"] = omitted
    return fitted


class ControlApi:
    """Dispatches makima-control/1 methods to the daemon."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self._methods: dict[str, Handler] = {
            "daemon.hello": self.hello,
            "daemon.status": self.status,
            "supervisor.create": self.create,
            "supervisor.list": self.list_supervisors,
            "supervisor.get": self.get,
            "supervisor.resume": self.resume,
            "supervisor.cancel": self.cancel,
            "supervisor.history": self.history,
            "question.list": self.list_questions,
            "question.answer": self.answer,
            "events.subscribe": self.subscribe,
        }

    async def __call__(self, peer: Peer, method: str, params: dict[str, Any]) -> Reply | Stream:
        handler = self._methods.get(method)
        if handler is None:
            raise MethodNotFoundError(
                f"unknown method {method!r}; expected one of {', '.join(sorted(self._methods))}"
            )
        return await handler(peer, params)

    # ----------------------------------------------------------------- daemon

    async def hello(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, set())
        return Reply(
            {"protocol": PROTOCOL, "version": __version__, "daemon_id": str(self.daemon.daemon_id)}
        )

    async def status(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, set())
        counts = await self.daemon.store.count_supervisors_by_state()
        open_questions = await self.daemon.store.list_open_questions()
        daemons = await self.daemon.store.list_daemons()
        d = self.daemon
        return Reply(
            {
                "daemon_id": str(d.daemon_id),
                "pid": os.getpid(),
                "version": __version__,
                "started_at": d.started_at.isoformat(),
                "socket": str(d.config.socket_path),
                "state_dir": str(d.config.state_dir),
                "database": {"embedded": d.db.is_embedded},
                "supervisors": {s.value: counts.get(s, 0) for s in SupervisorStateEnum},
                "running_agents": sum(1 for s in d.supervisors.values() if s.agent is not None),
                "agents_starting": d.agents_starting,
                "pending_questions": len(open_questions),
                "last_startup_report": fit_report(d.startup_report),
                "cluster": {
                    "daemons": [daemon_view(row, d.daemon_id) for row in daemons],
                    "lease": {
                        "ttl": d.config.lease_ttl,
                        "renew": d.config.lease_renew,
                        "enforced": d.timer.enforced,
                        "valid": d.lease_valid(),
                        "handover": d.config.handover,
                    },
                },
            }
        )

    # ----------------------------------------------------------------- supervisors

    async def create(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"name", "command", "goal", "cwd", "env", "claude"})
        name = _require(params, "name")
        goal = _optional_str(params, "goal") or ""
        if isinstance(name, str) and len(name) > NAME_LIMIT:
            raise InvalidParamsError(
                f"parameter 'name' is {len(name)} characters; the limit is {NAME_LIMIT}"
            )
        if len(goal.encode()) > GOAL_LIMIT:
            raise InvalidParamsError(
                f"parameter 'goal' is {len(goal.encode())} bytes; the limit is {GOAL_LIMIT}"
            )
        try:
            env = parse_env(params.get("env"))
            if "claude" in params:
                command = claude.agent_command(
                    params, goal, env, python=sys.executable, environ=os.environ
                )
            else:
                command = parse_command(_require(params, "command"))
            spec = SupervisorSpec.new(
                name,
                command,
                goal=goal,
                cwd=_optional_str(params, "cwd"),
                env=env,
            )
        except InvalidValueError as exc:
            raise InvalidParamsError(str(exc)) from None
        supervisor = await self.daemon.create_supervisor(spec)
        return Reply({"supervisor_id": str(supervisor.id)})

    async def list_supervisors(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"all"})
        include_all = _optional_bool(params, "all")
        rows = await self.daemon.store.list_supervisors(include_finished=include_all)
        return Reply({"supervisors": [supervisor_summary(spec, state) for spec, state in rows]})

    async def _found(
        self, supervisor_id: uuid.UUID
    ) -> tuple[SupervisorSpec, SupervisorState | None]:
        found = await self.daemon.store.get_supervisor(supervisor_id)
        if found is None:
            raise NotFoundError(f"no supervisor {supervisor_id}")
        spec, state = found
        return spec, state

    async def get(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"supervisor_id"})
        supervisor_id = _uuid(params, "supervisor_id")
        spec, state = await self._found(supervisor_id)
        tasks = await self.daemon.store.get_tasks(supervisor_id)
        body: dict[str, Any] = (
            state.to_json()
            if state is not None
            else {
                "supervisor_id": str(supervisor_id),
                "state": None,
            }
        )
        body.update(
            name=spec.name,
            goal=spec.goal,
            command=list(spec.agent_command),
            cwd=spec.cwd,
            created_at=None if spec.created_at is None else spec.created_at.isoformat(),
            tasks=[t.to_json() for t in tasks],
            agent_running=(
                supervisor_id in self.daemon.supervisors
                and self.daemon.supervisors[supervisor_id].agent is not None
            ),
        )
        return Reply(body)

    async def resume(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"supervisor_id"})
        supervisor_id = _uuid(params, "supervisor_id")
        await self._found(supervisor_id)
        return Reply(await self.daemon.resume_supervisor(supervisor_id))

    async def cancel(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"supervisor_id"})
        supervisor_id = _uuid(params, "supervisor_id")
        await self._found(supervisor_id)
        outcome = await self.daemon.cancel_supervisor(supervisor_id, peer.uid)
        return Reply({"supervisor_id": str(supervisor_id), **outcome})

    async def history(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"supervisor_id", "limit", "before"})
        supervisor_id = _uuid(params, "supervisor_id")
        limit = _optional_limit(params, "limit", HISTORY_LIMIT)
        before = _optional_limit(params, "before", MAX_SEQ)
        await self._found(supervisor_id)
        page = limit or HISTORY_PAGE  # one more than asked: are there older ones?
        messages = await self.daemon.store.get_messages(supervisor_id, page + 1, before=before)
        # The newest that fit one reply line; page back with "before": the oldest seq.
        kept, cut = fit_newest([m.to_json() for m in messages[-page:]])
        more = cut or len(messages) > page
        return Reply({"supervisor_id": str(supervisor_id), "messages": kept, "more": more})

    # ----------------------------------------------------------------- questions

    async def list_questions(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"supervisor_id"})
        supervisor_id = _uuid(params, "supervisor_id") if "supervisor_id" in params else None
        records = await self.daemon.store.list_open_questions(supervisor_id)
        # The oldest first, as many as fit in one line; the count of the rest.
        views: list[dict[str, Any]] = []
        used = 0
        for record in records:
            view = question_view(record)
            used += encoded_size(view) + 1
            if used > LINE_BUDGET:
                break
            views.append(view)
        omitted = len(records) - len(views)
        return Reply({"questions": views, "more": omitted > 0, "omitted": omitted})

    async def answer(self, peer: Peer, params: dict[str, Any]) -> Reply:
        _only(params, {"question_id", "answer"})
        question_id = _uuid(params, "question_id")
        text = _require(params, "answer")
        if isinstance(text, str) and len(text.encode()) > ANSWER_LIMIT:
            raise InvalidParamsError(
                f"parameter 'answer' is {len(text.encode())} bytes; the limit is {ANSWER_LIMIT}"
            )
        if not isinstance(text, str) or not text.strip():
            raise InvalidParamsError(
                f"parameter 'answer' must be a non-empty string; got {brief(text)}"
            )
        record, deliver = await self.daemon.answer_question(question_id, text, peer.uid)
        return Reply(
            {
                "question_id": str(record.question_id),
                "supervisor_id": str(record.supervisor_id),
                "answer": record.answer,
                "answered_at": None
                if record.answered_at is None
                else record.answered_at.isoformat(),
            },
            after=deliver,
        )

    # ----------------------------------------------------------------- events

    async def subscribe(self, peer: Peer, params: dict[str, Any]) -> Stream:
        _only(params, {"kinds"})
        kinds_param = params.get("kinds")
        known = {k.value for k in EventKind}
        kinds: set[str] | None = None
        if kinds_param is not None:
            try:
                kinds = set(parse_string_list(kinds_param, "kinds"))
            except InvalidValueError as exc:
                raise InvalidParamsError(str(exc)) from None
            unknown = kinds - known
            if unknown:
                raise InvalidParamsError(
                    f"unknown event kind(s) {', '.join(sorted(unknown))}; "
                    f"expected some of {', '.join(sorted(known))}"
                )
        # Subscribe first, then read the snapshot: nothing falls between the two
        # (a question may then appear twice; clients key on question_id).
        subscription = self.daemon.bus.subscribe(kinds)
        try:
            snapshot: list[QuestionRecord] = []
            if kinds is None or EventKind.QUESTION_PENDING.value in kinds:
                snapshot = await self.daemon.store.list_open_questions()
        except BaseException:
            subscription.close()
            raise

        async def events() -> AsyncIterator[dict[str, Any]]:
            try:
                for record in snapshot:
                    yield {"kind": EventKind.QUESTION_PENDING.value, **question_view(record)}
                async for event in subscription:
                    yield event
            finally:
                subscription.close()

        return Stream(
            {"subscribed": True, "kinds": sorted(kinds) if kinds is not None else None},
            events(),
        )
