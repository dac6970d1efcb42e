"""What every notifier is: a stable name, a concurrency, and ``deliver``."""

from __future__ import annotations

import hashlib
from typing import Protocol

from makima.errors import MakimaError
from makima.notify.message import Notice


class DeliveryError(MakimaError):
    """A notice could not be given now; it is tried again later."""


class DeliveryRefusedError(DeliveryError):
    """The receiver refused the notice for good (say HTTP 400): not tried again in this run."""


class Notifier(Protocol):
    name: str
    """Stable across restarts (the record keys on it); holds no secret."""
    label: str
    """For logs and messages; holds no secret either."""
    concurrency: int
    """How many notices it may be giving at once."""

    async def deliver(self, notice: Notice) -> None:
        """Tell people, or raise :class:`DeliveryError`."""

    async def retract(self, question_id: str) -> None:
        """The question is no longer open: take back what was shown (best effort)."""


def fingerprint(*parts: str) -> str:
    """A short stable digest, to name a notifier by its (possibly secret) target."""
    return hashlib.sha256("\x00".join(parts).encode()).hexdigest()[:12]
