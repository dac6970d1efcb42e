"""One lane per notifier: its notices, given concurrently up to its limit and tried
again with backoff until they succeed; a slow or failing notifier holds up only
its own lane.

The :class:`Dispatcher` turns each notice into deliveries through the record's
decisions (:meth:`NotifyState.plan`), and records each success
(:meth:`NotifyState.mark_told`), which the :class:`StateKeeper` writes soon after.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import anyio
import anyio.abc
import structlog

from makima.notify.base import DeliveryError, DeliveryRefusedError, Notifier
from makima.notify.message import Notice, NoticeKind
from makima.notify.statefile import StateKeeper

log = structlog.get_logger("makima.notify")

MAX_PENDING = 10_000
"""Notices one lane holds at once (each is one open question, so rarely near)."""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """The wait before a lane tries a failed notice again: doubling, capped, jittered."""

    first: float = 2.0
    longest: float = 300.0

    def delay(self, failures: int) -> float:
        base = min(self.first * 2.0 ** min(failures - 1, 30), self.longest)
        jitter: float = random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not a secret
        return base * jitter


Told = Callable[[Notice, str], None]


class Lane:
    def __init__(
        self,
        notifier: Notifier,
        tg: anyio.abc.TaskGroup,
        told: Told,
        policy: RetryPolicy,
        limit: int = MAX_PENDING,
    ) -> None:
        self.notifier = notifier
        self._tg = tg
        self._told = told
        self._policy = policy
        self._limit = limit
        self._limiter = anyio.CapacityLimiter(max(1, notifier.concurrency))
        self._pending: dict[tuple[str, NoticeKind], anyio.CancelScope] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def submit(self, notice: Notice) -> None:
        key = (notice.question_id, notice.kind)
        if key in self._pending:
            return
        if len(self._pending) >= self._limit:
            log.error(
                "notify.lane_full", notifier=self.notifier.label, question_id=notice.question_id
            )
            return
        scope = anyio.CancelScope()
        self._pending[key] = scope
        self._tg.start_soon(self._deliver, notice, scope, name=f"notify {self.notifier.label}")

    def drop(self, question_id: str) -> None:
        """The question is closed: stop telling people it is waiting."""
        scope = self._pending.pop((question_id, NoticeKind.ASKED), None)
        if scope is not None:
            scope.cancel()

    def retract(self, question_id: str) -> None:
        self._tg.start_soon(self._retract, question_id)

    async def _retract(self, question_id: str) -> None:
        try:
            await self.notifier.retract(question_id)
        except Exception:  # one notifier's failure is its own
            log.exception("notify.retract_failed", notifier=self.notifier.label)

    async def _deliver(self, notice: Notice, scope: anyio.CancelScope) -> None:
        key = (notice.question_id, notice.kind)
        where = {
            "notifier": self.notifier.label,
            "question_id": notice.question_id,
            "notice": notice.kind.value,
        }
        failures = 0
        try:
            with scope:
                while True:
                    async with self._limiter:
                        try:
                            await self.notifier.deliver(notice)
                        except DeliveryRefusedError as exc:
                            log.error(  # noqa: TRY400 - the reason says it all
                                "notify.delivery_refused", **where, reason=str(exc)
                            )
                            return
                        except DeliveryError as exc:
                            reason = str(exc)
                        except Exception as exc:  # one notifier's failure is its own
                            log.exception("notify.notifier_crashed", **where)
                            reason = repr(exc)
                        else:
                            log.info("notify.told", **where, attempts=failures + 1)
                            self._told(notice, self.notifier.name)
                            return
                    failures += 1
                    delay = self._policy.delay(failures)
                    log.warning(
                        "notify.delivery_failed",
                        **where,
                        failures=failures,
                        retry_in=round(delay, 2),
                        reason=reason,
                    )
                    await anyio.sleep(delay)
        finally:
            if self._pending.get(key) is scope:
                del self._pending[key]


class Dispatcher:
    """Hands notices to the lanes of the notifiers that still have to give them."""

    def __init__(
        self,
        notifiers: Sequence[Notifier],
        keeper: StateKeeper,
        wanted: Iterable[NoticeKind],
        policy: RetryPolicy | None = None,
    ) -> None:
        self.notifiers = list(notifiers)
        self.keeper = keeper
        self.wanted = frozenset(wanted)
        self.policy = policy or RetryPolicy()
        self.lanes: dict[str, Lane] = {}

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        async with anyio.create_task_group() as tg:
            for notifier in self.notifiers:
                self.lanes[notifier.name] = Lane(notifier, tg, self._told, self.policy)
            task_status.started()
            await anyio.sleep_forever()

    def notice(self, notice: Notice) -> None:
        state = self.keeper.state
        before = state.revision
        targets = state.plan(notice, list(self.lanes), self.wanted)
        if state.revision != before:
            self.keeper.changed()
        if notice.kind is NoticeKind.ANSWERED:
            self._closed([notice.question_id])
        for name in targets:
            self.lanes[name].submit(notice)

    def supervisor_finished(self, supervisor_id: str) -> None:
        closed = self.keeper.state.close_supervisor(supervisor_id)
        if closed:
            self.keeper.changed()
            self._closed(closed)

    def prune(self, open_ids: Iterable[str]) -> None:
        """The daemon's whole list of open questions: forget (and retract) the others."""
        gone = self.keeper.state.prune(open_ids)
        if gone:
            log.info("notify.forgot_closed_questions", count=len(gone))
            self.keeper.changed()
            self._closed(gone)

    def _closed(self, question_ids: Iterable[str]) -> None:
        for qid in question_ids:
            for lane in self.lanes.values():
                lane.drop(qid)
                lane.retract(qid)

    def _told(self, notice: Notice, notifier: str) -> None:
        if self.keeper.state.mark_told(notice.question_id, notice.kind, notifier):
            self.keeper.changed()
