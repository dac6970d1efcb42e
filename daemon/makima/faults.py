"""A deterministic fault hook for crash drills and crash-boundary tests.

Off unless ``MAKIMA_FAULT`` names a point and a moment, e.g.
``MAKIMA_FAULT=ask:after_commit`` (optionally ``:N`` to fire at the N-th
occurrence, default 1, and ``:raise`` to raise instead of crash). By default
the daemon kills itself with SIGKILL at that moment: no cleanup, no flush,
exactly like a crash. With ``raise`` the supervisor at that point meets an
unexpected exception (:class:`InjectedFault`), which its crash boundary must
keep to itself. ``MAKIMA_FAULT_SUPERVISOR=NAME`` counts only the points that
the supervisor named NAME reaches.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from makima.errors import InvalidValueError

ENV_VAR = "MAKIMA_FAULT"
SUPERVISOR_ENV_VAR = "MAKIMA_FAULT_SUPERVISOR"


class SavePoint(enum.StrEnum):
    """The kinds of save point (DESIGN §5), and the other moments a fault can hit."""

    SPAWN = "spawn"
    ASK = "ask"
    ANSWER = "answer"
    PHASE = "phase"
    HEARTBEAT = "heartbeat"
    STATE_CHANGE = "state_change"
    CHECKPOINT = "checkpoint"
    MESSAGE = "message"
    TASK_FINISHED = "task_finished"
    # Not save points: a supervisor's restoration and its agent's launch.
    RESTORE = "restore"
    LAUNCH = "launch"


class Moment(enum.StrEnum):
    BEFORE_COMMIT = "before_commit"
    AFTER_COMMIT = "after_commit"


class FaultAction(enum.StrEnum):
    KILL = "kill"  # SIGKILL the daemon
    RAISE = "raise"  # raise InjectedFault where the point is reached


class InjectedFault(RuntimeError):
    """The exception a ``raise`` fault throws: unexpected on purpose (no MakimaError)."""


@dataclass(frozen=True, slots=True)
class FaultPlan:
    point: SavePoint
    moment: Moment
    occurrence: int = 1
    action: FaultAction = FaultAction.KILL
    supervisor: str | None = None  # only this supervisor's points count

    @classmethod
    def parse(cls, text: str, supervisor: str | None = None) -> FaultPlan:
        parts = text.split(":")
        action = FaultAction.KILL
        if parts and parts[-1] in {a.value for a in FaultAction}:
            action = FaultAction(parts.pop())
        if len(parts) not in (2, 3):
            raise InvalidValueError(
                f"{ENV_VAR} must look like POINT:MOMENT[:N][:kill|raise]; got {text!r}"
            )
        try:
            point = SavePoint(parts[0])
            moment = Moment(parts[1])
        except ValueError:
            raise InvalidValueError(
                f"{ENV_VAR}={text!r}: point must be one of "
                f"{', '.join(p.value for p in SavePoint)} and moment one of "
                f"{', '.join(m.value for m in Moment)}"
            ) from None
        occurrence = 1
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                raise InvalidValueError(f"{ENV_VAR}={text!r}: N must be a positive integer")
            occurrence = int(parts[2])
        return cls(point, moment, occurrence, action, supervisor or None)


class FaultHook:
    """Counts points reached and fires at the planned one."""

    def __init__(self, plan: FaultPlan | None) -> None:
        self.plan = plan
        self._seen = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultHook:
        env = os.environ if environ is None else environ
        value = env.get(ENV_VAR, "").strip()
        target = env.get(SUPERVISOR_ENV_VAR, "").strip() or None
        return cls(FaultPlan.parse(value, target) if value else None)

    def should_fire(self, point: SavePoint, moment: Moment, supervisor: str | None = None) -> bool:
        """Pure part: count and decide."""
        plan = self.plan
        if plan is None or plan.point is not point or plan.moment is not moment:
            return False
        if plan.supervisor is not None and plan.supervisor != supervisor:
            return False
        self._seen += 1
        return self._seen == plan.occurrence

    def reached(self, point: SavePoint, moment: Moment, supervisor: str | None = None) -> None:
        """``supervisor``: the name of the supervisor at this point, if one is."""
        if not self.should_fire(point, moment, supervisor):
            return
        assert self.plan is not None
        if self.plan.action is FaultAction.RAISE:
            raise InjectedFault(f"injected fault at {point.value}:{moment.value}")
        os.kill(os.getpid(), signal.SIGKILL)
