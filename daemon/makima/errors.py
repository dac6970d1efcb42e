"""The one exception root of makima and its branches.

Every error raised on purpose by makima derives from :class:`MakimaError`.
Driver errors are wrapped at the boundary (``raise … from exc``) so the cause
is kept. Messages name the bad value and what was expected.
"""

from __future__ import annotations

from typing import Any


class MakimaError(Exception):
    """Root of every error makima raises on purpose."""


class InvalidValueError(MakimaError, ValueError):
    """A value does not have the shape or range makima expects."""


class IllegalTransitionError(MakimaError):
    """An event does not apply to a supervisor in its current state."""

    def __init__(self, state: str, event: str) -> None:
        super().__init__(f"event {event!r} is not allowed for a supervisor in state {state!r}")
        self.state = state
        self.event = event


class NotFoundError(MakimaError):
    """The thing asked for does not exist."""


class ConflictError(MakimaError):
    """The request conflicts with what is already recorded (e.g. already answered)."""

    def __init__(self, message: str, data: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.data = data or {}


class InvalidAnswerError(MakimaError):
    """An answer is not one of the question's choices."""

    def __init__(self, message: str, choices: tuple[str, ...]) -> None:
        super().__init__(message)
        self.choices = choices


class ForbiddenError(MakimaError):
    """The caller may not do this."""


class DatabaseUnavailableError(MakimaError):
    """PostgreSQL cannot be reached right now."""


class SavePointRefusedError(MakimaError):
    """PostgreSQL refused a save point for a reason that retrying cannot cure."""


class FencedError(MakimaError):
    """A write found its supervisor owned by another daemon, or at a newer lease
    epoch: this daemon's copy was taken over and must stop (nothing was written)."""

    def __init__(self, supervisor_id: object, what: str = "a save point") -> None:
        super().__init__(
            f"supervisor {supervisor_id} was taken over by another daemon; {what} was not written"
        )
        self.supervisor_id = supervisor_id


class EmbeddedDatabaseError(MakimaError):
    """The embedded PostgreSQL could not be set up, started or stopped."""


class SchemaVersionError(MakimaError):
    """The database was made by a newer makima than this one."""


class InvalidParamsError(MakimaError):
    """A request's parameters are missing or of the wrong kind."""


class TooLargeError(InvalidValueError):
    """A value that could never be sent back in one protocol line (makima.limits)."""


def leaf_exceptions(exc: BaseException) -> list[BaseException]:
    """The exceptions inside ``exc``, unwrapped from any (nested) exception groups."""
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in leaf_exceptions(inner)]
    return [exc]


def crash_reason(exc: BaseException, during: str) -> str:
    """The ``error_message`` of a supervisor failed by its crash boundary: the
    exceptions that caused it (task groups wrap them in groups; the leaves are named)."""
    named = "; ".join(f"{type(e).__name__}: {e}" for e in leaf_exceptions(exc))
    return f"makima failed unexpectedly while {during}: {named}"
