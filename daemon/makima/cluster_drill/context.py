"""What the parts of the cluster drill share: the journal of what it saw and found."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import anyio
import structlog

from makima.cluster_drill.settings import ClusterProgress

log = structlog.get_logger("makima.cluster_drill")


class Journal:
    """The drill's running account: the supervisors it created and saw finish, the
    answers the cluster accepted, its notes, the problems found on the way (by
    check), and the progress it reports from them."""

    def __init__(
        self, report: Callable[[ClusterProgress], None], progress: ClusterProgress
    ) -> None:
        self.report = report
        self.progress = progress
        self.created: dict[str, int] = {}  # supervisor id -> creating daemon
        self.finished: set[str] = set()
        self.accepted: dict[str, str] = {}  # question id -> answer the cluster accepted
        self.notes: list[str] = []
        self.problems: dict[str, list[str]] = {}  # check name -> problems found on the way
        self.totals: dict[str, int] = {}  # check name -> things looked at

    def tell(self, phase: str | None = None) -> None:
        if phase is not None:
            self.progress.phase = phase
            log.info("cluster_drill.phase", phase=phase)
        self.progress.created = len(self.created)
        self.progress.finished = len(self.finished)
        self.progress.answers = len(self.accepted)
        self.report(self.progress)

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("cluster_drill.note", note=text)

    def judge(self, check: str, problems: Sequence[str], total: int) -> None:
        self.problems.setdefault(check, []).extend(problems)
        self.totals[check] = self.totals.get(check, 0) + total


async def until(done: Callable[[], Awaitable[bool]], limit: float) -> bool:
    """Poll ``done`` every 0.1 s for at most ``limit`` seconds."""
    with anyio.move_on_after(limit):
        while True:
            if await done():
                return True
            await anyio.sleep(0.1)  # polling files and /proc: nothing to wait on
    return False
