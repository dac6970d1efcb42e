"""schema.sql: idempotent, upgrades an old table shape, shipped in the package."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from makima.database import SCHEMA_VERSION, apply_schema, create_pool, schema_sql
from makima.embedded import ConnectParams
from makima.errors import SchemaVersionError

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.anyio


async def shape(conn: asyncpg.Connection) -> dict[str, Any]:
    """Everything schema.sql decides, in comparable form."""
    columns = await conn.fetch(
        "SELECT table_name, column_name, data_type, udt_name, character_maximum_length, "
        "column_default, is_nullable, col_description(format('%I.%I', table_schema, table_name)"
        "::regclass, ordinal_position) AS comment FROM information_schema.columns "
        "WHERE table_schema = 'public' ORDER BY table_name, column_name"
    )
    constraints = await conn.fetch(
        "SELECT conrelid::regclass::text AS tbl, conname, pg_get_constraintdef(oid) AS def "
        "FROM pg_constraint WHERE connamespace = 'public'::regnamespace ORDER BY 1, 2"
    )
    indexes = await conn.fetch(
        "SELECT tablename, indexname, indexdef FROM pg_indexes WHERE schemaname = 'public' "
        "ORDER BY 1, 2"
    )
    return {
        "columns": [tuple(r) for r in columns],
        "constraints": [tuple(r) for r in constraints],
        "indexes": [tuple(r) for r in indexes],
    }


def test_shipped_schema_is_the_top_level_file() -> None:
    assert schema_sql() == (ROOT / "schema.sql").read_text(encoding="utf-8")


async def test_applying_twice_changes_nothing(fresh_database: ConnectParams) -> None:
    pool = await create_pool(fresh_database, min_size=1, max_size=2)
    try:
        assert await apply_schema(pool) == SCHEMA_VERSION
        async with pool.acquire() as conn:
            first = await shape(conn)
            applied_at = await conn.fetchval("SELECT applied_at FROM makima_schema")
        assert await apply_schema(pool) == SCHEMA_VERSION
        async with pool.acquire() as conn:
            assert await shape(conn) == first
            assert await conn.fetchval("SELECT count(*) FROM makima_schema") == 1
            assert await conn.fetchval("SELECT applied_at FROM makima_schema") == applied_at
    finally:
        await pool.close()


async def test_seed_columns_constraints_and_indexes(pool: asyncpg.Pool) -> None:
    cols = {
        r["column_name"]: r
        for r in await pool.fetch(
            "SELECT column_name, data_type, udt_name, character_maximum_length, column_default, "
            "is_nullable FROM information_schema.columns WHERE table_name = 'supervisor_states'"
        )
    }
    assert cols["state"]["data_type"] == "character varying"
    assert cols["state"]["character_maximum_length"] == 50
    assert cols["state"]["is_nullable"] == "NO"
    assert cols["state"]["column_default"] == "'initializing'::character varying"
    assert cols["current_activity"]["data_type"] == "text"
    assert cols["progress"]["data_type"] == "integer"
    assert cols["progress"]["column_default"] == "0"
    assert cols["error_message"]["data_type"] == "text"
    assert cols["spawned_task_ids"]["udt_name"] == "_uuid"
    assert cols["spawned_task_ids"]["column_default"] == "ARRAY[]::uuid[]"
    assert cols["pending_questions"]["data_type"] == "jsonb"
    assert cols["pending_questions"]["column_default"] == "'[]'::jsonb"
    assert cols["restoration_count"]["column_default"] == "0"
    assert cols["last_restored_at"]["data_type"] == "timestamp with time zone"
    assert cols["restoration_source"]["character_maximum_length"] == 50
    for extra in (
        "phase",
        "checkpoint_data",
        "last_heartbeat",
        "version",
        "owner_daemon_id",
        "lease_epoch",
        "created_at",
        "updated_at",
    ):
        assert extra in cols

    checks = [
        r["def"]
        for r in await pool.fetch(
            "SELECT pg_get_constraintdef(oid) AS def FROM pg_constraint "
            "WHERE conrelid = 'supervisor_states'::regclass AND contype = 'c'"
        )
    ]
    assert "CHECK (((progress >= 0) AND (progress <= 100)))" in checks
    assert any("waiting_for_tasks" in c and "interrupted" in c for c in checks)

    indexes = {
        r["indexname"]: r["indexdef"]
        for r in await pool.fetch(
            "SELECT indexname, indexdef FROM pg_indexes WHERE tablename = 'supervisor_states'"
        )
    }
    assert "(state)" in indexes["idx_supervisor_states_state"]
    gin = indexes["idx_supervisor_states_pending_questions"]
    assert "USING gin (pending_questions)" in gin
    assert "WHERE (pending_questions <> '[]'::jsonb)" in gin

    missing_comments = await pool.fetch(
        "SELECT c.relname, a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid "
        "WHERE c.relnamespace = 'public'::regnamespace AND c.relkind = 'r' AND a.attnum > 0 "
        "AND NOT a.attisdropped AND col_description(c.oid, a.attnum) IS NULL"
    )
    assert [tuple(r) for r in missing_comments] == []


async def test_constraints_refuse_bad_values(pool: asyncpg.Pool) -> None:
    sid = uuid.uuid4()
    await pool.execute(
        "INSERT INTO supervisors (supervisor_id, name, agent_command) VALUES ($1, 'x', '{x}')", sid
    )
    await pool.execute("INSERT INTO supervisor_states (supervisor_id) VALUES ($1)", sid)
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE supervisor_states SET progress = 101 WHERE supervisor_id = $1", sid
        )
    with pytest.raises(asyncpg.CheckViolationError):
        await pool.execute(
            "UPDATE supervisor_states SET state = 'sleeping' WHERE supervisor_id = $1", sid
        )


OLD_SHAPE = """
CREATE TABLE supervisors (
    supervisor_id UUID PRIMARY KEY,
    name TEXT NOT NULL,
    agent_command TEXT[] NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE TABLE supervisor_states (
    supervisor_id UUID PRIMARY KEY,
    phase TEXT,
    checkpoint_data JSONB,
    last_heartbeat TIMESTAMPTZ,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
"""


async def test_upgrade_from_the_old_table_shape(
    fresh_database: ConnectParams, db_params: ConnectParams
) -> None:
    """A database made before the enhanced columns gains them; rows keep their data."""
    sid = uuid.uuid4()
    conn = await asyncpg.connect(**fresh_database.asyncpg_kwargs())
    try:
        await conn.execute(OLD_SHAPE)
        await conn.execute(
            "INSERT INTO supervisors (supervisor_id, name, agent_command) "
            "VALUES ($1, 'old', '{a}')",
            sid,
        )
        await conn.execute(
            "INSERT INTO supervisor_states (supervisor_id, phase, checkpoint_data) "
            "VALUES ($1, 'build', '{\"step\": 3}')",
            sid,
        )
    finally:
        await conn.close()

    pool = await create_pool(fresh_database, min_size=1, max_size=2)
    try:
        await apply_schema(pool)
        row = await pool.fetchrow("SELECT * FROM supervisor_states WHERE supervisor_id = $1", sid)
        assert row["phase"] == "build"
        assert row["checkpoint_data"] == {"step": 3}
        assert row["state"] == "initializing"
        assert row["progress"] == 0
        assert row["pending_questions"] == []
        assert row["spawned_task_ids"] == []
        assert row["restoration_count"] == 0
        assert row["version"] == 0
        async with pool.acquire() as c:
            upgraded = await shape(c)
    finally:
        await pool.close()

    # The upgraded database has the same columns, checks and indexes as a new one.
    reference = await asyncpg.connect(**db_params.asyncpg_kwargs())
    try:
        new = await shape(reference)
    finally:
        await reference.close()

    # supervisor_states (the seed's table) is identical to a new database's; the
    # old spec table keeps its own defaults but gains every column; checks and
    # indexes are the same (the foreign key added over old rows is NOT VALID).
    def states(s: dict[str, Any]) -> list[Any]:
        return [c for c in s["columns"] if c[0] == "supervisor_states"]

    def names(s: dict[str, Any]) -> set[tuple[str, str]]:
        return {(c[0], c[1]) for c in s["columns"]}

    def checks(s: dict[str, Any]) -> list[tuple[str, str]]:
        return sorted((c[0], c[2].removesuffix(" NOT VALID")) for c in s["constraints"])

    assert states(upgraded) == states(new)
    assert names(upgraded) == names(new)
    assert checks(upgraded) == checks(new)
    assert sorted(upgraded["indexes"]) == sorted(new["indexes"])


async def test_newer_database_is_refused(pool: asyncpg.Pool) -> None:
    await pool.execute("UPDATE makima_schema SET version = $1", SCHEMA_VERSION + 1)
    with pytest.raises(SchemaVersionError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        await apply_schema(pool)
