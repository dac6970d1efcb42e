"""Every SQL statement makima runs, one function per statement.

Nothing else in makima talks SQL. Every value is a bind parameter; no value
is ever formatted into a statement. Each function takes ``db`` (a pool, a
connection, or a pooled connection) and returns model objects. Only
:mod:`makima.store` calls these functions.

Every save point is ONE statement (one round trip, one commit): where it
touches several tables it does so with data-modifying CTEs, which PostgreSQL
runs atomically, without BEGIN/COMMIT. The save points that can be written
together with others (group commit, :mod:`makima.store.committer`) are also
offered as a :class:`Bound` statement: a :class:`Statement` that returns
exactly one row per execution, and the arguments of one execution, so that
many executions go in one pipeline and each row is decoded for its own caller.

Changes to ``pending_questions`` and ``spawned_task_ids`` are computed by
PostgreSQL inside one UPDATE, so concurrent writers never lose each other's
changes (no read-modify-write in Python). Every write to
``supervisor_states`` bumps ``version`` and ``updated_at``.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

import asyncpg

from makima.database import Db
from makima.errors import (
    ConflictError,
    FencedError,
    InvalidValueError,
    MakimaError,
    NotFoundError,
)
from makima.model import (
    NO_FENCE,
    UNFINISHED_STATES,
    CheckpointRecord,
    Fence,
    Heartbeat,
    MessageRecord,
    PendingQuestion,
    QuestionRecord,
    RestorationSource,
    SpawnedTaskConsistency,
    SupervisorSpec,
    SupervisorState,
    SupervisorStateEnum,
    TaskRecord,
    TaskStatus,
    check_answer,
)

_STATE_COLUMNS = (
    "supervisor_id",
    "state",
    "phase",
    "current_activity",
    "progress",
    "error_message",
    "spawned_task_ids",
    "pending_questions",
    "restoration_count",
    "last_restored_at",
    "restoration_source",
    "checkpoint_data",
    "last_heartbeat",
    "version",
    "owner_daemon_id",
    "lease_epoch",
    "created_at",
    "updated_at",
    "result",
)
_STATE = ", ".join(f"st.{c}" for c in _STATE_COLUMNS)
_SPEC = "sp.supervisor_id, sp.name, sp.goal, sp.agent_command, sp.cwd, sp.env, sp.created_at"
_UNFINISHED = [s.value for s in sorted(UNFINISHED_STATES)]
_BUMP = "version = version + 1, updated_at = now()"


def _fenced(owner: int, epoch: int, table: str = "") -> str:
    """The fencing condition (DESIGN §13) on a ``supervisor_states`` row, with the
    fence's owner and epoch in parameters ``$owner`` and ``$epoch``."""
    t = f"{table}." if table else ""
    return (
        f"{t}owner_daemon_id IS NOT DISTINCT FROM ${owner}::uuid "
        f"AND {t}lease_epoch = ${epoch}::bigint"
    )


def _fence_cte(supervisor: int, owner: int, epoch: int) -> str:
    """``f``: the supervisor's row if the fence holds, share-locked until the commit, so
    that a claim either waits for this write or, committed first, fails its check
    (READ COMMITTED re-reads the newest row version after a lock wait)."""
    return (
        f"f AS (SELECT 1 FROM supervisor_states WHERE supervisor_id = ${supervisor}::uuid "
        f"AND {_fenced(owner, epoch)} FOR SHARE)"
    )


_PRESENT = "EXISTS (SELECT 1 FROM supervisor_states WHERE supervisor_id = $1) AS present"
R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class Statement(Generic[R]):
    """A save point's statement: every execution returns exactly one row, which
    ``decode`` turns into the caller's result (or the caller's error)."""

    name: str
    sql: str
    decode: Callable[[asyncpg.Record], R]


@dataclass(frozen=True, slots=True)
class Bound(Generic[R]):
    """One execution of a :class:`Statement`: the statement and its arguments."""

    statement: Statement[R]
    args: tuple[Any, ...]

    @property
    def sql(self) -> str:
        return self.statement.sql

    def decode(self, row: asyncpg.Record) -> R:
        return self.statement.decode(row)

    async def run(self, db: Db) -> R:
        """Execute alone: one round trip."""
        row = await db.fetchrow(self.statement.sql, *self.args)
        assert row is not None, f"{self.statement.name} returns one row per execution"
        return self.statement.decode(row)


def _version_or_none(row: asyncpg.Record) -> int | None:
    """The new version; None when the supervisor has no state row; FencedError when
    it has one that another daemon (or a newer epoch) owns."""
    value = row["version"]
    if value is None:
        if row["present"]:
            raise FencedError(row["for_supervisor"])
        return None
    return int(value)


def _version_required(row: asyncpg.Record) -> int:
    """The new version; NotFoundError when no row was written (the statement
    echoes the supervisor id it was given as ``for_supervisor``), FencedError when
    the row is there but the fence did not hold."""
    value = row["version"]
    if value is None:
        if row["present"]:
            raise FencedError(row["for_supervisor"])
        raise NotFoundError(f"no supervisor {row['for_supervisor']}")
    return int(value)


def _present(at: int) -> str:
    return f"EXISTS (SELECT 1 FROM supervisor_states WHERE supervisor_id = ${at}::uuid) AS present"


def _held(row: asyncpg.Record) -> bool:
    """Whether the fence (the ``held`` column) held; FencedError when it did not on a
    supervisor that has a state row (``present``): False means no such supervisor."""
    if row["held"]:
        return True
    if row["present"]:
        raise FencedError(row["for_supervisor"])
    return False


def _task_or_none(row: asyncpg.Record) -> TaskRecord | None:
    _held(row)
    return None if row["task_id"] is None else TaskRecord.from_row(row)


def _state(row: asyncpg.Record | None) -> SupervisorState | None:
    return None if row is None else SupervisorState.from_row(row)


def _by_supervisor(
    supervisor_ids: Sequence[uuid.UUID],
    rows: Sequence[asyncpg.Record],
    build: Callable[[asyncpg.Record], R],
) -> dict[uuid.UUID, list[R]]:
    """Rows grouped by their supervisor_id (every id present, maybe empty)."""
    out: dict[uuid.UUID, list[R]] = {i: [] for i in supervisor_ids}
    for row in rows:
        out.setdefault(row["supervisor_id"], []).append(build(row))
    return out


def _split(row: asyncpg.Record) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a joined spec+state row whose state columns are prefixed ``st_``."""
    spec: dict[str, Any] = {}
    state: dict[str, Any] = {}
    for key, value in row.items():
        if key.startswith("st_"):
            state[key[3:]] = value
        else:
            spec[key] = value
    return spec, state


# --------------------------------------------------------------------------- specs


async def create_supervisor(
    db: Db, spec: SupervisorSpec, owner: uuid.UUID | None = None
) -> SupervisorState:
    """Write the spec and its initial state row: one statement. ``owner``: the daemon
    that runs it (at lease epoch 1), or nobody."""
    row = await db.fetchrow(
        "WITH sp AS (INSERT INTO supervisors (supervisor_id, name, goal, agent_command, cwd, env) "
        "VALUES ($1, $2, $3, $4, $5, $6) RETURNING supervisor_id) "
        "INSERT INTO supervisor_states AS st (supervisor_id, owner_daemon_id, lease_epoch) "
        "SELECT supervisor_id, $7::uuid, CASE WHEN $7::uuid IS NULL THEN 0 ELSE 1 END FROM sp "
        f"RETURNING {_STATE}",
        spec.supervisor_id,
        spec.name,
        spec.goal,
        list(spec.agent_command),
        spec.cwd,
        dict(spec.env),
        owner,
    )
    state = _state(row)
    assert state is not None
    return state


async def get_supervisor_spec(db: Db, supervisor_id: uuid.UUID) -> SupervisorSpec | None:
    row = await db.fetchrow(
        f"SELECT {_SPEC} FROM supervisors sp WHERE sp.supervisor_id = $1", supervisor_id
    )
    return None if row is None else SupervisorSpec.from_row(row)


async def get_supervisor(
    db: Db, supervisor_id: uuid.UUID
) -> tuple[SupervisorSpec, SupervisorState | None] | None:
    """The spec and, if it has one, the state row of a supervisor."""
    state_cols = ", ".join(f"st.{c} AS st_{c}" for c in _STATE_COLUMNS)
    row = await db.fetchrow(
        f"SELECT {_SPEC}, st.supervisor_id IS NOT NULL AS has_state, {state_cols} "
        "FROM supervisors sp LEFT JOIN supervisor_states st USING (supervisor_id) "
        "WHERE sp.supervisor_id = $1",
        supervisor_id,
    )
    if row is None:
        return None
    spec_row, state_row = _split(row)
    has_state = spec_row.pop("has_state")
    spec = SupervisorSpec.from_row(spec_row)
    return spec, SupervisorState.from_row(state_row) if has_state else None


async def list_supervisors(
    db: Db, *, include_finished: bool = False
) -> list[tuple[SupervisorSpec, SupervisorState]]:
    """Every supervisor with a state row, newest first; unfinished only unless asked."""
    state_cols = ", ".join(f"st.{c} AS st_{c}" for c in _STATE_COLUMNS)
    rows = await db.fetch(
        f"SELECT {_SPEC}, {state_cols} "
        "FROM supervisors sp JOIN supervisor_states st USING (supervisor_id) "
        "WHERE $1 OR st.state = ANY($2::text[]) "
        "ORDER BY sp.created_at DESC, sp.supervisor_id",
        include_finished,
        _UNFINISHED,
    )
    result = []
    for row in rows:
        spec_row, state_row = _split(row)
        result.append((SupervisorSpec.from_row(spec_row), SupervisorState.from_row(state_row)))
    return result


async def get_specs_without_state(db: Db) -> list[SupervisorSpec]:
    """Specs that have no state row (restoration step 3: start fresh)."""
    rows = await db.fetch(
        f"SELECT {_SPEC} FROM supervisors sp "
        "WHERE NOT EXISTS (SELECT 1 FROM supervisor_states st "
        "WHERE st.supervisor_id = sp.supervisor_id) ORDER BY sp.created_at"
    )
    return [SupervisorSpec.from_row(r) for r in rows]


async def get_unfinished_supervisor_ids(db: Db) -> list[uuid.UUID]:
    """Every supervisor restoration would consider, without reading its rows: an
    unfinished state, or a spec without a state row."""
    rows = await db.fetch(
        "SELECT sp.supervisor_id FROM supervisors sp "
        "LEFT JOIN supervisor_states st ON st.supervisor_id = sp.supervisor_id "
        "WHERE st.supervisor_id IS NULL OR (st.state IS DISTINCT FROM 'completed' "
        "AND st.state IS DISTINCT FROM 'failed') ORDER BY sp.created_at, sp.supervisor_id"
    )
    return [r["supervisor_id"] for r in rows]


async def count_supervisors_by_state(db: Db) -> dict[SupervisorStateEnum, int]:
    rows = await db.fetch("SELECT state, count(*) AS n FROM supervisor_states GROUP BY state")
    return {SupervisorStateEnum(r["state"]): int(r["n"]) for r in rows}


# --------------------------------------------------------------------------- the seed's eleven


STATE_CHANGE: Statement[int | None] = Statement(
    "state_change",
    "WITH st AS (UPDATE supervisor_states SET state = $2, current_activity = $3, progress = $4, "
    f"error_message = $5, result = COALESCE($6::jsonb, result), {_BUMP} "
    f"WHERE supervisor_id = $1 AND {_fenced(7, 8)} RETURNING version) "
    f"SELECT $1::uuid AS for_supervisor, (SELECT version FROM st) AS version, {_PRESENT}",
    _version_or_none,
)


def state_change(
    supervisor_id: uuid.UUID,
    state: SupervisorStateEnum,
    current_activity: str | None,
    progress: int,
    error_message: str | None = None,
    result: Any = None,
    fence: Fence = NO_FENCE,
) -> Bound[int | None]:
    return Bound(
        STATE_CHANGE,
        (
            supervisor_id,
            state.value,
            current_activity,
            progress,
            error_message,
            result,
            fence.owner,
            fence.epoch,
        ),
    )


async def update_supervisor_detailed_state(
    db: Db,
    supervisor_id: uuid.UUID,
    state: SupervisorStateEnum,
    current_activity: str | None,
    progress: int,
    error_message: str | None = None,
) -> int | None:
    """Save point on a state change. Returns the new version, None if no such supervisor."""
    bound = state_change(supervisor_id, state, current_activity, progress, error_message)
    return await bound.run(db)


_ADD_TASK_ID = (
    "UPDATE supervisor_states SET spawned_task_ids = CASE "
    "WHEN $2::uuid = ANY(spawned_task_ids) THEN spawned_task_ids "
    "ELSE array_append(COALESCE(spawned_task_ids, ARRAY[]::uuid[]), $2::uuid) END, "
    f"{_BUMP} WHERE supervisor_id = $1 RETURNING version"
)


async def add_supervisor_spawned_task(db: Db, supervisor_id: uuid.UUID, task_id: uuid.UUID) -> bool:
    """Record a spawned task id (idempotent). False if no such supervisor."""
    return await db.fetchval(_ADD_TASK_ID, supervisor_id, task_id) is not None


_ADD_QUESTION = (
    "UPDATE supervisor_states SET pending_questions = CASE "
    "WHEN COALESCE(pending_questions, '[]'::jsonb) "
    "@> jsonb_build_array(jsonb_build_object('id', $3::text)) "
    "THEN pending_questions "
    "ELSE COALESCE(pending_questions, '[]'::jsonb) || jsonb_build_array($2::jsonb) END, "
    f"{_BUMP} WHERE supervisor_id = $1 RETURNING version"
)


async def add_supervisor_pending_question(
    db: Db, supervisor_id: uuid.UUID, question: PendingQuestion
) -> bool:
    """Append a pending question atomically (idempotent by id). False if no such supervisor."""
    version = await db.fetchval(_ADD_QUESTION, supervisor_id, question.to_json(), str(question.id))
    return version is not None


_REMOVE_QUESTION = (
    "UPDATE supervisor_states SET pending_questions = COALESCE(("
    "SELECT jsonb_agg(q ORDER BY n) FROM jsonb_array_elements(pending_questions) "
    "WITH ORDINALITY AS e(q, n) WHERE q->>'id' IS DISTINCT FROM $2::text), '[]'::jsonb), "
    f"{_BUMP} WHERE supervisor_id = $1 "
    "AND pending_questions @> jsonb_build_array(jsonb_build_object('id', $2::text)) "
    "RETURNING version"
)


async def remove_supervisor_pending_question(
    db: Db, supervisor_id: uuid.UUID, question_id: uuid.UUID
) -> bool:
    """Drop a pending question atomically. True if it was there."""
    version = await db.fetchval(_REMOVE_QUESTION, supervisor_id, str(question_id))
    return version is not None


# What a whole state written again changes: everything but the restoration
# bookkeeping (count, time, source), which only the restoration count writes.
_STATE_UPSERT = (
    "ON CONFLICT (supervisor_id) DO UPDATE SET state = EXCLUDED.state, "
    "phase = EXCLUDED.phase, current_activity = EXCLUDED.current_activity, "
    "progress = EXCLUDED.progress, error_message = EXCLUDED.error_message, "
    "spawned_task_ids = EXCLUDED.spawned_task_ids, "
    "pending_questions = EXCLUDED.pending_questions, "
    "checkpoint_data = EXCLUDED.checkpoint_data, "
    "last_heartbeat = EXCLUDED.last_heartbeat, "
    "owner_daemon_id = EXCLUDED.owner_daemon_id, lease_epoch = EXCLUDED.lease_epoch, "
    "version = st.version + 1, updated_at = now() "
    # Fenced: only the owner at that epoch rewrites a row (the owner and epoch are
    # the state's own, which restoration stamps with the claim it restores under).
    "WHERE st.owner_daemon_id IS NOT DISTINCT FROM EXCLUDED.owner_daemon_id "
    "AND st.lease_epoch = EXCLUDED.lease_epoch"
)


async def save_supervisor_state_full(db: Db, state: SupervisorState) -> int:
    """UPSERT a whole state. Returns the new version; FencedError when the row is
    owned by another daemon or epoch than the state says.

    On an existing row the restoration bookkeeping (restoration_count,
    last_restored_at, restoration_source) is left alone: only
    :func:`mark_supervisor_restored` writes it, once per restoration, so a
    state reverted to an older checkpoint never moves the count backwards.
    """
    value = await db.fetchval(
        "INSERT INTO supervisor_states AS st (supervisor_id, state, phase, current_activity, "
        "progress, error_message, spawned_task_ids, pending_questions, restoration_count, "
        "last_restored_at, restoration_source, checkpoint_data, last_heartbeat, "
        "owner_daemon_id, lease_epoch, version) "
        "VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, 1) "
        f"{_STATE_UPSERT} RETURNING version",
        state.supervisor_id,
        state.state.value,
        state.phase,
        state.current_activity,
        state.progress,
        state.error_message,
        list(state.spawned_task_ids),
        [q.to_json() for q in state.pending_questions],
        state.restoration_count,
        state.last_restored_at,
        None if state.restoration_source is None else state.restoration_source.value,
        state.checkpoint_data,
        state.last_heartbeat,
        state.owner_daemon_id,
        state.lease_epoch,
    )
    if value is None:
        raise FencedError(state.supervisor_id, "its restored state")
    return int(value)


async def save_supervisor_states_full(
    db: Db, states: Sequence[SupervisorState]
) -> dict[uuid.UUID, int]:
    """Bulk form of :func:`save_supervisor_state_full`: one UNNEST statement for
    many states (restoration writes every decided state at once). Returns each
    supervisor's new version (none for a row another daemon or epoch owns: fenced).
    Atomic: one bad state fails them all, and the caller then saves them one by one."""
    if not states:
        return {}
    rows = await db.fetch(
        "INSERT INTO supervisor_states AS st (supervisor_id, state, phase, current_activity, "
        "progress, error_message, spawned_task_ids, pending_questions, restoration_count, "
        "last_restored_at, restoration_source, checkpoint_data, last_heartbeat, "
        "owner_daemon_id, lease_epoch, version) "
        "SELECT b.supervisor_id, b.state, b.phase, b.activity, b.progress, b.error, "
        "ARRAY(SELECT jsonb_array_elements_text(b.tasks::jsonb)::uuid), b.questions::jsonb, "
        "b.restorations, b.restored_at, b.source, b.checkpoint::jsonb, b.heartbeat, b.owner, "
        "b.epoch, 1 "
        # JSON goes as text: asyncpg would read a list inside a jsonb[] as a dimension.
        "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[], $5::int[], $6::text[], "
        "$7::text[], $8::text[], $9::int[], $10::timestamptz[], $11::text[], $12::text[], "
        "$13::timestamptz[], $14::uuid[], $15::bigint[]) AS b(supervisor_id, state, phase, "
        "activity, progress, error, tasks, questions, restorations, restored_at, source, "
        "checkpoint, heartbeat, owner, epoch) "
        f"{_STATE_UPSERT} RETURNING supervisor_id, version",
        [s.supervisor_id for s in states],
        [s.state.value for s in states],
        [s.phase for s in states],
        [s.current_activity for s in states],
        [s.progress for s in states],
        [s.error_message for s in states],
        [json.dumps([str(t) for t in s.spawned_task_ids]) for s in states],
        [json.dumps([q.to_json() for q in s.pending_questions]) for s in states],
        [s.restoration_count for s in states],
        [s.last_restored_at for s in states],
        [None if s.restoration_source is None else s.restoration_source.value for s in states],
        [None if s.checkpoint_data is None else json.dumps(s.checkpoint_data) for s in states],
        [s.last_heartbeat for s in states],
        [s.owner_daemon_id for s in states],
        [s.lease_epoch for s in states],
    )
    return {r["supervisor_id"]: int(r["version"]) for r in rows}


async def mark_supervisor_restored(
    db: Db, supervisor_id: uuid.UUID, source: RestorationSource
) -> tuple[int, datetime] | None:
    """Count one restoration. Returns (restoration_count, last_restored_at)."""
    row = await db.fetchrow(
        "UPDATE supervisor_states SET restoration_count = COALESCE(restoration_count, 0) + 1, "
        f"last_restored_at = now(), restoration_source = $2, {_BUMP} "
        "WHERE supervisor_id = $1 RETURNING restoration_count, last_restored_at",
        supervisor_id,
        source.value,
    )
    return None if row is None else (int(row[0]), row[1])


async def mark_supervisors_restored(
    db: Db,
    supervisor_ids: Sequence[uuid.UUID],
    source: RestorationSource,
    *,
    unless_past: Mapping[uuid.UUID, int] | None = None,
    fences: Mapping[uuid.UUID, Fence] | None = None,
) -> dict[uuid.UUID, tuple[int, int]]:
    """Bulk form of :func:`mark_supervisor_restored` (one statement for many).

    Returns each supervisor's restoration count and row version. With
    ``unless_past`` (each supervisor's row version before this count: for a
    retry whose first attempt may have committed unseen), a row whose version
    has moved past it was counted already and is left as it is. ``fences``: each
    one's owner and epoch (none: nobody's, epoch 0); a row they do not match is
    not counted and not returned.
    """
    versions = [-1 if unless_past is None else unless_past.get(sid, -1) for sid in supervisor_ids]
    held = [NO_FENCE if fences is None else fences.get(sid, NO_FENCE) for sid in supervisor_ids]
    count = "NOT $4 OR st.version <= b.version"  # re-checked on the newest row after a lock wait
    rows = await db.fetch(
        "UPDATE supervisor_states AS st SET "
        f"restoration_count = CASE WHEN {count} "
        "THEN COALESCE(st.restoration_count, 0) + 1 ELSE st.restoration_count END, "
        f"last_restored_at = CASE WHEN {count} THEN now() ELSE st.last_restored_at END, "
        f"restoration_source = CASE WHEN {count} THEN $2 ELSE st.restoration_source END, "
        f"version = CASE WHEN {count} THEN st.version + 1 ELSE st.version END, "
        f"updated_at = CASE WHEN {count} THEN now() ELSE st.updated_at END "
        "FROM unnest($1::uuid[], $3::bigint[], $5::uuid[], $6::bigint[]) "
        "AS b(supervisor_id, version, owner, epoch) "
        "WHERE st.supervisor_id = b.supervisor_id "
        "AND st.owner_daemon_id IS NOT DISTINCT FROM b.owner AND st.lease_epoch = b.epoch "
        "RETURNING st.supervisor_id, st.restoration_count, st.version",
        list(supervisor_ids),
        source.value,
        versions,
        unless_past is not None,
        [f.owner for f in held],
        [f.epoch for f in held],
    )
    return {r["supervisor_id"]: (int(r["restoration_count"]), int(r["version"])) for r in rows}


async def get_supervisors_with_pending_questions(db: Db) -> list[SupervisorState]:
    """Unfinished supervisors that have at least one pending question."""
    rows = await db.fetch(
        f"SELECT {_STATE} FROM supervisor_states st "
        "WHERE st.pending_questions != '[]'::jsonb AND st.state = ANY($1::text[]) "
        "ORDER BY st.created_at",
        _UNFINISHED,
    )
    return [SupervisorState.from_row(r) for r in rows]


async def get_supervisor_state_for_restoration(
    db: Db, supervisor_id: uuid.UUID
) -> SupervisorState | None:
    row = await db.fetchrow(
        f"SELECT {_STATE} FROM supervisor_states st WHERE st.supervisor_id = $1", supervisor_id
    )
    return _state(row)


async def get_unfinished_supervisor_states(db: Db) -> list[SupervisorState]:
    """Bulk load for restoration at startup: every unfinished state row."""
    rows = await db.fetch(
        f"SELECT {_STATE} FROM supervisor_states st WHERE st.state = ANY($1::text[]) "
        "ORDER BY st.created_at",
        _UNFINISHED,
    )
    return [SupervisorState.from_row(r) for r in rows]


async def load_unfinished_supervisor_states(
    db: Db,
) -> list[tuple[uuid.UUID, SupervisorState | InvalidValueError]]:
    """Like :func:`get_unfinished_supervisor_states`, but a row that cannot be read
    comes back as its error instead of failing the whole load. Rows whose state
    is not a terminal one count as unfinished (an unknown state too)."""
    rows = await db.fetch(
        f"SELECT {_STATE} FROM supervisor_states st "
        "WHERE st.state IS DISTINCT FROM 'completed' AND st.state IS DISTINCT FROM 'failed' "
        "ORDER BY st.created_at, st.supervisor_id"
    )
    out: list[tuple[uuid.UUID, SupervisorState | InvalidValueError]] = []
    for row in rows:
        try:
            out.append((row["supervisor_id"], SupervisorState.from_row(row)))
        except InvalidValueError as exc:
            out.append((row["supervisor_id"], exc))
    return out


async def load_supervisor_states(
    db: Db, supervisor_ids: Sequence[uuid.UUID]
) -> list[tuple[uuid.UUID, SupervisorState | InvalidValueError]]:
    """The named supervisors' state rows (a claim's), each read alone: a row that
    cannot be read comes back as its error."""
    rows = await db.fetch(
        f"SELECT {_STATE} FROM supervisor_states st WHERE st.supervisor_id = ANY($1::uuid[]) "
        "ORDER BY st.created_at, st.supervisor_id",
        list(supervisor_ids),
    )
    out: list[tuple[uuid.UUID, SupervisorState | InvalidValueError]] = []
    for row in rows:
        try:
            out.append((row["supervisor_id"], SupervisorState.from_row(row)))
        except InvalidValueError as exc:
            out.append((row["supervisor_id"], exc))
    return out


async def get_supervisor_specs(
    db: Db, supervisor_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, SupervisorSpec]:
    rows = await db.fetch(
        f"SELECT {_SPEC} FROM supervisors sp WHERE sp.supervisor_id = ANY($1::uuid[])",
        list(supervisor_ids),
    )
    return {r["supervisor_id"]: SupervisorSpec.from_row(r) for r in rows}


async def get_tasks_for_supervisors(
    db: Db, supervisor_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[TaskRecord]]:
    rows = await db.fetch(
        f"SELECT {_TASK} FROM tasks WHERE supervisor_id = ANY($1::uuid[]) "
        "ORDER BY created_at, task_id",
        list(supervisor_ids),
    )
    return _by_supervisor(supervisor_ids, rows, TaskRecord.from_row)


async def get_questions_for_supervisors(
    db: Db, supervisor_ids: Sequence[uuid.UUID]
) -> dict[uuid.UUID, list[QuestionRecord]]:
    rows = await db.fetch(
        f"SELECT {_QUESTION} FROM questions WHERE supervisor_id = ANY($1::uuid[]) "
        "ORDER BY asked_at, question_id",
        list(supervisor_ids),
    )
    return _by_supervisor(supervisor_ids, rows, QuestionRecord.from_row)


async def get_checkpointed_supervisors(
    db: Db, supervisor_ids: Sequence[uuid.UUID]
) -> set[uuid.UUID]:
    rows = await db.fetch(
        "SELECT DISTINCT supervisor_id FROM supervisor_checkpoints "
        "WHERE supervisor_id = ANY($1::uuid[])",
        list(supervisor_ids),
    )
    return {r["supervisor_id"] for r in rows}


async def record_question_rows(
    db: Db,
    supervisor_id: uuid.UUID,
    questions: Sequence[PendingQuestion],
    fence: Fence = NO_FENCE,
) -> None:
    """Give pending questions that lack one a row in ``questions`` (repair)."""
    if not questions:
        return
    row = await db.fetchrow(
        f"WITH {_fence_cte(1, 7, 8)}, "
        "ins AS (INSERT INTO questions (question_id, supervisor_id, question, choices, context, "
        "asked_at) SELECT q.id, $1, q.question, q.choices, q.context, q.asked_at "
        "FROM unnest($2::uuid[], $3::text[], $4::jsonb[], $5::text[], $6::timestamptz[]) "
        "AS q(id, question, choices, context, asked_at) WHERE EXISTS (SELECT 1 FROM f) "
        "ON CONFLICT (question_id) DO NOTHING) "
        f"SELECT $1::uuid AS for_supervisor, EXISTS (SELECT 1 FROM f) AS held, {_present(1)}",
        supervisor_id,
        [q.id for q in questions],
        [q.question for q in questions],
        [list(q.choices) for q in questions],
        [q.context for q in questions],
        [q.asked_at for q in questions],
        fence.owner,
        fence.epoch,
    )
    assert row is not None
    _held(row)


async def mark_answers_delivered(
    db: Db,
    question_ids: Sequence[uuid.UUID],
    supervisor_id: uuid.UUID | None = None,
    fence: Fence = NO_FENCE,
) -> int:
    """Mark delivered the answers of one supervisor's questions (fenced), or, with no
    supervisor given, of any (restoration's repairs and tests)."""
    row = await db.fetchrow(
        "WITH f AS (SELECT 1 FROM supervisor_states WHERE supervisor_id = $2::uuid "
        f"AND {_fenced(3, 4)} FOR SHARE), "
        "d AS (UPDATE questions SET delivered_at = now() WHERE question_id = ANY($1::uuid[]) "
        "AND answer IS NOT NULL AND delivered_at IS NULL "
        "AND ($2::uuid IS NULL OR (supervisor_id = $2 AND EXISTS (SELECT 1 FROM f))) "
        "RETURNING 1) "
        "SELECT $2::uuid AS for_supervisor, (SELECT count(*) FROM d) AS n, "
        f"($2::uuid IS NULL OR EXISTS (SELECT 1 FROM f)) AS held, {_present(2)}",
        list(question_ids),
        supervisor_id,
        fence.owner,
        fence.epoch,
    )
    assert row is not None
    _held(row)
    return int(row["n"])


async def validate_spawned_tasks(db: Db, supervisor_id: uuid.UUID) -> SpawnedTaskConsistency:
    """Compare ``spawned_task_ids`` with the ``tasks`` rows of a supervisor."""
    row = await db.fetchrow(
        "WITH listed AS (SELECT DISTINCT unnest(spawned_task_ids) AS task_id "
        "FROM supervisor_states WHERE supervisor_id = $1), "
        "present AS (SELECT task_id FROM tasks WHERE supervisor_id = $1) "
        "SELECT "
        "COALESCE((SELECT array_agg(task_id ORDER BY task_id) FROM listed "
        "WHERE task_id NOT IN (SELECT task_id FROM present)), ARRAY[]::uuid[]) AS missing, "
        "COALESCE((SELECT array_agg(task_id ORDER BY task_id) FROM present "
        "WHERE task_id NOT IN (SELECT task_id FROM listed)), ARRAY[]::uuid[]) AS unlisted",
        supervisor_id,
    )
    assert row is not None
    return SpawnedTaskConsistency(
        missing_task_rows=tuple(row["missing"]), unlisted_task_ids=tuple(row["unlisted"])
    )


async def update_supervisor_phase(db: Db, supervisor_id: uuid.UUID, phase: str) -> int | None:
    """Save point on a phase change. Returns the new version."""
    value = await db.fetchval(
        f"UPDATE supervisor_states SET phase = $2, {_BUMP} "
        "WHERE supervisor_id = $1 RETURNING version",
        supervisor_id,
        phase,
    )
    return None if value is None else int(value)


async def update_supervisor_heartbeat_state(
    db: Db,
    supervisor_id: uuid.UUID,
    state: SupervisorStateEnum,
    current_activity: str | None,
    progress: int,
) -> bool:
    """Lightweight heartbeat: ``last_heartbeat`` (database clock), state, activity, progress."""
    value = await db.fetchval(
        "UPDATE supervisor_states SET last_heartbeat = now(), state = $2, "
        "current_activity = $3, progress = $4, updated_at = now() "
        "WHERE supervisor_id = $1 RETURNING 1",
        supervisor_id,
        state.value,
        current_activity,
        progress,
    )
    return value is not None


async def update_supervisors_heartbeat_bulk(
    db: Db, beats: Sequence[Heartbeat]
) -> dict[uuid.UUID, tuple[int, bool]]:
    """Heartbeat many supervisors in one statement.

    Every row whose state is the beat's gets ``last_heartbeat``; its activity
    and progress are written only when its version is the beat's (see
    :class:`~makima.model.Heartbeat`). A row whose state differs (a save point
    committed since the beat was taken) is left alone, and so is a row the beat's
    fence does not hold. Returns, for each row touched, its version and whether
    activity and progress were written.
    """
    if not beats:
        return {}
    rows = await db.fetch(
        "UPDATE supervisor_states AS st SET last_heartbeat = now(), updated_at = now(), "
        "current_activity = CASE WHEN st.version = b.version "
        "THEN b.activity ELSE st.current_activity END, "
        "progress = CASE WHEN st.version = b.version THEN b.progress ELSE st.progress END "
        "FROM unnest($1::uuid[], $2::text[], $3::text[], $4::int[], $5::bigint[], "
        "$6::uuid[], $7::bigint[]) "
        "AS b(supervisor_id, state, activity, progress, version, owner, epoch) "
        "WHERE st.supervisor_id = b.supervisor_id AND st.state = b.state "
        "AND st.owner_daemon_id IS NOT DISTINCT FROM b.owner AND st.lease_epoch = b.epoch "
        "RETURNING st.supervisor_id, st.version, st.version = b.version AS written",
        [b.supervisor_id for b in beats],
        [b.state.value for b in beats],
        [b.current_activity for b in beats],
        [b.progress for b in beats],
        [b.version for b in beats],
        [b.fence.owner for b in beats],
        [b.fence.epoch for b in beats],
    )
    return {r["supervisor_id"]: (int(r["version"]), bool(r["written"])) for r in rows}


# --------------------------------------------------------------------------- tasks

_TASK = (
    "task_id, supervisor_id, name, command, cwd, env, status, exit_code, output_tail, "
    "attempts, created_at, started_at, finished_at"
)


_TASK_COLUMNS = [c.strip() for c in _TASK.split(",")]
_TASK_T = ", ".join(f"t.{c}" for c in _TASK_COLUMNS)


def _spawned(row: asyncpg.Record) -> tuple[TaskRecord, int]:
    version = _version_required(row)
    return TaskRecord.from_row(row), version


TASK_SPAWNED: Statement[tuple[TaskRecord, int]] = Statement(
    "task_spawned",
    # The list entry, the optional state and the row, in one statement; on a
    # repeat (idempotent by task_id) the existing row comes back (DO UPDATE
    # returns it, DO NOTHING would not).
    "WITH st AS (UPDATE supervisor_states SET spawned_task_ids = CASE "
    "WHEN $1::uuid = ANY(spawned_task_ids) THEN spawned_task_ids "
    "ELSE array_append(COALESCE(spawned_task_ids, ARRAY[]::uuid[]), $1::uuid) END, "
    f"state = COALESCE($8::text, state), {_BUMP} "
    f"WHERE supervisor_id = $2 AND {_fenced(9, 10)} RETURNING supervisor_id, version), "
    "t AS (INSERT INTO tasks (task_id, supervisor_id, name, command, cwd, env, status) "
    "SELECT $1, st.supervisor_id, $3, $4, $5, $6, $7 FROM st "
    "ON CONFLICT (task_id) DO UPDATE SET supervisor_id = tasks.supervisor_id "
    f"RETURNING {_TASK}) "
    f"SELECT $2::uuid AS for_supervisor, st.version, {_TASK_T}, "
    "EXISTS (SELECT 1 FROM supervisor_states WHERE supervisor_id = $2) AS present "
    "FROM (SELECT 1) AS one LEFT JOIN st ON true LEFT JOIN t ON true",
    _spawned,
)


def task_spawned(
    task: TaskRecord, state: SupervisorStateEnum | None = None, fence: Fence = NO_FENCE
) -> Bound[tuple[TaskRecord, int]]:
    return Bound(
        TASK_SPAWNED,
        (
            task.task_id,
            task.supervisor_id,
            task.name,
            list(task.command),
            task.cwd,
            dict(task.env),
            task.status.value,
            None if state is None else state.value,
            fence.owner,
            fence.epoch,
        ),
    )


async def create_task(
    db: Db, task: TaskRecord, state: SupervisorStateEnum | None = None
) -> TaskRecord:
    """Save point on task spawn: the row and the supervisor's list (and, given, its
    new state) in one statement.

    Idempotent by ``task_id``. Raises NotFoundError for an unknown supervisor.
    """
    record, _ = await task_spawned(task, state).run(db)
    return record


TASK_STARTED: Statement[TaskRecord | None] = Statement(
    "task_started",
    f"WITH {_fence_cte(2, 3, 4)}, "
    "t AS (UPDATE tasks SET status = 'running', attempts = attempts + 1, "
    "started_at = now(), finished_at = NULL, exit_code = NULL "
    "WHERE task_id = $1 AND supervisor_id = $2 AND status IN ('pending', 'running', "
    f"'interrupted') AND EXISTS (SELECT 1 FROM f) RETURNING {_TASK}) "
    f"SELECT $2::uuid AS for_supervisor, EXISTS (SELECT 1 FROM f) AS held, {_present(2)}, "
    f"{_TASK_T} FROM (SELECT 1) AS one LEFT JOIN t ON true",
    _task_or_none,
)


def task_started(
    task_id: uuid.UUID, supervisor_id: uuid.UUID, fence: Fence = NO_FENCE
) -> Bound[TaskRecord | None]:
    return Bound(TASK_STARTED, (task_id, supervisor_id, fence.owner, fence.epoch))


async def mark_task_running(
    db: Db, task_id: uuid.UUID, supervisor_id: uuid.UUID, fence: Fence = NO_FENCE
) -> TaskRecord | None:
    """A new attempt of the task's process has started."""
    return await task_started(task_id, supervisor_id, fence).run(db)


TASK_FINISHED: Statement[TaskRecord | None] = Statement(
    "task_finished",
    f"WITH {_fence_cte(5, 6, 7)}, "
    "t AS (UPDATE tasks SET status = $2, exit_code = $3, output_tail = $4, "
    "finished_at = now() "
    "WHERE task_id = $1 AND supervisor_id = $5 AND status IN ('pending', 'running') "
    f"AND EXISTS (SELECT 1 FROM f) RETURNING {_TASK}) "
    f"SELECT $5::uuid AS for_supervisor, EXISTS (SELECT 1 FROM f) AS held, {_present(5)}, "
    f"{_TASK_T} FROM (SELECT 1) AS one LEFT JOIN t ON true",
    _task_or_none,
)


def task_finished(
    task_id: uuid.UUID,
    status: TaskStatus,
    exit_code: int | None,
    output_tail: str | None,
    supervisor_id: uuid.UUID,
    fence: Fence = NO_FENCE,
) -> Bound[TaskRecord | None]:
    if not status.is_finished:
        raise ValueError(f"finish_task needs a final status; got {status.value!r}")
    return Bound(
        TASK_FINISHED,
        (task_id, status.value, exit_code, output_tail, supervisor_id, fence.owner, fence.epoch),
    )


async def finish_task(
    db: Db,
    task_id: uuid.UUID,
    status: TaskStatus,
    exit_code: int | None,
    output_tail: str | None,
    supervisor_id: uuid.UUID,
    fence: Fence = NO_FENCE,
) -> TaskRecord | None:
    """Record a final status. None if the task is unknown or already finished."""
    bound = task_finished(task_id, status, exit_code, output_tail, supervisor_id, fence)
    return await bound.run(db)


async def get_task(db: Db, task_id: uuid.UUID) -> TaskRecord | None:
    row = await db.fetchrow(f"SELECT {_TASK} FROM tasks WHERE task_id = $1", task_id)
    return None if row is None else TaskRecord.from_row(row)


async def get_tasks_for_supervisor(db: Db, supervisor_id: uuid.UUID) -> list[TaskRecord]:
    rows = await db.fetch(
        f"SELECT {_TASK} FROM tasks WHERE supervisor_id = $1 ORDER BY created_at, task_id",
        supervisor_id,
    )
    return [TaskRecord.from_row(r) for r in rows]


async def interrupt_unfinished_tasks(db: Db, supervisor_id: uuid.UUID) -> list[TaskRecord]:
    """Mark every pending or running task of a supervisor ``interrupted``."""
    return await end_unfinished_tasks(db, supervisor_id, TaskStatus.INTERRUPTED)


async def cancel_unfinished_tasks(db: Db, supervisor_id: uuid.UUID) -> list[TaskRecord]:
    """Mark every pending or running task of a supervisor ``cancelled`` (it ended)."""
    return await end_unfinished_tasks(db, supervisor_id, TaskStatus.CANCELLED)


async def _fenced_tasks(
    db: Db, supervisor_id: uuid.UUID, fence: Fence, sql: str, *args: Any
) -> list[TaskRecord]:
    """Run ``sql`` (an UPDATE of one supervisor's tasks RETURNING them, its own
    parameters from $4 on, ``EXISTS (SELECT 1 FROM f)`` in its condition) under the
    fence ($1 the supervisor, $2 owner, $3 epoch); FencedError when it does not hold."""
    rows = await db.fetch(
        f"WITH {_fence_cte(1, 2, 3)}, w AS ({sql}) "
        f"SELECT $1::uuid AS for_supervisor, EXISTS (SELECT 1 FROM f) AS held, {_present(1)}, "
        "w.* FROM (SELECT 1) AS one LEFT JOIN w ON true",
        supervisor_id,
        fence.owner,
        fence.epoch,
        *args,
    )
    _held(rows[0])
    return [TaskRecord.from_row(r) for r in rows if r["task_id"] is not None]


async def end_unfinished_tasks(
    db: Db, supervisor_id: uuid.UUID, status: TaskStatus, fence: Fence = NO_FENCE
) -> list[TaskRecord]:
    """Mark every pending or running task of a supervisor ``status``."""
    return await _fenced_tasks(
        db,
        supervisor_id,
        fence,
        "UPDATE tasks SET status = $4, finished_at = now() "
        "WHERE supervisor_id = $1 AND status IN ('pending', 'running') "
        f"AND EXISTS (SELECT 1 FROM f) RETURNING {_TASK}",
        status.value,
    )


async def requeue_interrupted_tasks(
    db: Db, supervisor_id: uuid.UUID, since: datetime | None, fence: Fence = NO_FENCE
) -> list[TaskRecord]:
    """Put back to ``pending`` the tasks interrupted after ``since`` (all, with None).

    Restoration passes the supervisor's last restoration time: a task interrupted
    since then was stopped with the agent that ran it (the daemon's or the agent's
    stop), and no restored agent has been told of it, so it may run again.
    """
    return await _fenced_tasks(
        db,
        supervisor_id,
        fence,
        "UPDATE tasks SET status = 'pending', finished_at = NULL, exit_code = NULL "
        "WHERE supervisor_id = $1 AND status = 'interrupted' "
        "AND ($4::timestamptz IS NULL OR finished_at > $4) "
        f"AND EXISTS (SELECT 1 FROM f) RETURNING {_TASK}",
        since,
    )


# --------------------------------------------------------------------------- messages, checkpoints


def _seq(row: asyncpg.Record) -> int:
    if not _held(row):
        raise NotFoundError(f"no supervisor {row['for_supervisor']}")
    return int(row["seq"])


MESSAGE_ADDED: Statement[int] = Statement(
    "message_added",
    # One message when the fence holds: the aggregate yields one row.
    f"WITH {_fence_cte(1, 4, 5)}, "
    "m AS (INSERT INTO supervisor_messages (supervisor_id, seq, role, content) "
    "SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3 FROM supervisor_messages "
    "WHERE supervisor_id = $1 HAVING EXISTS (SELECT 1 FROM f) RETURNING seq) "
    "SELECT $1::uuid AS for_supervisor, EXISTS (SELECT 1 FROM f) AS held, "
    f"{_present(1)}, (SELECT seq FROM m) AS seq",
    _seq,
)


def message_added(
    supervisor_id: uuid.UUID, role: str, content: Any, fence: Fence = NO_FENCE
) -> Bound[int]:
    return Bound(MESSAGE_ADDED, (supervisor_id, role, content, fence.owner, fence.epoch))


async def append_supervisor_message(
    db: Db, supervisor_id: uuid.UUID, role: str, content: Any, fence: Fence = NO_FENCE
) -> int:
    """Append to the conversation history. Returns the message's ``seq``.

    A supervisor's messages are written by its one agent in order; two
    concurrent appends for the same supervisor would collide on the key and
    one would fail rather than be lost.
    """
    return await message_added(supervisor_id, role, content, fence).run(db)


async def get_supervisor_messages(
    db: Db, supervisor_id: uuid.UUID, limit: int | None = None, *, before: int | None = None
) -> list[MessageRecord]:
    """The conversation history in order; with ``limit``, only the last ``limit``
    entries; with ``before``, only entries whose ``seq`` is below it."""
    rows = await db.fetch(
        "SELECT * FROM (SELECT supervisor_id, seq, role, content, created_at "
        "FROM supervisor_messages WHERE supervisor_id = $1 AND ($3::bigint IS NULL OR seq < $3) "
        "ORDER BY seq DESC LIMIT $2) m "
        "ORDER BY seq",
        supervisor_id,
        limit,
        before,
    )
    return [MessageRecord.from_row(r) for r in rows]


async def get_histories(
    db: Db, supervisor_ids: Sequence[uuid.UUID], limit: int
) -> dict[uuid.UUID, list[MessageRecord]]:
    """The last ``limit`` history entries of each supervisor, in order, in one
    statement (an index scan per supervisor, not a sort of every message)."""
    rows = await db.fetch(
        "SELECT m.supervisor_id, m.seq, m.role, m.content, m.created_at "
        "FROM unnest($1::uuid[]) AS s(id) CROSS JOIN LATERAL ("
        "SELECT supervisor_id, seq, role, content, created_at FROM supervisor_messages "
        "WHERE supervisor_id = s.id ORDER BY seq DESC LIMIT $2) m "
        "ORDER BY m.supervisor_id, m.seq",
        list(supervisor_ids),
        limit,
    )
    histories: dict[uuid.UUID, list[MessageRecord]] = {}
    for row in rows:
        histories.setdefault(row["supervisor_id"], []).append(MessageRecord.from_row(row))
    return histories


async def save_supervisor_checkpoint(
    db: Db, supervisor_id: uuid.UUID, snapshot: SupervisorState, reason: str
) -> int:
    """Keep a full snapshot. Returns its ``seq``."""
    value = await db.fetchval(
        "INSERT INTO supervisor_checkpoints (supervisor_id, seq, snapshot, reason) "
        "SELECT $1, COALESCE(MAX(seq), 0) + 1, $2, $3 FROM supervisor_checkpoints "
        "WHERE supervisor_id = $1 RETURNING seq",
        supervisor_id,
        snapshot.to_json(),
        reason,
    )
    return int(value)


def _with_checkpoint(name: str, columns: str) -> Statement[int]:
    """The state row's ``columns`` (from $2 on) and a checkpoint row holding the
    whole state ($6, with the reason $7), in one statement. Its ``seq`` follows the
    supervisor's last one, as for messages: two concurrent ones for one supervisor
    would collide, not be lost."""
    sets = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns.split(), start=2))
    return Statement(
        name,
        f"WITH st AS (UPDATE supervisor_states SET {sets}, {_BUMP} "
        f"WHERE supervisor_id = $1 AND {_fenced(8, 9)} RETURNING supervisor_id, version), "
        "cp AS (INSERT INTO supervisor_checkpoints (supervisor_id, seq, snapshot, reason) "
        "SELECT st.supervisor_id, COALESCE((SELECT MAX(c.seq) FROM supervisor_checkpoints c "
        "WHERE c.supervisor_id = $1), 0) + 1, $6, $7 FROM st) "
        f"SELECT $1::uuid AS for_supervisor, (SELECT version FROM st) AS version, {_PRESENT}",
        _version_required,
    )


PHASE_CHANGE = _with_checkpoint("phase_change", "phase state current_activity progress")
CHECKPOINT_SAVED = _with_checkpoint(
    "checkpoint_saved", "checkpoint_data state current_activity progress"
)


def phase_change(snapshot: SupervisorState) -> Bound[int]:
    return Bound(
        PHASE_CHANGE,
        (
            snapshot.supervisor_id,
            snapshot.phase,
            snapshot.state.value,
            snapshot.current_activity,
            snapshot.progress,
            snapshot.to_json(),
            "phase_change",
            snapshot.owner_daemon_id,
            snapshot.lease_epoch,
        ),
    )


def checkpoint_saved(snapshot: SupervisorState) -> Bound[int]:
    return Bound(
        CHECKPOINT_SAVED,
        (
            snapshot.supervisor_id,
            snapshot.checkpoint_data,
            snapshot.state.value,
            snapshot.current_activity,
            snapshot.progress,
            snapshot.to_json(),
            "explicit",
            snapshot.owner_daemon_id,
            snapshot.lease_epoch,
        ),
    )


async def record_phase_change(db: Db, snapshot: SupervisorState) -> int:
    """Save point on a phase change: phase, state, activity and progress, plus a
    checkpoint row holding the whole state, in one statement. Returns the version."""
    return await phase_change(snapshot).run(db)


async def record_agent_checkpoint(db: Db, snapshot: SupervisorState) -> int:
    """Save point on the agent's ``checkpoint``: its data in the state row and a
    checkpoint row holding the whole state, in one statement. Returns the version."""
    return await checkpoint_saved(snapshot).run(db)


async def get_latest_supervisor_checkpoint(
    db: Db, supervisor_id: uuid.UUID
) -> CheckpointRecord | None:
    row = await db.fetchrow(
        "SELECT supervisor_id, seq, snapshot, reason, created_at FROM supervisor_checkpoints "
        "WHERE supervisor_id = $1 ORDER BY seq DESC LIMIT 1",
        supervisor_id,
    )
    return None if row is None else CheckpointRecord.from_row(row)


# --------------------------------------------------------------------------- questions

_QUESTION = (
    "question_id, supervisor_id, question, choices, context, asked_at, answer, answered_at, "
    "answered_by_uid, delivered_at, redelivery_count"
)


QUESTION_ASKED: Statement[int] = Statement(
    "question_asked",
    "WITH st AS (UPDATE supervisor_states SET pending_questions = CASE "
    "WHEN COALESCE(pending_questions, '[]'::jsonb) "
    "@> jsonb_build_array(jsonb_build_object('id', $2::uuid::text)) "
    "THEN pending_questions "
    "ELSE COALESCE(pending_questions, '[]'::jsonb) || jsonb_build_array($3::jsonb) END, "
    f"state = $8, {_BUMP} WHERE supervisor_id = $1 AND {_fenced(9, 10)} "
    "RETURNING supervisor_id, version), "
    "q AS (INSERT INTO questions (question_id, supervisor_id, question, choices, context, "
    "asked_at) SELECT $2, st.supervisor_id, $4, $5, $6, $7 FROM st "
    "ON CONFLICT (question_id) DO NOTHING) "
    f"SELECT $1::uuid AS for_supervisor, (SELECT version FROM st) AS version, {_PRESENT}",
    _version_required,
)


def question_asked(
    supervisor_id: uuid.UUID,
    question: PendingQuestion,
    state: SupervisorStateEnum,
    fence: Fence = NO_FENCE,
) -> Bound[int]:
    return Bound(
        QUESTION_ASKED,
        (
            supervisor_id,
            question.id,
            question.to_json(),
            question.question,
            list(question.choices),
            question.context,
            question.asked_at,
            state.value,
            fence.owner,
            fence.epoch,
        ),
    )


async def record_question_asked(
    db: Db,
    supervisor_id: uuid.UUID,
    question: PendingQuestion,
    state: SupervisorStateEnum,
) -> int:
    """Save point on a question: its row, the pending entry and the state, in one statement.

    Idempotent by question id. Returns the supervisor's new version.
    """
    return await question_asked(supervisor_id, question, state).run(db)


_ANSWER = (
    # The question, locked: after a concurrent answer's commit this is its newest
    # version (READ COMMITTED), so a second answer sees the first.
    f"WITH cur AS (SELECT {_QUESTION} FROM questions WHERE question_id = $1 FOR UPDATE), "
    # The answer, only on an unanswered question, an acceptable text ($5) and one
    # of the choices (if it has any).
    "upd AS (UPDATE questions AS q SET answer = $2, answered_at = now(), answered_by_uid = $3 "
    "FROM cur WHERE q.question_id = cur.question_id AND cur.answer IS NULL AND $5::boolean "
    "AND (jsonb_array_length(cur.choices) = 0 OR cur.choices ? $2) "
    "RETURNING q.supervisor_id, q.answered_at), "
    # Out of pending_questions (a person's answer, whoever runs the supervisor), and
    # the state: the owner's (its fence held) gives it; otherwise the last open
    # question answered moves waiting_for_user on to working, as the owner will.
    # Everything is computed from the row being updated, so that after a lock wait
    # (a claim, an ask) PostgreSQL re-evaluates it on the newest row version.
    "st AS (UPDATE supervisor_states AS s SET pending_questions = COALESCE(("
    "SELECT jsonb_agg(e.q ORDER BY e.n) FROM jsonb_array_elements(s.pending_questions) "
    "WITH ORDINALITY AS e(q, n) WHERE e.q->>'id' IS DISTINCT FROM $1::uuid::text), "
    "'[]'::jsonb), "
    f"state = CASE WHEN $8::boolean AND {_fenced(6, 7, 's')} THEN COALESCE($4::text, s.state) "
    "WHEN s.state = 'waiting_for_user' AND NOT EXISTS (SELECT 1 FROM "
    "jsonb_array_elements(s.pending_questions) AS o(q) "
    "WHERE o.q->>'id' IS DISTINCT FROM $1::uuid::text) THEN 'working' ELSE s.state END, "
    "version = s.version + 1, updated_at = now() "
    "FROM upd WHERE s.supervisor_id = upd.supervisor_id AND (($4::text IS NOT NULL "
    f"AND $8::boolean AND {_fenced(6, 7, 's')}) "
    "OR s.pending_questions @> jsonb_build_array(jsonb_build_object('id', $1::uuid::text))) "
    f"RETURNING ($8::boolean AND {_fenced(6, 7, 's')}) AS owner) "
    "SELECT cur.*, upd.answered_at AS new_answered_at, upd.supervisor_id IS NOT NULL AS written, "
    "(NOT $8::boolean OR COALESCE((SELECT owner FROM st), EXISTS (SELECT 1 "
    f"FROM supervisor_states s2 WHERE s2.supervisor_id = cur.supervisor_id "
    f"AND {_fenced(6, 7, 's2')}))) AS held "
    "FROM cur LEFT JOIN upd ON true"
)


async def answer_question(
    db: Db,
    question_id: uuid.UUID,
    answer: str,
    answered_by_uid: int | None,
    *,
    state: SupervisorStateEnum | None = None,
    retry: bool = False,
    fence: Fence | None = None,
) -> QuestionRecord:
    """Record the one answer to a question and drop it from ``pending_questions``;
    with ``state``, also move the supervisor to that state.

    One statement: it reads the question (locked), checks and writes the answer,
    and updates the supervisor's row. Raises NotFoundError for an unknown
    question, ConflictError (with the existing answer in ``data``) when it was
    answered already, InvalidAnswerError when ``answer`` is not one of the
    choices. With ``retry`` (this call repeats one whose outcome was lost with
    its connection), the same answer by the same uid already recorded is that
    call's own commit: it is returned, not refused. With ``fence`` (the owner's
    answer), the supervisor's row is written only if the fence holds; the answer
    is recorded either way, and FencedError (after the commit) says the fence
    did not hold: the supervisor runs elsewhere now, and its new owner takes the
    answer from the row.
    """
    acceptable = isinstance(answer, str) and bool(answer.strip())
    row = await db.fetchrow(
        _ANSWER,
        question_id,
        answer,
        answered_by_uid,
        None if state is None else state.value,
        acceptable,
        None if fence is None else fence.owner,
        0 if fence is None else fence.epoch,
        fence is not None,
    )
    if row is None:
        raise NotFoundError(f"no question {question_id}")
    existing = QuestionRecord.from_row(row)
    if row["written"] and not row["held"]:
        raise AnsweredElsewhereError(
            existing.supervisor_id,
            dataclasses.replace(
                existing,
                answer=answer,
                answered_at=row["new_answered_at"],
                answered_by_uid=answered_by_uid,
            ),
        )
    if row["written"]:
        return dataclasses.replace(
            existing,
            answer=answer,
            answered_at=row["new_answered_at"],
            answered_by_uid=answered_by_uid,
        )
    if retry and (existing.answer, existing.answered_by_uid) == (answer, answered_by_uid):
        if not row["held"]:  # its own commit, but the supervisor runs elsewhere now
            raise AnsweredElsewhereError(existing.supervisor_id, existing)
        return existing
    if existing.is_answered:
        raise ConflictError(
            f"question {question_id} was already answered: {_clip(existing.answer)}",
            {
                "question_id": str(question_id),
                "answer": existing.answer,
                "answered_at": existing.answered_at.isoformat() if existing.answered_at else None,
            },
        )
    check_answer(answer, existing.choices)  # raises: not acceptable, or not a choice
    raise MakimaError(f"question {question_id} was not answered, for no reason found")


class AnsweredElsewhereError(FencedError):
    """The answer was recorded, but the supervisor is owned elsewhere now: the
    record is in ``record`` (its new owner delivers it)."""

    def __init__(self, supervisor_id: uuid.UUID, record: QuestionRecord) -> None:
        super().__init__(supervisor_id, "the answer's change to its state")
        self.record = record


def _clip(text: str | None, limit: int = 60) -> str:
    """``text`` quoted on one line, cut to about ``limit`` characters."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"


async def get_question(db: Db, question_id: uuid.UUID) -> QuestionRecord | None:
    row = await db.fetchrow(
        f"SELECT {_QUESTION} FROM questions WHERE question_id = $1", question_id
    )
    return None if row is None else QuestionRecord.from_row(row)


async def list_open_questions(
    db: Db, supervisor_id: uuid.UUID | None = None
) -> list[QuestionRecord]:
    """Unanswered questions of unfinished supervisors, oldest first."""
    rows = await db.fetch(
        f"SELECT {', '.join('q.' + c.strip() for c in _QUESTION.split(','))} "
        "FROM questions q JOIN supervisor_states st USING (supervisor_id) "
        "WHERE q.answer IS NULL AND st.state = ANY($2::text[]) "
        "AND ($1::uuid IS NULL OR q.supervisor_id = $1) ORDER BY q.asked_at, q.question_id",
        supervisor_id,
        _UNFINISHED,
    )
    return [QuestionRecord.from_row(r) for r in rows]


async def get_undelivered_answers(db: Db, supervisor_id: uuid.UUID) -> list[QuestionRecord]:
    """Answers persisted but not yet received by the agent, in answer order."""
    rows = await db.fetch(
        f"SELECT {_QUESTION} FROM questions WHERE supervisor_id = $1 "
        "AND answer IS NOT NULL AND delivered_at IS NULL ORDER BY answered_at, question_id",
        supervisor_id,
    )
    return [QuestionRecord.from_row(r) for r in rows]


def _delivered(row: asyncpg.Record) -> bool:
    return _held(row) and bool(row["delivered"])


ANSWER_DELIVERED: Statement[bool] = Statement(
    "answer_delivered",
    f"WITH {_fence_cte(2, 3, 4)}, "
    "d AS (UPDATE questions SET delivered_at = now() "
    "WHERE question_id = $1 AND supervisor_id = $2 AND answer IS NOT NULL "
    "AND delivered_at IS NULL AND EXISTS (SELECT 1 FROM f) RETURNING 1) "
    "SELECT $2::uuid AS for_supervisor, EXISTS (SELECT 1 FROM f) AS held, "
    f"{_present(2)}, EXISTS (SELECT 1 FROM d) AS delivered",
    _delivered,
)


def answer_delivered(
    question_id: uuid.UUID, supervisor_id: uuid.UUID, fence: Fence = NO_FENCE
) -> Bound[bool]:
    return Bound(ANSWER_DELIVERED, (question_id, supervisor_id, fence.owner, fence.epoch))


async def mark_answer_delivered(
    db: Db, question_id: uuid.UUID, supervisor_id: uuid.UUID, fence: Fence = NO_FENCE
) -> bool:
    """The agent has the answer. True the first time only."""
    return await answer_delivered(question_id, supervisor_id, fence).run(db)


async def increment_redelivery_count(
    db: Db, question_ids: Sequence[uuid.UUID], fences: Sequence[Fence] | None = None
) -> int:
    """Count one more delivery of each open question (each under its supervisor's
    fence, parallel to ``question_ids``; none: nobody's). Returns how many were
    counted: a question whose fence does not hold is not."""
    held = list(fences) if fences is not None else [NO_FENCE] * len(question_ids)
    rows = await db.fetch(
        "WITH b AS (SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::bigint[]) "
        "AS b(question_id, owner, epoch)), "
        "f AS (SELECT q.question_id FROM b JOIN questions q ON q.question_id = b.question_id "
        "JOIN supervisor_states st ON st.supervisor_id = q.supervisor_id "
        "AND st.owner_daemon_id IS NOT DISTINCT FROM b.owner AND st.lease_epoch = b.epoch "
        "FOR SHARE OF st) "
        "UPDATE questions SET redelivery_count = redelivery_count + 1 "
        "WHERE question_id IN (SELECT question_id FROM f) AND answer IS NULL RETURNING 1",
        list(question_ids),
        [f.owner for f in held],
        [f.epoch for f in held],
    )
    return len(rows)


# --------------------------------------------------------------------------- daemons and leases

CHANNEL = "makima"  # LISTEN/NOTIFY channel of the daemons sharing a database


async def register_daemon(
    db: Db, daemon_id: uuid.UUID, host: str, pid: int, ttl: float = 0.0
) -> None:
    """Register (or re-register) a daemon, holding a lease for ``ttl`` seconds."""
    await db.execute(
        "INSERT INTO daemons (daemon_id, host, pid, started_at, lease_expires_at, lease_ttl_s) "
        "VALUES ($1, $2, $3, now(), now() + make_interval(secs => $4), $4) "
        "ON CONFLICT (daemon_id) DO UPDATE SET host = EXCLUDED.host, pid = EXCLUDED.pid, "
        "started_at = now(), last_seen_at = now(), lease_expires_at = EXCLUDED.lease_expires_at, "
        "lease_ttl_s = EXCLUDED.lease_ttl_s, released_at = NULL",
        daemon_id,
        host,
        pid,
        ttl,
    )


async def touch_daemon(db: Db, daemon_id: uuid.UUID) -> bool:
    value = await db.fetchval(
        "UPDATE daemons SET last_seen_at = now() WHERE daemon_id = $1 RETURNING 1", daemon_id
    )
    return value is not None


@dataclass(frozen=True, slots=True)
class Renewal:
    """What one lease renewal learnt: its running supervisors no longer its own
    (fenced), requests and answers waiting for them, and how many peers are alive."""

    fenced: tuple[uuid.UUID, ...]
    requests: tuple[uuid.UUID, ...]
    answered: tuple[uuid.UUID, ...]
    peers: int


async def renew_lease(
    db: Db,
    daemon_id: uuid.UUID,
    host: str,
    pid: int,
    ttl: float,
    running: Mapping[uuid.UUID, Fence],
) -> Renewal:
    """Renew the lease (database clock) and, in the same round trip, poll: which of
    the ``running`` supervisors (with the fence each runs under) were taken over,
    their open cancel and resume requests, and their answers given on other
    daemons and not delivered yet (LISTEN/NOTIFY's fallback)."""
    ids = list(running)
    row = await db.fetchrow(
        "WITH d AS (INSERT INTO daemons (daemon_id, host, pid, lease_expires_at, lease_ttl_s) "
        "VALUES ($1, $2, $3, now() + make_interval(secs => $4), $4) "
        "ON CONFLICT (daemon_id) DO UPDATE SET last_seen_at = now(), "
        "lease_expires_at = EXCLUDED.lease_expires_at, lease_ttl_s = EXCLUDED.lease_ttl_s, "
        "released_at = NULL RETURNING 1), "
        "mine AS (SELECT * FROM unnest($5::uuid[], $6::uuid[], $7::bigint[]) "
        "AS m(supervisor_id, owner, epoch)) "
        "SELECT (SELECT count(*) FROM d) AS renewed, "
        "ARRAY(SELECT m.supervisor_id FROM mine m LEFT JOIN supervisor_states st "
        "USING (supervisor_id) WHERE st.owner_daemon_id IS DISTINCT FROM m.owner "
        "OR st.lease_epoch IS DISTINCT FROM m.epoch) AS fenced, "
        "ARRAY(SELECT r.request_id FROM supervisor_requests r JOIN mine m USING (supervisor_id) "
        "WHERE r.handled_at IS NULL ORDER BY r.requested_at) AS requests, "
        "ARRAY(SELECT q.question_id FROM questions q JOIN mine m USING (supervisor_id) "
        "WHERE q.answer IS NOT NULL AND q.delivered_at IS NULL "
        "ORDER BY q.answered_at LIMIT 1000) AS answered, "
        "(SELECT count(*) FROM daemons WHERE daemon_id <> $1 AND released_at IS NULL "
        "AND lease_expires_at > now()) AS peers",
        daemon_id,
        host,
        pid,
        ttl,
        ids,
        [running[i].owner for i in ids],
        [running[i].epoch for i in ids],
    )
    assert row is not None
    return Renewal(
        tuple(row["fenced"]), tuple(row["requests"]), tuple(row["answered"]), int(row["peers"])
    )


async def release_lease(db: Db, daemon_id: uuid.UUID) -> None:
    """Let go of the lease now (a handover): peers may claim at once, and are told."""
    await db.execute(
        "WITH d AS (UPDATE daemons SET lease_expires_at = now(), released_at = now() "
        "WHERE daemon_id = $1 RETURNING daemon_id) "
        "SELECT pg_notify($2, json_build_object('k', 'released', 'd', daemon_id)::text) FROM d",
        daemon_id,
        CHANNEL,
    )


@dataclass(frozen=True, slots=True)
class Claim:
    """A supervisor claimed: the fence it is now run under, and its former owner."""

    supervisor_id: uuid.UUID
    fence: Fence
    previous: uuid.UUID | None


async def claim_supervisors(
    db: Db,
    daemon_id: uuid.UUID,
    *,
    own: bool,
    only: uuid.UUID | None = None,
    running: Sequence[uuid.UUID] = (),
) -> list[Claim]:
    """Claim, in one statement, the unfinished supervisors nobody holds a lease on:
    those without an owner and those whose owner's lease expired or was released
    (at most a fair share of them: their count over the live daemons'), plus,
    with ``own``, every unfinished one this daemon owns (at its start, or after it
    lost its lease: none of them runs here then). Rows being written are skipped
    (SKIP LOCKED) and taken on a later round; each claimed row's ``lease_epoch``
    is bumped, which fences out whoever ran it before. ``only``: that supervisor
    alone, if it may be claimed. ``running``: this daemon's supervisors that run (or
    are being restored) here; its own that are not among them are claimed again
    even without ``own`` (a restoration that failed after its claim, a row skipped
    while locked), so that none stays owned by a live daemon that does not run it."""
    rows = await db.fetch(
        "WITH live AS (SELECT daemon_id FROM daemons WHERE lease_expires_at > now() "
        "AND released_at IS NULL), "
        "orphans AS (SELECT st.supervisor_id FROM supervisor_states st "
        "WHERE st.state NOT IN ('completed', 'failed') AND ($3::uuid IS NULL "
        "OR st.supervisor_id = $3) AND (st.owner_daemon_id IS NULL OR "
        "(st.owner_daemon_id <> $1 AND st.owner_daemon_id NOT IN (SELECT daemon_id FROM live)))), "
        "share AS (SELECT GREATEST(1, ceil((SELECT count(*) FROM orphans)::numeric "
        "/ GREATEST(1, (SELECT count(*) FROM live))))::bigint AS n), "
        "own AS (SELECT st.supervisor_id, st.owner_daemon_id AS previous "
        "FROM supervisor_states st WHERE st.owner_daemon_id = $1 "
        "AND ($2::boolean OR NOT (st.supervisor_id = ANY($4::uuid[]))) "
        "AND ($3::uuid IS NULL OR st.supervisor_id = $3) "
        "AND st.state NOT IN ('completed', 'failed') FOR UPDATE OF st SKIP LOCKED), "
        # The owner is checked on the row itself, so that a row claimed (and committed)
        # by a peer since this statement's snapshot fails the re-check after the lock.
        "other AS (SELECT st.supervisor_id, st.owner_daemon_id AS previous "
        "FROM supervisor_states st WHERE st.supervisor_id IN (SELECT supervisor_id FROM orphans) "
        "AND st.state NOT IN ('completed', 'failed') AND (st.owner_daemon_id IS NULL OR "
        "(st.owner_daemon_id <> $1 AND NOT EXISTS (SELECT 1 FROM daemons d "
        "WHERE d.daemon_id = st.owner_daemon_id AND d.lease_expires_at > now() "
        "AND d.released_at IS NULL))) "
        "ORDER BY st.created_at, st.supervisor_id LIMIT (SELECT n FROM share) "
        "FOR UPDATE OF st SKIP LOCKED), "
        "c AS (SELECT * FROM own UNION ALL SELECT * FROM other) "
        "UPDATE supervisor_states st SET owner_daemon_id = $1, lease_epoch = st.lease_epoch + 1, "
        "version = st.version + 1, updated_at = now() "
        "FROM c WHERE st.supervisor_id = c.supervisor_id "
        "RETURNING st.supervisor_id, st.lease_epoch, c.previous",
        daemon_id,
        own,
        only,
        list(running),
    )
    return [
        Claim(r["supervisor_id"], Fence(daemon_id, int(r["lease_epoch"])), r["previous"])
        for r in rows
    ]


# On a supervisor_states row ``st`` (daemon id in $1): nobody else holds a lease on it.
_NOBODY_HOLDS = (
    "(st.owner_daemon_id IS NULL OR st.owner_daemon_id = $1 OR NOT EXISTS (SELECT 1 "
    "FROM daemons d WHERE d.daemon_id = st.owner_daemon_id AND d.lease_expires_at > now() "
    "AND d.released_at IS NULL))"
)


async def claimable(db: Db, daemon_id: uuid.UUID, *, own: bool) -> list[uuid.UUID]:
    """What :func:`claim_supervisors` would consider, read without locking (to claim
    one at a time when claiming them together failed)."""
    rows = await db.fetch(
        "SELECT st.supervisor_id FROM supervisor_states st "
        "WHERE st.state NOT IN ('completed', 'failed') AND (st.owner_daemon_id IS NULL "
        "OR ($2::boolean AND st.owner_daemon_id = $1) OR (st.owner_daemon_id <> $1 "
        "AND NOT EXISTS (SELECT 1 FROM daemons d WHERE d.daemon_id = st.owner_daemon_id "
        "AND d.lease_expires_at > now() AND d.released_at IS NULL))) "
        "ORDER BY st.created_at, st.supervisor_id LIMIT 10000",
        daemon_id,
        own,
    )
    return [r["supervisor_id"] for r in rows]


async def claim_failed(db: Db, daemon_id: uuid.UUID, supervisor_id: uuid.UUID, reason: str) -> bool:
    """Claim one supervisor and mark it failed with ``reason``, in one statement (the
    database refused to claim it as it is). False when it was not claimable."""
    value = await db.fetchval(
        "WITH c AS (SELECT st.supervisor_id FROM supervisor_states st "
        "WHERE st.supervisor_id = $2 AND st.state NOT IN ('completed', 'failed') "
        f"AND {_NOBODY_HOLDS} FOR UPDATE OF st SKIP LOCKED) "
        "UPDATE supervisor_states s SET owner_daemon_id = $1, lease_epoch = s.lease_epoch + 1, "
        "state = 'failed', error_message = $3, version = s.version + 1, updated_at = now() "
        "FROM c WHERE s.supervisor_id = c.supervisor_id RETURNING 1",
        daemon_id,
        supervisor_id,
        reason,
    )
    return value is not None


async def cancel_unheld(
    db: Db, daemon_id: uuid.UUID, supervisor_id: uuid.UUID, reason: str
) -> bool:
    """Cancel a supervisor that no live daemon holds (this daemon's own included):
    claimed and failed with ``reason``, its unfinished tasks cancelled, in one
    statement. False when a live peer holds it (or it is finished, or being written)."""
    value = await db.fetchval(
        "WITH c AS (SELECT st.supervisor_id FROM supervisor_states st "
        "WHERE st.supervisor_id = $2 AND st.state NOT IN ('completed', 'failed') "
        f"AND {_NOBODY_HOLDS} FOR UPDATE OF st SKIP LOCKED), "
        "s AS (UPDATE supervisor_states s SET owner_daemon_id = $1, "
        "lease_epoch = s.lease_epoch + 1, state = 'failed', error_message = $3, "
        "version = s.version + 1, updated_at = now() FROM c "
        "WHERE s.supervisor_id = c.supervisor_id RETURNING s.supervisor_id), "
        "t AS (UPDATE tasks SET status = 'cancelled', finished_at = now() "
        "WHERE supervisor_id IN (SELECT supervisor_id FROM s) "
        "AND status IN ('pending', 'running')) "
        "SELECT count(*) FROM s",
        daemon_id,
        supervisor_id,
        reason,
    )
    return bool(value)


async def list_daemons(db: Db) -> list[dict[str, Any]]:
    """The daemons of the cluster: alive ones, and those seen within a day (at most
    100), with how many unfinished supervisors each owns, oldest first."""
    rows = await db.fetch(
        "SELECT d.daemon_id, d.host, d.pid, d.started_at, d.last_seen_at, d.lease_expires_at, "
        "d.lease_ttl_s, d.released_at, "
        "(d.lease_expires_at > now() AND d.released_at IS NULL) AS alive, now() AS db_now, "
        "(SELECT count(*) FROM supervisor_states st WHERE st.owner_daemon_id = d.daemon_id "
        "AND st.state NOT IN ('completed', 'failed')) AS supervisors "
        "FROM daemons d WHERE d.lease_expires_at > now() - interval '1 day' "
        "OR EXISTS (SELECT 1 FROM supervisor_states st WHERE st.owner_daemon_id = d.daemon_id "
        "AND st.state NOT IN ('completed', 'failed')) "
        "ORDER BY d.started_at, d.daemon_id LIMIT 100"
    )
    return [dict(r) for r in rows]


async def notify(db: Db, payloads: Sequence[str]) -> None:
    """Send notifications on the daemons' channel (delivered at commit)."""
    await db.execute(
        "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", CHANNEL, list(payloads)
    )


# --------------------------------------------------------------------------- requests


@dataclass(frozen=True, slots=True)
class Request:
    """A person's cancel or resume for a supervisor another daemon runs."""

    request_id: uuid.UUID
    supervisor_id: uuid.UUID
    kind: str
    requested_by_uid: int | None
    handled_at: datetime | None
    outcome: Any


_REQUEST = "request_id, supervisor_id, kind, requested_by_uid, handled_at, outcome"


def _request(row: asyncpg.Record) -> Request:
    return Request(
        row["request_id"],
        row["supervisor_id"],
        row["kind"],
        row["requested_by_uid"],
        row["handled_at"],
        row["outcome"],
    )


async def add_request(
    db: Db,
    request_id: uuid.UUID,
    supervisor_id: uuid.UUID,
    kind: str,
    uid: int | None,
    daemon_id: uuid.UUID,
) -> None:
    """Record a request and tell the daemons, in one statement."""
    await db.execute(
        "WITH r AS (INSERT INTO supervisor_requests (request_id, supervisor_id, kind, "
        "requested_by_uid, requested_by_daemon) VALUES ($1, $2, $3, $4, $5) RETURNING 1) "
        "SELECT pg_notify($6, json_build_object('k', 'request', 'r', $1::uuid, "
        "'s', $2::uuid)::text) FROM r",
        request_id,
        supervisor_id,
        kind,
        uid,
        daemon_id,
        CHANNEL,
    )


async def get_requests(db: Db, request_ids: Sequence[uuid.UUID]) -> list[Request]:
    rows = await db.fetch(
        f"SELECT {_REQUEST} FROM supervisor_requests WHERE request_id = ANY($1::uuid[]) "
        "ORDER BY requested_at",
        list(request_ids),
    )
    return [_request(r) for r in rows]


async def finish_request(db: Db, request_id: uuid.UUID, daemon_id: uuid.UUID, outcome: Any) -> bool:
    """Record what came of a request (once: False when it was handled already)."""
    value = await db.fetchval(
        "UPDATE supervisor_requests SET handled_at = now(), handled_by = $2, outcome = $3 "
        "WHERE request_id = $1 AND handled_at IS NULL RETURNING 1",
        request_id,
        daemon_id,
        outcome,
    )
    return value is not None


async def owner_of(db: Db, supervisor_id: uuid.UUID) -> tuple[uuid.UUID | None, bool] | None:
    """The supervisor's owner and whether that owner's lease is live; None: no row."""
    row = await db.fetchrow(
        "SELECT st.owner_daemon_id, (d.lease_expires_at > now() AND d.released_at IS NULL) "
        "AS alive FROM supervisor_states st LEFT JOIN daemons d "
        "ON d.daemon_id = st.owner_daemon_id WHERE st.supervisor_id = $1",
        supervisor_id,
    )
    if row is None:
        return None
    return row["owner_daemon_id"], bool(row["alive"])
