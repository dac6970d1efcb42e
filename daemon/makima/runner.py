"""One runner per supervisor: launching its agent, the restart policy, and the
crash boundary.

The restart policy is a pure decision (:func:`next_restart`): an agent that
exits without ``done`` or ``fail`` is restarted with backoff, at most
``limit`` times within ``window`` seconds, as OTP's restart intensity.

The crash boundary, also as in OTP: one child's crash belongs to that child.
An unexpected exception while this supervisor launches, runs, restores, saves
or stops ends here: the supervisor becomes ``failed`` with the exception named
in its ``error_message``, ``supervisor.crashed`` is logged with the traceback,
and the daemon and every other supervisor carry on.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import anyio
import structlog

from makima.errors import ConflictError, FencedError, MakimaError, crash_reason, leaf_exceptions
from makima.faults import Moment, SavePoint
from makima.model import RestorationInfo, RestorationSource
from makima.restoration import Restorer, after_start, info, restore_one, start_payload
from makima.supervisor import StopReason, Supervisor

log = structlog.get_logger("makima.runner")

T = TypeVar("T")
AfterStart = Callable[[], Awaitable[None]] | None


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    limit: int = 5
    window: float = 300.0
    backoff: float = 0.5
    max_delay: float = 30.0


@dataclass(frozen=True, slots=True)
class RestartDecision:
    """``delay`` before the next start, or None: give up with ``reason``."""

    restarts: tuple[float, ...]  # the restarts within the window, this one included
    delay: float | None
    reason: str = ""


def next_restart(
    policy: RestartPolicy, restarts: tuple[float, ...], now: float, last_exit: str
) -> RestartDecision:
    """Whether to restart an agent that exited at ``now`` without done or fail (pure);
    ``last_exit`` says how it ended, for the reason when giving up."""
    kept = (*(t for t in restarts if now - t <= policy.window), now)
    if len(kept) > policy.limit:
        return RestartDecision(
            kept,
            None,
            f"the agent exited without done or fail {len(kept)} times within "
            f"{policy.window:.0f}s (last: {last_exit}); not restarting it again",
        )
    return RestartDecision(kept, min(policy.backoff * 2 ** (len(kept) - 1), policy.max_delay))


def _fenced_in(exc: BaseException) -> FencedError | None:
    """The FencedError ``exc`` is or holds, if any."""
    if isinstance(exc, FencedError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for leaf in leaf_exceptions(exc):
            if isinstance(leaf, FencedError):
                return leaf
    return None


class _Waiter:
    """A manual resume waiting for the runner's loop to restore the supervisor."""

    def __init__(self) -> None:
        self.done = anyio.Event()
        self.result: RestorationInfo | None = None


class Runner:
    """Runs one supervisor until it finishes or the daemon stops it."""

    def __init__(
        self,
        supervisor: Supervisor,
        restorer: Restorer,
        policy: RestartPolicy,
        on_exit: Callable[[Runner], None],
    ) -> None:
        self.supervisor = supervisor
        self.restorer = restorer
        self.policy = policy
        self._on_exit = on_exit
        self._wake: anyio.Event | None = None
        self._resume: _Waiter | None = None
        self._restoring = False
        self._start: tuple[Mapping[str, Any] | None, AfterStart] = (None, None)

    @property
    def id(self) -> uuid.UUID:
        return self.supervisor.id

    # ----------------------------------------------------------------- the loop

    async def run(
        self,
        restoration: Mapping[str, Any] | None,
        after: AfterStart,
        gate: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """Run the supervisor's agent (after ``gate``, when given: a turn to start it)."""
        # Handed over, not kept in this frame: the supervisor drops them once used.
        self._start = (restoration, after)
        del restoration, after
        try:
            if gate is not None:
                await gate()
            await self._loop()
        except* Exception as group:  # noqa: BLE001 - the crash boundary (a cancellation
            await self.crash(group, "running its agent")  # that came with it goes on)
        finally:
            self._on_exit(self)
            if self._resume is not None:
                self._resume.done.set()

    def _take_start(self) -> tuple[Mapping[str, Any] | None, AfterStart]:
        start, self._start = self._start, (None, None)
        return start

    async def _loop(self) -> None:
        supervisor = self.supervisor
        restarts: tuple[float, ...] = ()
        while True:
            self.restorer.faults.reached(
                SavePoint.LAUNCH, Moment.BEFORE_COMMIT, supervisor.spec.name
            )
            ended = await supervisor.run(*self._take_start())
            if ended.finished or ended.stopped in (
                StopReason.SHUTDOWN,
                StopReason.CANCEL,
                StopReason.FENCED,
            ):
                return
            if ended.stopped is StopReason.RESTART:
                source = RestorationSource.MANUAL
            else:
                last_exit = supervisor.state.error_message or f"exit status {ended.exit_code}"
                decision = next_restart(self.policy, restarts, anyio.current_time(), last_exit)
                restarts = decision.restarts
                if decision.delay is None:
                    log.warning("supervisor.restart_limit", supervisor_id=str(self.id))
                    await supervisor.give_up(decision.reason)
                    return
                log.info(
                    "supervisor.agent_restart_scheduled",
                    supervisor_id=str(self.id),
                    delay_s=decision.delay,
                    restarts_in_window=len(restarts),
                )
                self._wake = anyio.Event()
                with anyio.move_on_after(decision.delay):
                    await self._wake.wait()
                self._wake = None
                if supervisor.is_fenced:  # taken over while waiting: not ours to restore
                    return
                source = (
                    RestorationSource.MANUAL
                    if self._resume is not None
                    else RestorationSource.AGENT_RESTART
                )
            # Answers and cancels wait while the state is read and rewritten.
            self._restoring = True
            try:
                async with supervisor.exclusive():
                    plan = await restore_one(self.restorer, self.id, source, supervisor.fence)
                    payload = start_payload(plan)
                    supervisor.reset(plan.state, payload.given)
            finally:
                self._restoring = False
            waiter, self._resume = self._resume, None
            if waiter is not None:
                waiter.result = info(plan)
                waiter.done.set()
            if not plan.launches:
                return
            self._start = (
                payload.restoration,
                after_start(self.restorer, supervisor, plan, payload),
            )
            del plan, payload

    async def resume(self) -> RestorationInfo:
        """A manual resume: restart the agent through restoration, now."""
        if self._resume is not None:
            raise ConflictError(f"supervisor {self.id} is being resumed already")
        waiter = self._resume = _Waiter()
        if self._wake is not None:
            self._wake.set()  # it was waiting to restart its agent: go now
        elif not self._restoring:  # (restoring now: that restoration answers this one)
            try:
                await self.call(
                    "resuming it",
                    lambda: self.supervisor.stop(StopReason.RESTART, "resumed by a person"),
                )
            except BaseException:
                self._resume = None
                raise
        await waiter.done.wait()
        if waiter.result is None:
            raise ConflictError(f"supervisor {self.id} finished before it could be resumed")
        return waiter.result

    # ----------------------------------------------------------------- the boundary

    async def crash(self, exc: BaseException, during: str) -> None:
        """Fail this supervisor for an unexpected exception; never raises. A supervisor
        taken over by another daemon (FencedError) is stopped here instead, with
        nothing written: it is not this daemon's to fail any more."""
        fenced = _fenced_in(exc)
        if fenced is not None or self.supervisor.is_fenced:
            self.supervisor.fence_broken(str(fenced) if fenced else f"fenced while {during}")
            return
        reason = crash_reason(exc, during)
        log.error(
            "supervisor.crashed",
            supervisor_id=str(self.id),
            name=self.supervisor.spec.name,
            during=during,
            error=reason,
            exc_info=exc,
        )
        try:
            await self.supervisor.fail_unexpectedly(reason)
        except Exception as second:
            log.exception(
                "supervisor.crash_not_saved",
                supervisor_id=str(self.id),
                error=f"{type(second).__name__}: {second}",
            )

    async def call(self, during: str, operation: Callable[[], Awaitable[T]]) -> T:
        """Do ``operation`` for a person (answer, cancel, resume) inside the boundary:
        an unexpected error fails this supervisor and is reported as a MakimaError."""
        try:
            return await operation()
        except FencedError as exc:
            self.supervisor.fence_broken(str(exc))
            raise
        except MakimaError:
            raise
        except Exception as exc:
            await self.crash(exc, during)
            raise MakimaError(crash_reason(exc, during)) from exc

    def guarded(
        self, during: str, operation: Callable[[], Awaitable[Any]]
    ) -> Callable[[], Awaitable[None]]:
        """``operation`` for the daemon to run later (an answer's delivery), inside
        the boundary: whatever it raises stays with this supervisor."""

        async def run() -> None:
            try:
                await operation()
            except FencedError as exc:  # taken over: its new owner delivers
                self.supervisor.fence_broken(str(exc))
            except MakimaError as exc:  # refused, say: the next restoration tries again
                log.warning(
                    "supervisor.effect_failed",
                    supervisor_id=str(self.id),
                    during=during,
                    error=str(exc),
                )
            except Exception as exc:  # noqa: BLE001 - the crash boundary
                await self.crash(exc, during)

        return run
