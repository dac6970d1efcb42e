"""The store: every read and write makima makes, one method each, over
makima.repository (the only module that imports it; procrastinate's manager).

Writes take a typed command (:mod:`makima.store.commands`) and are save points:
they wait for the database while it is away (never dropped), and a value the
database refuses raises SavePointRefusedError. Reads come in two kinds: the
ones a person's request makes fail fast with DatabaseUnavailableError while the
database is away; restoration's loads (``load_*``) wait for it like a save point.

**Every write passes through** :meth:`Store._write`. Each write to a
supervisor's rows carries its fence (the owner daemon and lease epoch it runs
under: :class:`~makima.model.Fence`), and its one statement checks it against
the row (DESIGN §13): when it does not hold, nothing is written and
FencedError is raised, so a daemon whose supervisor was taken over can never
acknowledge a save point for it. ``_write``
tries each save point once, on the fast path (for the kinds that can be
batched, through the group committer, :mod:`makima.store.committer`); only a
connection error sends it into the retry machinery (``Database.save``), where
each later attempt is told it is a retry, so that a save point that is not
naturally repeatable recognises its own commit (an answer, a restoration count).
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import structlog

from makima import repository as repo
from makima.database import Database, Db, is_connection_error
from makima.errors import InvalidValueError
from makima.model import (
    CheckpointRecord,
    MessageRecord,
    QuestionRecord,
    SupervisorSpec,
    SupervisorState,
    SupervisorStateEnum,
    TaskRecord,
)
from makima.repository import Claim, Renewal, Request
from makima.store.commands import (
    AnswersDelivered,
    CancelUnheld,
    CheckpointSaved,
    DaemonRegistered,
    Heartbeats,
    LeaseReleased,
    LeaseRenewed,
    MessageAdded,
    PhaseChange,
    QuestionAnswered,
    QuestionAsked,
    QuestionRowsRepaired,
    QuestionsRedelivered,
    RequestAdded,
    RequestFinished,
    RestorationsCounted,
    StateChange,
    StateRestored,
    StatesRestored,
    SupervisorCreated,
    SupervisorsClaimed,
    TaskFinished,
    TasksEnded,
    TaskSpawned,
    TasksRequeued,
    TaskStarted,
)
from makima.store.committer import Committer, Job

__all__ = ["Claim", "ClaimRound", "Renewal", "Request", "Store"]

log = structlog.get_logger("makima.store")


def _about_the_data(exc: asyncpg.PostgresError) -> bool:
    """An error about a row's data (SQLSTATE classes 22 and 23, or raised by a trigger:
    P0), which claiming again cannot cure; not a timeout, a deadlock or a lost
    connection, which the next round retries."""
    state = str(getattr(exc, "sqlstate", "") or "")
    return not is_connection_error(exc) and state[:2] in {"22", "23", "P0"}


@dataclass(frozen=True, slots=True)
class ClaimRound:
    """A claim round: what was claimed, and what the database refused to hand over
    (claimed as failed instead, with the reason)."""

    claims: list[Claim]
    refused: tuple[tuple[uuid.UUID, str], ...]


T = TypeVar("T")
Operation = Callable[[Db, bool], Awaitable[T]]  # (pool, is this attempt a retry?)


class Store:
    """One method per save point and per read; see the module docstring."""

    def __init__(self, db: Database, *, group_commit: bool = True) -> None:
        self.db = db
        self.committer: Committer | None = Committer(db.pool) if group_commit else None

    # ----------------------------------------------------------------- the one write path

    async def _write(
        self,
        what: str,
        operation: Operation[T],
        job: Job[T] | None = None,
        *,
        wait: bool = True,
    ) -> T:
        """Every write passes here (the lease and fencing check of several daemons goes here).

        Once on the fast path (``job`` through the group committer when there is
        one), then, only after a connection error, with retries (each attempt
        told it is a retry). ``wait=False``: a write a person waits for, which
        fails fast with DatabaseUnavailableError while the database is away.
        """
        if not wait:
            return await self.db.query(lambda pool: operation(pool, False))
        attempts = 0
        committer = self.committer if job is not None else None

        async def attempt(pool: Db) -> T:
            nonlocal attempts
            attempts += 1
            if attempts == 1 and committer is not None and job is not None:
                return await committer.submit(job)
            return await operation(pool, attempts > 1)

        return await self.db.save(attempt, what)

    async def _batched(self, what: str, bound: repo.Bound[T]) -> T:
        async def alone(pool: Db, retry: bool) -> T:
            return await bound.run(pool)

        return await self._write(what, alone, bound)

    # ----------------------------------------------------------------- save points

    async def change_state(self, command: StateChange) -> int | None:
        """The row's new version; None when the supervisor has no state row."""
        c = command
        bound = repo.state_change(
            c.supervisor_id,
            c.state,
            c.current_activity,
            c.progress,
            c.error_message,
            c.result,
            c.fence,
        )
        return await self._batched("state_change", bound)

    async def change_phase(self, command: PhaseChange) -> int:
        return await self._batched("phase", repo.phase_change(command.snapshot))

    async def save_checkpoint(self, command: CheckpointSaved) -> int:
        return await self._batched("checkpoint", repo.checkpoint_saved(command.snapshot))

    async def add_message(self, command: MessageAdded) -> int:
        """The message's ``seq``."""
        c = command
        return await self._batched(
            "message", repo.message_added(c.supervisor_id, c.role, c.content, c.fence)
        )

    async def ask_question(self, command: QuestionAsked) -> int:
        c = command
        bound = repo.question_asked(c.supervisor_id, c.question, c.state, c.fence)
        return await self._batched("ask", bound)

    async def answer_question(self, command: QuestionAnswered) -> QuestionRecord:
        """One statement from the call to the commit. NotFoundError, ConflictError
        (the existing answer in ``data``), InvalidAnswerError as the repository says;
        a retry recognises its own commit (the same answer by the same uid). With the
        owner's fence, AnsweredElsewhereError: recorded, but the supervisor was taken
        over (the record is in the error)."""
        c = command

        async def answer(pool: Db, retry: bool) -> QuestionRecord:
            return await repo.answer_question(
                pool,
                c.question_id,
                c.answer,
                c.answered_by_uid,
                state=c.state,
                retry=retry,
                fence=c.fence,
            )

        return await self._write("answer", answer)

    async def spawn_task(self, command: TaskSpawned) -> tuple[TaskRecord, int]:
        """The task's row and the supervisor's new version."""
        c = command
        return await self._batched("spawn", repo.task_spawned(c.task, c.state, c.fence))

    async def start_task(self, command: TaskStarted) -> TaskRecord | None:
        c = command
        return await self._batched(
            "task_start", repo.task_started(c.task_id, c.supervisor_id, c.fence)
        )

    async def finish_task(self, command: TaskFinished) -> TaskRecord | None:
        c = command
        bound = repo.task_finished(
            c.task_id, c.status, c.exit_code, c.output_tail, c.supervisor_id, c.fence
        )
        return await self._batched("task_finished", bound)

    async def end_tasks(self, command: TasksEnded) -> list[TaskRecord]:
        sid, status, fence = command.supervisor_id, command.status, command.fence

        async def end(pool: Db, retry: bool) -> list[TaskRecord]:
            return await repo.end_unfinished_tasks(pool, sid, status, fence)

        return await self._write("end_tasks", end)

    async def deliver_answers(self, command: AnswersDelivered) -> int:
        """How many were marked delivered (each the first time only)."""
        ids, sid, fence = command.question_ids, command.supervisor_id, command.fence
        if len(ids) == 1 and sid is not None:
            bound = repo.answer_delivered(ids[0], sid, fence)
            delivered_one = await self._batched("answer_delivered", bound)
            return 1 if delivered_one else 0

        async def delivered(pool: Db, retry: bool) -> int:
            return await repo.mark_answers_delivered(pool, ids, sid, fence)

        return await self._write("answer_delivered", delivered)

    async def beat(self, command: Heartbeats) -> dict[uuid.UUID, tuple[int, bool]]:
        """The heartbeat of every live supervisor (one statement; see the repository).
        Not through the committer: it is already one statement for all."""
        # In supervisor order, as every multi-row write locks rows.
        beats = sorted(command.beats, key=lambda b: b.supervisor_id)

        async def beat(pool: Db, retry: bool) -> dict[uuid.UUID, tuple[int, bool]]:
            return await repo.update_supervisors_heartbeat_bulk(pool, beats)

        return await self._write("heartbeat", beat)

    # ----------------------------------------------------------------- restoration writes

    async def restore_state(self, command: StateRestored) -> int:
        state = command.state

        async def save(pool: Db, retry: bool) -> int:
            return await repo.save_supervisor_state_full(pool, state)

        return await self._write("restore_state", save)

    async def restore_states(self, command: StatesRestored) -> dict[uuid.UUID, int]:
        """Each supervisor's new version; all or nothing (then save them one by one)."""
        states = command.states

        async def save(pool: Db, retry: bool) -> dict[uuid.UUID, int]:
            return await repo.save_supervisor_states_full(pool, states)

        return await self._write("restore_states", save)

    async def count_restorations(
        self, command: RestorationsCounted
    ) -> dict[uuid.UUID, tuple[int, int]]:
        """Each supervisor's restoration count and row version. Counted once even when
        retried after a commit whose reply was lost: a retry leaves the rows whose
        version moved past the one saved."""
        c = command

        async def mark(pool: Db, retry: bool) -> dict[uuid.UUID, tuple[int, int]]:
            return await repo.mark_supervisors_restored(
                pool,
                c.supervisor_ids,
                c.source,
                unless_past=c.saved if retry else None,
                fences=c.fences,
            )

        return await self._write("restore_mark", mark)

    async def repair_question_rows(self, command: QuestionRowsRepaired) -> None:
        c = command

        async def repair(pool: Db, retry: bool) -> None:
            await repo.record_question_rows(pool, c.supervisor_id, c.questions, c.fence)

        await self._write("restore_repair", repair)

    async def requeue_tasks(self, command: TasksRequeued) -> list[TaskRecord]:
        c = command

        async def requeue(pool: Db, retry: bool) -> list[TaskRecord]:
            return await repo.requeue_interrupted_tasks(pool, c.supervisor_id, c.since, c.fence)

        return await self._write("restore_tasks", requeue)

    async def count_redeliveries(self, command: QuestionsRedelivered) -> int:
        ids, fences = command.question_ids, command.fences or None

        async def count(pool: Db, retry: bool) -> int:
            return await repo.increment_redelivery_count(pool, ids, fences)

        return await self._write("redelivery", count)

    # ----------------------------------------------------------------- daemon

    async def register_daemon(self, command: DaemonRegistered) -> None:
        c = command

        async def register(pool: Db, retry: bool) -> None:
            await repo.register_daemon(pool, c.daemon_id, c.host, c.pid, c.ttl)

        await self._write("register_daemon", register)

    async def create_supervisor(self, command: SupervisorCreated) -> SupervisorState:
        """A person's request: it fails fast while the database is away."""
        spec, owner = command.spec, command.owner

        async def create(pool: Db, retry: bool) -> SupervisorState:
            return await repo.create_supervisor(pool, spec, owner)

        return await self._write("create_supervisor", create, wait=False)

    # ----------------------------------------------------------------- leases and requests

    async def renew_lease(self, command: LeaseRenewed, db: Db | None = None) -> Renewal:
        """Once, on ``db`` (the daemon's lease connection) or the pool: a renewal that
        fails is the lease loop's to retry, against its own deadline."""
        c = command
        return await repo.renew_lease(
            db or self.db.pool, c.daemon_id, c.host, c.pid, c.ttl, c.running
        )

    async def release_lease(self, command: LeaseReleased) -> None:
        await self.db.query(lambda pool: repo.release_lease(pool, command.daemon_id))

    async def claim(self, command: SupervisorsClaimed, db: Db | None = None) -> ClaimRound:
        """Once, like :meth:`renew_lease`: claims are retried by the next round.

        The crash boundary: when the database refuses the claim of them all (a row
        it will not update), they are claimed one at a time, and one that is refused
        alone is claimed as failed, with the reason (``refused``), so that it never
        holds up the others."""
        c = command
        pool = db or self.db.pool
        try:
            return ClaimRound(
                await repo.claim_supervisors(
                    pool, c.daemon_id, own=c.own, only=c.only, running=c.running
                ),
                (),
            )
        except asyncpg.PostgresError as exc:
            if not _about_the_data(exc):  # a timeout, a deadlock: the next round retries
                raise
            log.warning("store.claim_refused", error=f"{type(exc).__name__}: {exc}")
        ids = [c.only] if c.only is not None else await repo.claimable(pool, c.daemon_id, own=c.own)
        claims: list[Claim] = []
        refused: list[tuple[uuid.UUID, str]] = []
        for sid in ids:
            try:
                claims.extend(await repo.claim_supervisors(pool, c.daemon_id, own=c.own, only=sid))
            except asyncpg.PostgresError as exc:
                if not _about_the_data(exc):
                    raise
                reason = f"it could not be claimed: the database refused ({exc})"
                try:
                    if await repo.claim_failed(pool, c.daemon_id, sid, reason):
                        refused.append((sid, reason))
                except asyncpg.PostgresError as second:
                    if is_connection_error(second):
                        raise
                    log.exception(
                        "store.claim_impossible",
                        supervisor_id=str(sid),
                        error=f"{type(second).__name__}: {second}",
                    )
        return ClaimRound(claims, tuple(refused))

    async def cancel_unheld(self, command: CancelUnheld) -> bool:
        """A person's request: it fails fast while the database is away."""
        c = command

        async def cancel(pool: Db, retry: bool) -> bool:
            return await repo.cancel_unheld(pool, c.daemon_id, c.supervisor_id, c.reason)

        return await self._write("cancel_unheld", cancel, wait=False)

    async def add_request(self, command: RequestAdded) -> None:
        """A person's request: it fails fast while the database is away."""
        c = command

        async def add(pool: Db, retry: bool) -> None:
            await repo.add_request(
                pool, c.request_id, c.supervisor_id, c.kind, c.requested_by_uid, c.daemon_id
            )

        await self._write("request", add, wait=False)

    async def finish_request(self, command: RequestFinished) -> bool:
        c = command

        async def finish(pool: Db, retry: bool) -> bool:
            return await repo.finish_request(pool, c.request_id, c.daemon_id, c.outcome)

        return await self._write("request_finished", finish)

    async def notify(self, payloads: Sequence[str]) -> None:
        """Tell the other daemons (fire and forget: fails fast while the database is away)."""
        await self.db.query(lambda pool: repo.notify(pool, payloads))

    async def get_requests(self, request_ids: Sequence[uuid.UUID]) -> list[Request]:
        return await self.db.query(lambda pool: repo.get_requests(pool, request_ids))

    async def list_daemons(self) -> list[dict[str, Any]]:
        return await self.db.query(repo.list_daemons)

    async def owner_of(self, supervisor_id: uuid.UUID) -> tuple[uuid.UUID | None, bool] | None:
        return await self.db.query(lambda pool: repo.owner_of(pool, supervisor_id))

    # ----------------------------------------------------------------- reads (fail fast)

    async def get_supervisor(
        self, supervisor_id: uuid.UUID
    ) -> tuple[SupervisorSpec, SupervisorState | None] | None:
        return await self.db.query(lambda pool: repo.get_supervisor(pool, supervisor_id))

    async def list_supervisors(
        self, *, include_finished: bool = False
    ) -> list[tuple[SupervisorSpec, SupervisorState]]:
        return await self.db.query(
            lambda pool: repo.list_supervisors(pool, include_finished=include_finished)
        )

    async def count_supervisors_by_state(self) -> dict[SupervisorStateEnum, int]:
        return await self.db.query(repo.count_supervisors_by_state)

    async def list_open_questions(
        self, supervisor_id: uuid.UUID | None = None
    ) -> list[QuestionRecord]:
        return await self.db.query(lambda pool: repo.list_open_questions(pool, supervisor_id))

    async def get_question(self, question_id: uuid.UUID) -> QuestionRecord | None:
        return await self.db.query(lambda pool: repo.get_question(pool, question_id))

    async def get_tasks(self, supervisor_id: uuid.UUID) -> list[TaskRecord]:
        return await self.db.query(lambda pool: repo.get_tasks_for_supervisor(pool, supervisor_id))

    async def get_messages(
        self, supervisor_id: uuid.UUID, limit: int | None = None, *, before: int | None = None
    ) -> list[MessageRecord]:
        return await self.db.query(
            lambda pool: repo.get_supervisor_messages(pool, supervisor_id, limit, before=before)
        )

    # ----------------------------------------------------------------- restoration's loads (wait)

    async def _load(self, operation: Callable[[Db], Awaitable[T]]) -> T:
        return await self.db.save(operation, "restore_load")

    async def load_unfinished_states(
        self,
    ) -> list[tuple[uuid.UUID, SupervisorState | InvalidValueError]]:
        return await self._load(repo.load_unfinished_supervisor_states)

    async def load_specs_without_state(self) -> list[SupervisorSpec]:
        return await self._load(repo.get_specs_without_state)

    async def load_unfinished_ids(self) -> list[uuid.UUID]:
        return await self._load(repo.get_unfinished_supervisor_ids)

    async def load_states(
        self, ids: Sequence[uuid.UUID]
    ) -> list[tuple[uuid.UUID, SupervisorState | InvalidValueError]]:
        return await self._load(lambda pool: repo.load_supervisor_states(pool, ids))

    async def load_state(self, supervisor_id: uuid.UUID) -> SupervisorState | None:
        return await self._load(
            lambda pool: repo.get_supervisor_state_for_restoration(pool, supervisor_id)
        )

    async def load_specs(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, SupervisorSpec]:
        return await self._load(lambda pool: repo.get_supervisor_specs(pool, ids))

    async def load_tasks(self, ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, list[TaskRecord]]:
        return await self._load(lambda pool: repo.get_tasks_for_supervisors(pool, ids))

    async def load_questions(
        self, ids: Sequence[uuid.UUID]
    ) -> dict[uuid.UUID, list[QuestionRecord]]:
        return await self._load(lambda pool: repo.get_questions_for_supervisors(pool, ids))

    async def load_checkpointed(self, ids: Sequence[uuid.UUID]) -> set[uuid.UUID]:
        return await self._load(lambda pool: repo.get_checkpointed_supervisors(pool, ids))

    async def load_latest_checkpoint(self, supervisor_id: uuid.UUID) -> CheckpointRecord | None:
        return await self._load(
            lambda pool: repo.get_latest_supervisor_checkpoint(pool, supervisor_id)
        )

    async def load_histories(
        self, ids: Sequence[uuid.UUID], limit: int
    ) -> dict[uuid.UUID, list[MessageRecord]]:
        return await self._load(lambda pool: repo.get_histories(pool, ids, limit))

    async def load_history(self, supervisor_id: uuid.UUID, limit: int) -> list[MessageRecord]:
        return await self._load(
            lambda pool: repo.get_supervisor_messages(pool, supervisor_id, limit)
        )
