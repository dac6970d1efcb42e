"""The cluster drill from start to end: scratch directory, database, daemons,
traffic, scenarios, finish, stop, verdict, cleanup."""

from __future__ import annotations

import os
import random
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import anyio

import makima.cluster_drill.checks as cc
from makima.cluster_drill.context import Journal
from makima.cluster_drill.database import SharedDatabase
from makima.cluster_drill.processes import Cluster
from makima.cluster_drill.scenarios import Scenarios
from makima.cluster_drill.settings import ClusterProgress, ClusterReport, ClusterSettings
from makima.cluster_drill.traffic import Traffic
from makima.cluster_drill.verify import verify
from makima.drill import DrillError


class _ClusterDrill:
    """Owns the scratch directory and puts the parts together, in order."""

    def __init__(
        self, settings: ClusterSettings, report: Callable[[ClusterProgress], None]
    ) -> None:
        if settings.daemons < 2:
            raise DrillError("a cluster drill needs at least two daemons")
        self.settings = settings
        self.seed = settings.seed if settings.seed is not None else random.randrange(1 << 30)  # noqa: S311
        rng = random.Random(self.seed)  # noqa: S311 - picks victims, not secrets
        self.journal = Journal(
            report, ClusterProgress(steps=settings.rounds * len(settings.scenarios))
        )
        made = settings.scratch is None
        self.scratch = settings.scratch or Path(tempfile.mkdtemp(prefix="mkc-", dir="/tmp"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.remove_scratch = made
        if os.geteuid() == 0:
            self.scratch.chmod(0o711)  # the embedded server's account passes through
        self.cluster = Cluster(settings, self.scratch, self.journal)
        self.db = SharedDatabase(self.scratch, settings.database_url)
        self.traffic = Traffic(settings, self.cluster, self.journal)
        self.scenarios = Scenarios(settings, rng, self.cluster, self.db, self.journal)

    async def run(self) -> ClusterReport:
        started = time.monotonic()
        journal, cluster, traffic = self.journal, self.cluster, self.traffic
        try:
            with anyio.fail_after(self.settings.limit):
                journal.tell("starting PostgreSQL")
                cluster.use_database(await self.db.start())
                await cluster.start_members()
                failure: Exception | None = None
                async with anyio.create_task_group() as tg:
                    for member in cluster.members:
                        tg.start_soon(traffic.watch, member)
                    for _ in range(4):
                        tg.start_soon(traffic.answer_loop)
                    tg.start_soon(traffic.poll_loop)
                    try:
                        await traffic.create_supervisors()
                        await traffic.warm_up()
                        await self.scenarios.rounds()
                        await cluster.check_cluster_view("after the scenarios")
                        await traffic.finish(self.db)
                    except Exception as exc:  # noqa: BLE001 - re-raised below, outside the group
                        failure = exc
                    finally:
                        traffic.closing = True
                        tg.cancel_scope.cancel()
                if failure is not None:
                    raise failure
                await cluster.stop_members()
        except TimeoutError as exc:
            raise DrillError(
                f"the cluster drill did not finish within {self.settings.limit:.0f}s "
                f"(at: {journal.progress.phase}); files in {self.scratch}"
            ) from exc
        journal.tell("checking")
        checks = await verify(journal, cluster, self.db, traffic.refusals)
        records = cluster.book.refresh()
        questions, tasks = cc.acknowledged_counts(records)
        return ClusterReport(
            checks=checks,
            takeovers=self.scenarios.takeovers,
            notes=journal.notes,
            daemons=len(cluster.members),
            supervisors=len(journal.created),
            processes=sum(len(p) for p in cc.processes(records).values()),
            questions=questions,
            answers=len(journal.accepted),
            tasks=tasks,
            answers_by_daemon=[m.answers for m in cluster.members],
            seconds=time.monotonic() - started,
            scratch=self.scratch,
            seed=self.seed,
        )

    async def cleanup(self) -> None:
        """Whatever happened: no daemon left paused or running, the server stopped."""
        self.traffic.close()
        with anyio.CancelScope(shield=True):
            await self.cluster.kill_members()
            await self.db.close()

    def remove(self, passed: bool) -> None:
        if passed and self.remove_scratch:
            shutil.rmtree(self.scratch, ignore_errors=True)


async def run_cluster_drill(
    settings: ClusterSettings, report: Callable[[ClusterProgress], None] | None = None
) -> ClusterReport:
    """Run the cluster drill; the report says which checks held."""
    drill = _ClusterDrill(settings, report or (lambda _: None))
    try:
        result = await drill.run()
    finally:
        await drill.cleanup()
    drill.remove(result.ok)
    return result
