"""A deterministic fault hook for crash drills.

Off unless ``MAKIMA_FAULT`` names a save point and a moment, e.g.
``MAKIMA_FAULT=ask:after_commit`` (optionally ``:N`` to fire at the N-th
occurrence, default 1). At that moment the daemon kills itself with SIGKILL:
no cleanup, no flush, exactly like a crash.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Mapping
from dataclasses import dataclass

from makima.errors import InvalidValueError

ENV_VAR = "MAKIMA_FAULT"


class SavePoint(enum.StrEnum):
    """The kinds of save point (DESIGN §5)."""

    SPAWN = "spawn"
    ASK = "ask"
    ANSWER = "answer"
    PHASE = "phase"
    HEARTBEAT = "heartbeat"
    STATE_CHANGE = "state_change"
    CHECKPOINT = "checkpoint"
    MESSAGE = "message"
    TASK_FINISHED = "task_finished"


class Moment(enum.StrEnum):
    BEFORE_COMMIT = "before_commit"
    AFTER_COMMIT = "after_commit"


@dataclass(frozen=True, slots=True)
class FaultPlan:
    point: SavePoint
    moment: Moment
    occurrence: int = 1

    @classmethod
    def parse(cls, text: str) -> FaultPlan:
        parts = text.split(":")
        if len(parts) not in (2, 3):
            raise InvalidValueError(f"{ENV_VAR} must look like POINT:MOMENT[:N]; got {text!r}")
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
        return cls(point, moment, occurrence)


class FaultHook:
    """Counts save points and kills the process at the planned one."""

    def __init__(self, plan: FaultPlan | None) -> None:
        self.plan = plan
        self._seen = 0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> FaultHook:
        value = (environ if environ is not None else os.environ).get(ENV_VAR, "").strip()
        return cls(FaultPlan.parse(value) if value else None)

    def should_fire(self, point: SavePoint, moment: Moment) -> bool:
        """Pure part: count and decide."""
        plan = self.plan
        if plan is None or plan.point is not point or plan.moment is not moment:
            return False
        self._seen += 1
        return self._seen == plan.occurrence

    def reached(self, point: SavePoint, moment: Moment) -> None:
        if self.should_fire(point, moment):
            os.kill(os.getpid(), signal.SIGKILL)
