"""The drill's work for the cluster: supervisors created over every daemon, their
events followed, every question answered through the daemons' sockets in turn."""

from __future__ import annotations

import contextlib
import math
import sys
from collections import Counter
from collections.abc import Mapping
from typing import Any

import anyio
import structlog

from makima.cluster_drill.context import Journal, until
from makima.cluster_drill.database import SharedDatabase
from makima.cluster_drill.processes import Cluster, Member
from makima.cluster_drill.settings import ClusterSettings
from makima.control.client import ControlClient, ControlError, RemoteError

log = structlog.get_logger("makima.cluster_drill")

AGENT_MODULE = "makima.examples.drill_agent"
CONFLICT = -32002
ANSWER_ATTEMPTS = 25


class Traffic:
    """Creates the supervisors, watches every daemon's events, answers each question
    once (``continue``, then ``finish`` once finishing) and polls for what was missed."""

    def __init__(self, settings: ClusterSettings, cluster: Cluster, journal: Journal) -> None:
        self.settings = settings
        self.cluster = cluster
        self.journal = journal
        self.queued: set[str] = set()
        self.finishing = False
        self.closing = False
        self.refusals: Counter[str] = Counter()  # answers refused, by code and message
        self._rr = 0
        send, receive = anyio.create_memory_object_stream[str](math.inf)
        self._queue_send = send
        self._queue_receive = receive

    def close(self) -> None:
        self._queue_send.close()
        self._queue_receive.close()

    # ----------------------------------------------------------------- events, answers

    async def watch(self, member: Member) -> None:
        """Follow one daemon's events while it is available; reconnect when it is back."""
        while not self.closing:
            await member.back.wait()
            try:
                async with (
                    ControlClient.connect(
                        member.runner.socket_path, timeout=self.settings.call_timeout
                    ) as client,
                    client.events() as events,
                ):
                    member.client = client
                    async for event in events:
                        self._on_event(event)
            except ControlError as exc:
                log.info("cluster_drill.watch_lost", daemon=member.name, error=str(exc))
            finally:
                member.client = None
            await anyio.sleep(0.2)  # a dead or paused daemon: do not spin

    def _on_event(self, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        if kind in ("question.asked", "question.pending", "question.redelivered"):
            self._offer(str(event.get("question_id")))
        elif kind == "supervisor.state_changed" and event.get("state") in ("completed", "failed"):
            sid = str(event.get("supervisor_id"))
            if sid in self.journal.created:
                self.journal.finished.add(sid)
                self.journal.tell()

    def _offer(self, question_id: str) -> None:
        if question_id in self.journal.accepted or question_id in self.queued:
            return
        self.queued.add(question_id)
        self._queue_send.send_nowait(question_id)

    def _next_member(self) -> Member | None:
        """The next daemon in turn that can take a call (round robin over the sockets)."""
        members = self.cluster.members
        count = len(members)
        for _ in range(count):
            member = members[self._rr % count]
            self._rr += 1
            if member.available and member.client is not None:
                return member
        return None

    async def answer_loop(self) -> None:
        async for question_id in self._queue_receive:
            try:
                await self._answer(question_id)
            finally:
                self.queued.discard(question_id)

    async def _answer(self, question_id: str) -> None:
        """Answer once, through whichever daemon is next; try the others on failure
        (for a while: a question still open is offered again by the poller)."""
        accepted = self.journal.accepted
        for _ in range(ANSWER_ATTEMPTS):
            if question_id in accepted or self.closing:
                return
            member = self._next_member()
            client = None if member is None else member.client
            if member is None or client is None:
                await anyio.sleep(0.1)
                continue
            choice = "finish" if self.finishing else "continue"
            try:
                await self.cluster.call(
                    member,
                    client,
                    "question.answer",
                    {"question_id": question_id, "answer": choice},
                )
            except RemoteError as exc:
                existing = exc.data.get("answer") if isinstance(exc.data, dict) else None
                if exc.code == CONFLICT and isinstance(existing, str):
                    accepted[question_id] = existing  # answered already, through another
                    return
                log.info(
                    "cluster_drill.answer_refused",
                    daemon=member.name,
                    question_id=question_id,
                    code=exc.code,
                    error=str(exc),
                )
                self.refusals[f"{exc.code} {exc}"[:160]] += 1
                await anyio.sleep(0.2)
            except ControlError as exc:
                log.info("cluster_drill.answer_failed", daemon=member.name, error=str(exc))
            else:
                accepted[question_id] = choice
                member.answers += 1
                self.journal.tell()
                return
        log.warning("cluster_drill.answer_given_up", question_id=question_id)

    def _drain_notifications(self) -> None:
        """Read what the daemons told "systemd" since READY (their STATUS= lines), so
        that a full notification socket makes no daemon log a failure."""
        for member in self.cluster.members:
            notify = member.runner.notify
            if notify is not None and member.runner.running and not member.paused:
                with contextlib.suppress(OSError):
                    notify.drain()
                notify.messages.clear()

    async def poll_loop(self) -> None:
        """Every second, through one daemon in turn: open questions (in case an event
        was missed while a daemon was down) and finished supervisors."""
        call, created = self.cluster.call, self.journal.created
        while not self.closing:
            self._drain_notifications()
            member = self._next_member()
            client = None if member is None else member.client
            if client is not None:
                try:
                    assert member is not None
                    for q in (await call(member, client, "question.list"))["questions"]:
                        self._offer(str(q["question_id"]))
                    listed = await call(member, client, "supervisor.list", {"all": True})
                    rows = listed["supervisors"]
                    for row in rows:
                        sid = str(row.get("supervisor_id"))
                        if sid in created and row.get("state") in ("completed", "failed"):
                            self.journal.finished.add(sid)
                except ControlError as exc:
                    log.info("cluster_drill.poll_failed", error=str(exc))
            await anyio.sleep(1.0)

    # ----------------------------------------------------------------- supervisors

    async def create_supervisors(self) -> None:
        self.journal.tell(f"creating {self.settings.supervisors} supervisors")
        env = {
            "MAKIMA_DRILL_DIR": str(self.cluster.records_dir),
            "MAKIMA_DRILL_PACE": str(self.settings.pace),
        }
        members = self.cluster.members

        async with contextlib.AsyncExitStack() as stack:
            clients = [
                await stack.enter_async_context(
                    ControlClient.connect(m.runner.socket_path, timeout=30.0)
                )
                for m in members
            ]
            for n in range(self.settings.supervisors):
                index = n % len(members)  # spread over the daemons, through each socket
                result = await clients[index].call(
                    "supervisor.create",
                    {
                        "name": f"drill-{n}",
                        "goal": f"cluster drill supervisor {n}",
                        "command": [sys.executable, "-m", AGENT_MODULE],
                        "cwd": str(self.cluster.scratch),
                        "env": env,
                    },
                )
                self.journal.created[str(result["supervisor_id"])] = index
                self.journal.tell()

    async def warm_up(self) -> None:
        """Every supervisor has had one question answered."""
        journal, book = self.journal, self.cluster.book
        journal.tell("warming up: a first answer for every supervisor")

        async def answered_everywhere() -> bool:
            got = {r.supervisor_id for r in book.refresh() if r.what == "answer"}
            return set(journal.created) <= got

        limit = 30.0 + 0.5 * len(journal.created)
        if not await until(answered_everywhere, limit):
            got = {r.supervisor_id for r in book.refresh() if r.what == "answer"}
            journal.note(
                f"warm-up: {len(set(journal.created) & got)}/{len(journal.created)} supervisors "
                f"answered within {limit:.0f}s"
            )

    async def finish(self, db: SharedDatabase) -> None:
        """Every question from now on answered ``finish``; wait for every supervisor
        to complete (or fail)."""
        journal = self.journal
        journal.tell("finishing: every question now answered 'finish'")
        self.finishing = True
        ids = list(journal.created)

        async def all_finished() -> bool:
            journal.finished |= await db.finished(ids)
            journal.tell()
            return len(journal.finished) >= len(ids)

        limit = 60.0 + 1.0 * len(ids)
        if not await until(all_finished, limit):
            journal.note(
                f"{len(ids) - len(journal.finished)} supervisors unfinished after {limit:.0f}s"
            )
