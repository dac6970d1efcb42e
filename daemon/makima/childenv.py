"""The environment makima gives its child processes (agents and tasks)."""

from __future__ import annotations

import os
from collections.abc import Mapping

# The daemon's own systemd hand-over and drill hook are not for its children.
NOT_INHERITED = (
    "LISTEN_FDS",
    "LISTEN_PID",
    "LISTEN_FDNAMES",
    "NOTIFY_SOCKET",
    "WATCHDOG_USEC",
    "WATCHDOG_PID",
    "MAKIMA_FAULT",
    "MAKIMA_FAULT_SUPERVISOR",
)


def child_environment(*layers: Mapping[str, str]) -> dict[str, str]:
    """The daemon's environment, less what children must not inherit, plus ``layers``."""
    env = {k: v for k, v in os.environ.items() if k not in NOT_INHERITED}
    for layer in layers:
        env.update(layer)
    return env
