"""This daemon as a member of a cluster (DESIGN §13; the timing argument is in
:mod:`makima.cluster`): its lease connection, the renewal and lapse loops, the
claim rounds, what arrives by LISTEN/NOTIFY, and its events sent to the others.

The daemon (:class:`Host`) decides what each piece of news means for its
supervisors; this module only keeps time and carries messages.
"""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import anyio
import anyio.abc
import asyncpg
import structlog

from makima.cluster import Kind, LeaseTimer, Notice, boottime, event_notice, parse_notice
from makima.database import is_connection_error
from makima.events import EventBus, EventKind
from makima.model import Fence
from makima.repository import CHANNEL
from makima.store import DaemonRegistered, LeaseReleased, LeaseRenewed, Store

log = structlog.get_logger("makima.member")

# Events each daemon keeps to itself: heartbeats would flood the channel.
LOCAL_ONLY = frozenset({EventKind.SUPERVISOR_UPDATED.value})
FORWARD_EVERY = 0.05  # seconds: events go to the other daemons in batches
FORWARD_BATCH = 200


class Host(Protocol):
    """What the member asks of its daemon."""

    @property
    def daemon_id(self) -> uuid.UUID: ...

    @property
    def stopping(self) -> bool: ...

    def running_fences(self) -> dict[uuid.UUID, Fence]: ...

    def fenced(
        self,
        supervisor_ids: Iterable[uuid.UUID],
        why: str,
        as_of: Mapping[uuid.UUID, Fence] | None = None,
    ) -> None: ...

    def lapsed(self) -> None: ...

    async def claim_round(self, *, own: bool) -> None: ...

    async def handle_requests(self, request_ids: Sequence[uuid.UUID]) -> None: ...

    async def absorb_answers(self, question_ids: Sequence[uuid.UUID]) -> None: ...

    async def ping_agents(self, valid_for: float) -> None: ...


class Member:
    """The lease and the channel of one daemon."""

    def __init__(
        self, host: Host, store: Store, bus: EventBus, timer: LeaseTimer, *, cluster: bool
    ) -> None:
        self.host = host
        self.store = store
        self.bus = bus
        self.timer = timer
        self.cluster = cluster  # a shared database: peers may exist
        self.peers = 0
        self.is_lapsed = False
        self._conn: asyncpg.Connection | None = None
        self._tg: anyio.abc.TaskGroup | None = None
        self._claim_now = anyio.Event()
        self._claim_own = False
        self._renewed = anyio.Event()
        self._hostname = socket.gethostname()

    @property
    def application_name(self) -> str:
        return f"makima-lease {self.host.daemon_id}"

    def lease_valid(self) -> bool:
        return self.timer.valid(boottime())

    # ----------------------------------------------------------------- running

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Renew (the first renewal before ``started``), watch the lease, claim, listen
        and forward events, until cancelled."""
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                await self._first_renewal()
                tg.start_soon(self._renew_loop)
                tg.start_soon(self._lapse_watch)
                tg.start_soon(self._claim_loop)
                if self.cluster:
                    tg.start_soon(self._forward_events)
                task_status.started()
        finally:
            self._tg = None
            with anyio.CancelScope(shield=True):
                await self._drop_connection()

    async def _first_renewal(self) -> None:
        """The daemon's start waits for its lease (the database is up: it just
        applied the schema); failures are retried like any renewal. It registers
        first: this start's pid, host and start time (the renewals keep them)."""
        await self.store.register_daemon(
            DaemonRegistered(self.host.daemon_id, self._hostname, os.getpid(), self.timer.ttl)
        )
        while True:
            sent = boottime()
            if await self._renew(sent):
                return
            await anyio.sleep(0.5)

    async def _renew_loop(self) -> None:
        sent = boottime()
        failed = False
        while True:
            now = boottime()
            wake = self.timer.next_renewal(now, sent, failed)
            await anyio.sleep(max(0.0, wake - now))
            sent = boottime()
            failed = not await self._renew(sent)

    async def _renew(self, sent: float) -> bool:
        """One renewal (and poll); True when it succeeded."""
        running = self.host.running_fences()
        limit = max(0.5, min(self.timer.renew, self.timer.ttl / 3))
        try:
            with anyio.fail_after(limit):
                conn = await self._connection()
                renewal = await self.store.renew_lease(
                    LeaseRenewed(
                        self.host.daemon_id, self._hostname, os.getpid(), self.timer.ttl, running
                    ),
                    db=conn,
                )
        except Exception as exc:
            if not (isinstance(exc, TimeoutError) or is_connection_error(exc)):
                log.exception("lease.renew_failed", error=f"{type(exc).__name__}: {exc}")
            else:
                log.warning("lease.renew_failed", error=f"{type(exc).__name__}: {exc}")
            await self._drop_connection()
            return False
        regained = self.is_lapsed
        self.timer.renewed(sent)
        self.peers = renewal.peers
        if regained:
            self.is_lapsed = False
            log.warning("lease.regained", daemon_id=str(self.host.daemon_id))
            self._claim_own = True  # what it still owns comes back here
            self._claim_now.set()
        self._renewed.set()
        self._renewed = anyio.Event()
        if renewal.fenced:
            why = "another daemon claimed it (seen at a lease renewal)"
            self.host.fenced(renewal.fenced, why, as_of=running)
        if self.timer.enforced:
            await self.host.ping_agents(self.timer.valid_for(boottime()))
        if self._tg is not None:
            if renewal.requests:
                self._tg.start_soon(self.host.handle_requests, renewal.requests)
            if renewal.answered:
                self._tg.start_soon(self.host.absorb_answers, renewal.answered)
        self._claim_now.set()  # what nobody holds (or ours that does not run here)
        return True

    async def _connection(self) -> asyncpg.Connection:
        if self._conn is None or self._conn.is_closed():
            conn = await self.store.db.connect(self.application_name)
            if self.cluster:
                await conn.add_listener(CHANNEL, self._heard)
            self._conn = conn
        return self._conn

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            conn.terminate()

    async def _lapse_watch(self) -> None:
        """Past the lease's local deadline without a renewal: stop every agent."""
        if not self.timer.enforced:
            return
        while True:
            now = boottime()
            if self.timer.valid(now):
                # Woken at least every second: a suspended machine's sleeps overrun.
                await anyio.sleep(min(self.timer.valid_until - now, 1.0))
                continue
            if not self.is_lapsed:
                self.is_lapsed = True
                log.error(
                    "daemon.lease_lost",
                    daemon_id=str(self.host.daemon_id),
                    ttl_s=self.timer.ttl,
                    note="no renewal succeeded before the lease's local deadline; every agent "
                    "is stopped before any peer may take its supervisor over",
                )
                self.host.lapsed()
            await self._renewed.wait()

    async def _claim_loop(self) -> None:
        """Claim what nobody holds a lease on: after each renewal, and at once when a
        daemon releases its lease."""
        while True:
            await self._claim_now.wait()
            self._claim_now = anyio.Event()
            if self.host.stopping or not self.lease_valid():
                continue
            own, self._claim_own = self._claim_own, False
            try:
                await self.host.claim_round(own=own)
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                self._claim_own = self._claim_own or own
                log.warning("lease.claim_failed", error=f"{type(exc).__name__}: {exc}")

    # ----------------------------------------------------------------- the channel

    def _heard(self, conn: Any, pid: int, channel: str, payload: object) -> None:
        notice = parse_notice(str(payload))
        if notice is None or notice.daemon_id == self.host.daemon_id or self._tg is None:
            return
        self._act(notice)

    def _act(self, notice: Notice) -> None:
        assert self._tg is not None
        if notice.kind is Kind.RELEASED:
            self._claim_now.set()
        elif notice.kind is Kind.ANSWER and notice.item_id is not None:
            if notice.supervisor_id in self.host.running_fences():
                self._tg.start_soon(self.host.absorb_answers, [notice.item_id])
        elif notice.kind is Kind.REQUEST and notice.item_id is not None:
            if notice.supervisor_id in self.host.running_fences():
                self._tg.start_soon(self.host.handle_requests, [notice.item_id])
        elif notice.kind is Kind.EVENT and notice.event is not None:
            event = dict(notice.event)
            kind = event.pop("kind", None)
            try:
                known = EventKind(kind)
            except ValueError:
                return
            event["daemon_id"] = str(notice.daemon_id)
            self.bus.publish(known, **event)

    async def tell(self, payloads: Sequence[str]) -> None:
        """Notify the other daemons (best effort: what matters is in the rows)."""
        if not self.cluster or not payloads:
            return
        try:
            await self.store.notify(payloads)
        except Exception as exc:  # noqa: BLE001 - the poll at each renewal covers it
            log.warning("cluster.notify_failed", error=f"{type(exc).__name__}: {exc}")

    async def _forward_events(self) -> None:
        """This daemon's events (not those heard from others) to the other daemons, a
        batch at a time: what arrives within FORWARD_EVERY of the first goes with it."""
        while True:
            subscription = self.bus.subscribe(internal=True)
            try:
                async for first in subscription:
                    await anyio.sleep(FORWARD_EVERY)
                    events = [first, *subscription.take_ready(FORWARD_BATCH)]
                    payloads = [
                        payload
                        for event in events
                        if event.get("kind") not in LOCAL_ONLY and "daemon_id" not in event
                        if (payload := event_notice(self.host.daemon_id, event)) is not None
                    ]
                    await self.tell(payloads)
            finally:
                subscription.close()
            log.warning("cluster.forwarding_resumed", note="the event forwarder fell behind")

    async def release(self) -> None:
        """A handover: let go of the lease so that peers claim now."""
        try:
            await self.store.release_lease(LeaseReleased(self.host.daemon_id))
        except Exception as exc:  # noqa: BLE001 - they claim at the TTL then
            log.warning("lease.release_failed", error=f"{type(exc).__name__}: {exc}")
        else:
            log.info("lease.released", daemon_id=str(self.host.daemon_id), peers=self.peers)
