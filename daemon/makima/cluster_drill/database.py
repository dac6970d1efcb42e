"""The PostgreSQL server the cluster's daemons share, and what the drill asks it."""

from __future__ import annotations

import contextlib
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

import makima.cluster_drill.checks as cc

if TYPE_CHECKING:
    import asyncpg

    from makima.embedded import ConnectParams, EmbeddedPostgres


def database_url(params: ConnectParams) -> str:
    """A postgresql:// URL for the embedded server (a Unix socket directory as host)."""
    user = urllib.parse.quote(params.user, safe="")
    password = urllib.parse.quote(params.password or "", safe="")
    query = urllib.parse.urlencode({"host": params.host, "port": str(params.port)})
    return f"postgresql://{user}:{password}@/{urllib.parse.quote(params.database)}?{query}"


class SharedDatabase:
    """The one server (given by URL, or embedded in the scratch dir) and the drill's
    own connection to it."""

    def __init__(self, scratch: Path, url: str | None) -> None:
        self.scratch = scratch
        self.server: EmbeddedPostgres | None = None
        self.url: str | None = url
        self.conn: asyncpg.Connection | None = None

    async def start(self) -> str:
        """Start the embedded server unless a URL was given; connect; return the URL."""
        import asyncpg

        from makima.database import ensure_database
        from makima.embedded import EmbeddedPostgres

        if self.url is None:
            self.server = EmbeddedPostgres(self.scratch / "pg")
            params = await anyio.to_thread.run_sync(self.server.start)
            await ensure_database(params)
            self.url = database_url(params)
        self.conn = await asyncpg.connect(self.url)
        return self.url

    async def close(self) -> None:
        """Whatever happened: the connection closed, the server stopped."""
        if self.conn is not None:
            with contextlib.suppress(Exception):
                await self.conn.close()
        if self.server is not None:
            with contextlib.suppress(Exception):
                await anyio.to_thread.run_sync(self.server.stop)

    def _connection(self) -> asyncpg.Connection:
        assert self.conn is not None
        return self.conn

    async def owned(self, daemon_id: str, supervisor_ids: Sequence[str]) -> list[str]:
        """The unfinished ones of these supervisors whose owner is ``daemon_id``, sorted."""
        rows: list[Any] = await self._connection().fetch(
            "SELECT supervisor_id::text AS sid FROM supervisor_states "
            "WHERE owner_daemon_id::text = $1 AND state NOT IN ('completed', 'failed') "
            "AND supervisor_id = ANY($2::uuid[])",
            daemon_id,
            list(supervisor_ids),
        )
        return sorted(r["sid"] for r in rows)

    async def owners(self, supervisor_ids: Sequence[str]) -> dict[str, tuple[str | None, int]]:
        rows = await self._connection().fetch(
            "SELECT supervisor_id::text AS sid, owner_daemon_id::text AS owner, lease_epoch "
            "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
            list(supervisor_ids),
        )
        return {r["sid"]: (r["owner"], int(r["lease_epoch"] or 0)) for r in rows}

    async def finished(self, supervisor_ids: Sequence[str]) -> set[str]:
        """Those of these supervisors that are completed or failed."""
        done = await self._connection().fetch(
            "SELECT supervisor_id::text AS sid FROM supervisor_states "
            "WHERE supervisor_id = ANY($1::uuid[]) AND state IN ('completed', 'failed')",
            supervisor_ids,
        )
        return {r["sid"] for r in done}

    async def lock_waits(self) -> set[str]:
        """Statements waiting for a lock now, with what holds it (for the notes: a
        paused daemon's open transaction holds its locks until it runs again)."""
        rows = await self._connection().fetch(
            "SELECT w.application_name AS app, left(regexp_replace(w.query, '\\s+', ' ', 'g'), 90) "
            "AS query, b.state AS holder_state, b.application_name AS holder_app, "
            "left(regexp_replace(b.query, '\\s+', ' ', 'g'), 60) AS holder_query "
            "FROM pg_stat_activity w JOIN pg_stat_activity b "
            "ON b.pid = ANY(pg_blocking_pids(w.pid)) WHERE w.datname = current_database()"
        )
        return {
            f"{r['app'] or 'a pool connection'} waited on a lock ({r['query']!r}) held by "
            f"{r['holder_app'] or 'a pool connection'}, {r['holder_state']} "
            f"(last: {r['holder_query']!r})"
            for r in rows
        }

    async def restored_after(
        self, supervisor_ids: Sequence[str], wall: float
    ) -> dict[str, float | None]:
        """Seconds from ``wall`` (the host's clock, as the database's: one host) to each
        supervisor's ``last_restored_at``, when that came later."""
        rows = await self._connection().fetch(
            "SELECT supervisor_id::text AS sid, extract(epoch FROM last_restored_at)::float8 AS at "
            "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
            list(supervisor_ids),
        )
        found = {r["sid"]: r["at"] for r in rows}
        return {
            sid: None if found.get(sid) is None or found[sid] < wall else found[sid] - wall
            for sid in supervisor_ids
        }

    async def terminate_backends(self, application_name: str) -> list[Any]:
        """``pg_terminate_backend`` of every backend so named; the rows (pid, ended)."""
        rows: list[Any] = await self._connection().fetch(
            "SELECT pid, pg_terminate_backend(pid) AS ended FROM pg_stat_activity "
            "WHERE application_name = $1",
            application_name,
        )
        return rows

    async def application_names(self) -> list[Any]:
        """The application names of this database's backends (rows)."""
        rows: list[Any] = await self._connection().fetch(
            "SELECT DISTINCT application_name FROM pg_stat_activity "
            "WHERE datname = current_database()"
        )
        return rows

    async def stored(self, supervisor_ids: Sequence[str]) -> cc.Stored:
        """What the database holds for these supervisors, for the final checks."""
        conn = self._connection()
        ids = list(supervisor_ids)
        questions = await conn.fetch(
            "SELECT question_id::text AS qid, supervisor_id::text AS sid, answer FROM questions "
            "WHERE supervisor_id = ANY($1::uuid[])",
            ids,
        )
        tasks = await conn.fetch(
            "SELECT task_id::text AS tid FROM tasks WHERE supervisor_id = ANY($1::uuid[])", ids
        )
        states = await conn.fetch(
            "SELECT supervisor_id::text AS sid, state, "
            "jsonb_array_length(COALESCE(pending_questions, '[]'::jsonb)) AS open "
            "FROM supervisor_states WHERE supervisor_id = ANY($1::uuid[])",
            ids,
        )
        return cc.Stored(
            questions={r["qid"]: r["answer"] for r in questions},
            question_owner={r["qid"]: r["sid"] for r in questions},
            tasks=frozenset(r["tid"] for r in tasks),
            states={r["sid"]: r["state"] for r in states},
            open_questions={r["sid"]: int(r["open"]) for r in states},
        )
