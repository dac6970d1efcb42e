"""What the drill does to the daemons, round after round: ``kill -9``, SIGSTOP past
the lease then SIGCONT, ``pg_terminate_backend`` of the lease connection; and how
long the others took to take their supervisors over."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Mapping, Sequence

import anyio
import structlog

import makima.cluster_drill.checks as cc
from makima.cluster_drill.context import Journal, until
from makima.cluster_drill.database import SharedDatabase
from makima.cluster_drill.processes import Cluster, Member, is_running, proc_state, wall_time
from makima.cluster_drill.settings import ClusterSettings, Takeover
from makima.control.client import ControlClient, ControlError

log = structlog.get_logger("makima.cluster_drill")

SELF_STOP_SLACK = 0.5  # the drill looks at /proc every POLL seconds; an exit takes a moment
POLL = 0.05


class Scenarios:
    """Plays the scenarios on one victim after another, judges each, and keeps the
    takeovers it timed."""

    def __init__(
        self,
        settings: ClusterSettings,
        rng: random.Random,
        cluster: Cluster,
        db: SharedDatabase,
        journal: Journal,
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.cluster = cluster
        self.book = cluster.book
        self.db = db
        self.journal = journal
        self.takeovers: list[Takeover] = []

    async def rounds(self) -> None:
        scenarios = {"kill": self._kill, "pause": self._pause, "terminate": self._terminate}
        members = self.cluster.members
        count = len(members)
        first = self.rng.randrange(count)  # which daemon suffers first (the seed repeats it)
        step = 0
        for round_no in range(self.settings.rounds):
            for scenario in self.settings.scenarios:
                # Each round shifts by one: over rounds, each daemon meets each scenario.
                victim = members[(first + step + round_no) % count]
                self.journal.tell(f"round {round_no + 1}: {scenario} {victim.name}")
                await scenarios[scenario](round_no, victim)
                step += 1
                self.journal.progress.steps_done = step
                await self._settle()

    async def _settle(self) -> None:
        """Every daemon runs and every unfinished supervisor makes progress again."""
        journal = self.journal
        for member in self.cluster.members:
            await self.cluster.ensure_running(member, "after the scenario")
        since = time.monotonic()

        async def moving() -> bool:
            recent = {r.supervisor_id for r in self.book.refresh() if r.t > since and r.is_ack}
            return set(journal.created) - journal.finished <= recent

        limit = 3 * self.settings.takeover_limit + 10.0
        if not await until(moving, limit):
            recent = {r.supervisor_id for r in self.book.refresh() if r.t > since and r.is_ack}
            stuck = sorted(set(journal.created) - journal.finished - recent)
            journal.note(
                f"{journal.progress.phase}: {len(stuck)} supervisors made no progress within "
                f"{limit:.0f}s afterwards, e.g. {', '.join(s[:8] for s in stuck[:3])}"
            )

    # ----------------------------------------------------------------- ownership, takeovers

    async def _owned(self, member: Member) -> list[str]:
        """The unfinished supervisors the database says ``member`` owns (else, when no
        owner is recorded, the ones whose agent runs under it)."""
        created = list(self.journal.created)
        owned: list[str] = []
        if member.daemon_id is not None:
            owned = await self.db.owned(member.daemon_id, created)
        if owned:
            return owned
        running = sorted(set(self.book.live_agents(created, member.pid).values()))
        self.journal.note(
            f"{member.name}: no unfinished supervisor has owner_daemon_id = {member.daemon_id};"
            f" using the {len(running)} whose agent runs under pid {member.pid}"
        )
        return running

    async def _await_takeovers(
        self, supervisor_ids: Sequence[str], *, after: float, not_on: int | None, limit: float
    ) -> dict[str, float | None]:
        times: dict[str, float | None] = {}

        async def all_resumed() -> bool:
            nonlocal times
            times = cc.takeover_times(
                self.book.refresh(), supervisor_ids, after=after, not_on=not_on
            )
            return all(t is not None for t in times.values())

        await until(all_resumed, max(0.0, after + limit - time.monotonic()))
        await all_resumed()
        return times

    # ----------------------------------------------------------------- kill -9

    async def _kill(self, round_no: int, victim: Member) -> None:
        owned = await self._owned(victim)
        victim.down()
        killed_at, killed_wall = time.monotonic(), time.time()
        code = await victim.runner.kill()
        log.info("cluster_drill.killed", daemon=victim.name, status=code, supervisors=len(owned))
        self.journal.note(
            f"kill -9 {victim.name} (pid {victim.pid}) at {wall_time(killed_wall)}, owning "
            f"{len(owned)} supervisors"
        )
        limit = self.settings.takeover_limit
        times = await self._await_takeovers(
            owned, after=killed_at, not_on=victim.pid, limit=limit + 10.0
        )
        restored = await self.db.restored_after(owned, killed_wall)
        self.takeovers.append(Takeover("kill", round_no, victim.index, times, limit, restored))
        name = f"kill -9: supervisors resumed elsewhere within {limit:g}s"
        self.journal.judge(name, cc.slow_takeovers(times, limit), len(times))
        if not owned:
            self.journal.judge(name, [f"{victim.name} ran no supervisor when killed"], 0)
        self.journal.tell(f"round {round_no + 1}: restarting {victim.name}")
        before = victim.daemon_id
        await self.cluster.start_member(victim)
        self.journal.note(
            f"{victim.name} restarted after kill -9: daemon id {before} -> {victim.daemon_id}"
        )

    # ----------------------------------------------------------------- SIGSTOP, SIGCONT

    async def _pause(self, round_no: int, victim: Member) -> None:
        settings, journal = self.settings, self.journal
        owned = await self._owned(victim)
        agents = self.book.live_agents(owned, victim.pid)
        assert victim.pid is not None
        victim.down()
        paused_at, paused_wall = time.monotonic(), time.time()
        endings: dict[int, cc.Ending] = {}
        times: dict[str, float | None] = {}
        os.kill(victim.pid, signal.SIGSTOP)
        victim.paused = True
        journal.note(
            f"SIGSTOP {victim.name} (pid {victim.pid}) at {wall_time(paused_wall)}, owning "
            f"{len(owned)} supervisors, {len(agents)} agents running"
        )
        waits: set[str] = set()
        sampled = 0.0
        try:
            log.info("cluster_drill.paused", daemon=victim.name, agents=len(agents))
            earliest = paused_at + settings.lease_ttl + settings.lease_renew + 1.0
            latest = paused_at + settings.takeover_limit + 10.0
            while True:
                now = time.monotonic()
                if now - sampled >= 0.25:
                    sampled = now
                    waits |= await self.db.lock_waits()
                for pid, sid in agents.items():
                    if pid not in endings:
                        state = proc_state(pid)
                        if state is None or state.ended:
                            code = None if state is None else state.exit_code
                            endings[pid] = cc.Ending(pid, sid, now, code)
                times = cc.takeover_times(
                    self.book.refresh(), owned, after=paused_at, not_on=victim.pid
                )
                resumed = all(t is not None for t in times.values())
                if now >= latest or (now >= earliest and resumed and len(endings) == len(agents)):
                    break
                await anyio.sleep(POLL)
        finally:
            os.kill(victim.pid, signal.SIGCONT)
            victim.paused = False
        resumed_at = time.monotonic()
        journal.note(f"SIGCONT {victim.name} at {wall_time(time.time())}")
        for wait in sorted(waits)[:6]:
            journal.note(f"while {victim.name} was paused: {wait}")
        restored = await self.db.restored_after(owned, paused_wall)
        self.takeovers.append(
            Takeover("pause", round_no, victim.index, times, settings.takeover_limit, restored)
        )
        journal.judge(
            f"SIGSTOP: supervisors resumed elsewhere within {settings.takeover_limit:g}s",
            cc.slow_takeovers(times, settings.takeover_limit)
            + ([f"{victim.name} ran no supervisor when paused"] if not owned else []),
            len(times),
        )
        final = cc.with_exit_records(
            [endings.get(pid, cc.Ending(pid, sid, None, None)) for pid, sid in agents.items()],
            self.book.refresh(),
        )
        verdict = cc.self_stops(
            final,
            paused_at=paused_at,
            resumed_at=resumed_at,
            ttl=settings.lease_ttl,
            slack=SELF_STOP_SLACK,
        )
        if verdict.worst is not None:
            journal.note(
                f"paused {victim.name}: its agents stopped {verdict.worst:.2f}s "
                "after SIGSTOP at worst"
            )
        journal.judge(
            "SIGSTOP: the paused daemon's SDK agents stopped themselves within "
            f"{settings.lease_ttl:g}s (status 75)",
            verdict.problems + ([] if agents else [f"{victim.name} ran no agent when paused"]),
            len(agents),
        )
        await self._after_resume(victim, agents, owned, resumed_at)

    async def _after_resume(
        self,
        victim: Member,
        agents: Mapping[int, str],
        owned: Sequence[str],
        resumed_at: float,
    ) -> None:
        """After SIGCONT the fenced daemon must not run the old agents, nor start new
        ones for the supervisors it lost."""
        grace = 2 * self.settings.lease_renew + 5.0

        async def gone() -> bool:
            return not any(is_running(pid) for pid in agents)

        await until(gone, grace)
        problems = [
            f"pid {p} ({s[:8]}) still running {grace:g}s after SIGCONT"
            for p, s in agents.items()
            if is_running(p)
        ]
        restarted = [
            r
            for r in self.book.refresh()
            if r.what == cc.START
            and r.supervisor_id in owned
            and r.ppid == victim.pid
            and r.t > resumed_at
        ]
        problems += [
            f"{r.supervisor_id[:8]} restarted by the fenced daemon (pid {r.pid})" for r in restarted
        ]
        self.journal.judge(
            "SIGCONT: the fenced daemon runs none of its former agents", problems, len(agents)
        )
        if victim.runner.running:
            try:
                with anyio.fail_after(self.settings.call_timeout * 2):
                    async with ControlClient.connect(
                        victim.runner.socket_path, timeout=self.settings.call_timeout
                    ) as client:
                        status = await self.cluster.status(victim, client)
                victim.daemon_id = status.get("daemon_id", victim.daemon_id)
                self.journal.note(
                    f"{victim.name} after SIGCONT: still running (daemon id {victim.daemon_id})"
                )
                victim.up()
            except (ControlError, TimeoutError) as exc:
                self.journal.note(f"{victim.name} after SIGCONT: running but not answering ({exc})")
                victim.down()
        await self.cluster.ensure_running(victim, "after SIGCONT")

    # ----------------------------------------------------------------- pg_terminate_backend

    async def _terminate(self, round_no: int, victim: Member) -> None:
        settings, journal = self.settings, self.journal
        owned = await self._owned(victim)
        before = await self.db.owners(owned)
        agents = self.book.live_agents(owned, victim.pid)
        cut_at, cut_wall = time.monotonic(), time.time()
        name = f"makima-lease {victim.daemon_id}"
        rows = await self.db.terminate_backends(name)
        check = "pg_terminate_backend of a lease connection: kept, or a clean takeover"
        problems: list[str] = []
        if not rows:
            names = await self.db.application_names()
            problems.append(
                f"no backend named {name!r}; application names: "
                + ", ".join(repr(r["application_name"]) for r in names)
            )
        else:
            journal.note(
                f"pg_terminate_backend of {victim.name}'s lease backend(s) "
                f"{[r['pid'] for r in rows]} at {wall_time(cut_wall)}, owning {len(owned)}"
            )
        # Long enough for a missed deadline to show: its supervisors taken over.
        await anyio.sleep(settings.lease_ttl + settings.lease_renew + 1.0)
        times = cc.takeover_times(self.book.refresh(), owned, after=cut_at, not_on=victim.pid)
        after = await self.db.owners(owned)
        kept = moved = 0
        for sid in owned:
            same = after.get(sid) == before.get(sid)
            old = [p for p, s in agents.items() if s == sid]
            if same and all(is_running(p) for p in old) and times[sid] is None:
                kept += 1
            elif not same and times[sid] is not None and not any(is_running(p) for p in old):
                moved += 1
            else:
                problems.append(
                    f"{sid[:8]}: owner/epoch {before.get(sid)} -> {after.get(sid)}, old agent "
                    f"{'running' if any(is_running(p) for p in old) else 'gone'}, "
                    f"{'resumed elsewhere' if times[sid] is not None else 'not resumed elsewhere'}"
                )
        if not victim.runner.running:
            problems.append(f"{victim.name} exited after losing its lease connection")
        journal.note(f"lease cut on {victim.name}: {kept} supervisors kept, {moved} taken over")
        if moved:
            moved_times = {s: t for s, t in times.items() if t is not None}
            restored = await self.db.restored_after(list(moved_times), cut_wall)
            self.takeovers.append(
                Takeover(
                    "terminate",
                    round_no,
                    victim.index,
                    moved_times,
                    settings.takeover_limit,
                    restored,
                )
            )
            problems += cc.slow_takeovers(moved_times, settings.takeover_limit)
        if not owned:
            problems.append(f"{victim.name} ran no supervisor when its lease connection was cut")
        journal.judge(check, problems, len(owned))
