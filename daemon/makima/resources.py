"""The daemon's own process limits.

Each running agent holds four descriptors in the daemon (its three pipes and
a pidfd), each task three. A soft open-files limit of 1,024 (the usual
default outside systemd) would stop the daemon at about 250 agents, long
before memory does. At start the daemon raises its soft limit to the hard
one (systemd's unit sets both to 65,536), so only the administrator's hard
limit bounds it.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from pathlib import Path

NR_OPEN = Path("/proc/sys/fs/nr_open")


@dataclass(frozen=True, slots=True)
class OpenFilesLimit:
    before: int
    after: int
    hard: int


def _ceiling(hard: int) -> int:
    if hard != resource.RLIM_INFINITY:
        return hard
    try:  # "unlimited" still stops at the kernel's per-process maximum
        return int(NR_OPEN.read_text())
    except (OSError, ValueError):
        return 1 << 20


def raise_open_files_limit() -> OpenFilesLimit:
    """Raise the soft open-files limit to the hard one; report both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = _ceiling(hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return OpenFilesLimit(soft, soft, hard)
        return OpenFilesLimit(soft, target, hard)
    return OpenFilesLimit(soft, soft, hard)
