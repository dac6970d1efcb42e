"""Group commit: save points that arrive while a commit is in flight are written
together in the next round trip (DESIGN §14).

There is no background task. A caller that finds no commit in flight *leads*:
it writes its own save point at once (a lone save point never waits for a
batch to fill). Callers that arrive meanwhile queue; when the commit in flight
is over, the first of them leads the next one, which writes everything queued
by then. Each caller returns only after the commit that holds its save point.

A batch is written per kind (the same statement): one execution alone with
``fetchrow``, several with ``fetchmany``, which pipelines them in one round trip
and one implicit transaction (one commit). Every statement returns exactly one
row per execution, so row *i* is caller *i*'s.

One bad save point fails only its own caller: when a batch is refused (a value
the database will not store, say), its save points are written again one by
one, and each caller gets its own outcome. A connection error fails every save
point not yet written with that error: each caller then retries on its own,
outside the batch (the retry machinery of ``Database.save``).

The commit is shielded from its leader's cancellation (others wait on it) and
bounded by ``timeout`` instead; a leader cancelled while it waited hands the
lead on.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

import anyio
import asyncpg
import structlog

from makima.database import Db, Pool, is_connection_error

log = structlog.get_logger("makima.store.committer")

R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


class Job(Protocol[R_co]):
    """One execution of a statement that returns exactly one row (repository.Bound)."""

    @property
    def sql(self) -> str: ...

    @property
    def args(self) -> tuple[Any, ...]: ...

    def decode(self, row: asyncpg.Record) -> R_co: ...


class _Item(Generic[R]):
    """A queued save point and, once its commit is over, its outcome."""

    __slots__ = ("done", "error", "job", "lead", "result", "wake")

    def __init__(self, job: Job[R]) -> None:
        self.job = job
        self.wake = anyio.Event()
        self.done = False
        self.lead = False  # woken to lead the next commit, not with an outcome
        self.result: R | None = None
        self.error: BaseException | None = None

    def finish(self, row: asyncpg.Record | None) -> None:
        if row is None:
            self.fail(AssertionError("a batched statement returned no row"))
            return
        try:
            self.result = self.job.decode(row)
        except Exception as exc:  # noqa: BLE001 - the caller's own error, handed to it
            self.error = exc
        self.done = True
        self.wake.set()

    def fail(self, error: BaseException) -> None:
        self.error = error
        self.done = True
        self.wake.set()

    def outcome(self) -> R:
        if self.error is not None:
            raise self.error
        return self.result  # type: ignore[return-value]  # R may include None


@dataclass
class CommitterStats:
    """What the committer did: for tests and benchmarks."""

    commits: int = 0  # round trips made (one commit each)
    written: int = 0  # save points written
    largest: int = 0  # the most save points one round trip carried
    split: int = 0  # batches refused and written again one by one


class Committer:
    """Writes :class:`Job` s, many per round trip when they arrive together."""

    def __init__(self, pool: Pool, *, timeout: float = 30.0) -> None:
        self._pool = pool
        self._timeout = timeout
        self._queue: list[_Item[Any]] = []
        self._busy = False  # a commit is in flight, or its next leader is chosen
        self.stats = CommitterStats()

    @property
    def busy(self) -> bool:
        """A commit is in flight (or its next leader is on its way)."""
        return self._busy

    @property
    def queued(self) -> int:
        """Save points waiting for the next commit."""
        return len(self._queue)

    async def submit(self, job: Job[R]) -> R:
        """Write ``job`` and return its decoded row, after the commit holding it."""
        item: _Item[R] = _Item(job)
        self._queue.append(item)
        if self._busy:
            try:
                await item.wake.wait()
            except BaseException:
                self._abandon(item)
                raise
            if not item.lead:
                return item.outcome()
        else:
            self._busy = True
        batch, self._queue = self._queue, []
        try:
            with anyio.CancelScope(shield=True):
                await self._commit(batch)
        finally:
            for unresolved in batch:  # only if the commit itself was torn down
                if not unresolved.done:
                    unresolved.fail(ConnectionAbortedError("the commit holding it did not end"))
            self._pass_on()
        return item.outcome()

    def _abandon(self, item: _Item[Any]) -> None:
        """A waiting caller was cancelled: a save point not yet in flight is dropped
        (it was never acknowledged), and a lead it was given goes to the next."""
        if not item.done:
            for index, queued in enumerate(self._queue):
                if queued is item:
                    del self._queue[index]
                    break
        if item.lead:
            item.lead = False
            self._pass_on()

    def _pass_on(self) -> None:
        if self._queue:
            leader = self._queue[0]
            leader.lead = True
            leader.wake.set()
        else:
            self._busy = False

    async def _commit(self, batch: list[_Item[Any]]) -> None:
        groups: dict[str, list[_Item[Any]]] = {}
        for item in batch:
            groups.setdefault(item.job.sql, []).append(item)
        try:
            with anyio.fail_after(self._timeout):
                async with self._pool.acquire() as conn:
                    for items in groups.values():
                        await self._write(conn, items)
        except Exception as exc:  # noqa: BLE001 - every caller gets it and retries alone
            for item in batch:
                if not item.done:
                    item.fail(exc)

    async def _write(self, conn: Db, items: Sequence[_Item[Any]]) -> None:
        """One round trip for ``items`` (one statement); a connection error propagates."""
        first = items[0].job
        try:
            rows: Sequence[asyncpg.Record | None]
            if len(items) == 1:
                rows = [await conn.fetchrow(first.sql, *first.args)]
            else:
                rows = await conn.fetchmany(first.sql, [item.job.args for item in items])
        except Exception as exc:
            if is_connection_error(exc):
                raise
            if len(items) == 1:
                items[0].fail(exc)
                return
            # One bad save point fails only its own caller: again, one by one.
            self.stats.split += 1
            log.info("store.batch_split", statement=_name(first.sql), size=len(items))
            for item in items:
                await self._write(conn, [item])
            return
        if len(rows) != len(items):
            raise AssertionError(f"{len(items)} executions returned {len(rows)} rows")
        self.stats.commits += 1
        self.stats.written += len(items)
        self.stats.largest = max(self.stats.largest, len(items))
        for item, row in zip(items, rows, strict=True):
            item.finish(row)


def _name(sql: str) -> str:
    return " ".join(sql.split()[:4])
