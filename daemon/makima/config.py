"""Where things are: state directory, control socket, database.

Resolution follows DESIGN §9 and §10: flags, then environment, then systemd's
directories, then XDG, then defaults. Pure functions of an environment mapping.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from makima.errors import InvalidValueError

SOCKET_NAME = "makima.sock"
MAX_SOCKET_PATH = 107  # AF_UNIX sun_path, less the terminating NUL


class TaskRestartPolicy(enum.StrEnum):
    """What happens to tasks that were running when the daemon or an agent stopped."""

    INTERRUPT = "interrupt"  # marked interrupted; the agent decides
    RERUN = "rerun"  # started again


def _first(value: str) -> str:
    """systemd may pass several directories separated by colons; take the first."""
    return value.split(":", 1)[0]


def default_state_dir(env: Mapping[str, str], *, is_root: bool) -> Path:
    if env.get("MAKIMA_STATE_DIR"):
        return Path(env["MAKIMA_STATE_DIR"])
    if env.get("STATE_DIRECTORY"):
        return Path(_first(env["STATE_DIRECTORY"]))
    if is_root:
        return Path("/var/lib/makima")
    if env.get("XDG_STATE_HOME"):
        return Path(env["XDG_STATE_HOME"]) / "makima"
    home = env.get("HOME") or str(Path.home())
    return Path(home) / ".local" / "state" / "makima"


def daemon_socket_path(env: Mapping[str, str], state_dir: Path) -> Path:
    """Where the daemon listens when systemd does not hand it a socket."""
    if env.get("MAKIMA_SOCKET"):
        return Path(env["MAKIMA_SOCKET"])
    if env.get("RUNTIME_DIRECTORY"):
        return Path(_first(env["RUNTIME_DIRECTORY"])) / SOCKET_NAME
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "makima" / SOCKET_NAME
    return state_dir / SOCKET_NAME


def client_socket_candidates(env: Mapping[str, str], *, is_root: bool) -> list[Path]:
    """Where a client looks for the daemon, in order."""
    if env.get("MAKIMA_SOCKET"):
        return [Path(env["MAKIMA_SOCKET"])]
    candidates: list[Path] = []
    if env.get("XDG_RUNTIME_DIR"):
        candidates.append(Path(env["XDG_RUNTIME_DIR"]) / "makima" / SOCKET_NAME)
    candidates.append(Path("/run/makima.sock"))  # the shipped socket unit
    candidates.append(Path("/run/makima") / SOCKET_NAME)  # the service's RuntimeDirectory
    candidates.append(default_state_dir(env, is_root=is_root) / SOCKET_NAME)
    return candidates


def client_socket_path(env: Mapping[str, str], *, is_root: bool) -> Path:
    """The first candidate that exists, else the first candidate."""
    candidates = client_socket_candidates(env, is_root=is_root)
    for candidate in candidates:
        if candidate.exists():
            return candidate
    return candidates[0]


def check_socket_path(path: Path) -> Path:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise InvalidValueError(
            f"socket path {path} is {len(os.fsencode(path))} bytes; Unix sockets allow at most "
            f"{MAX_SOCKET_PATH}: give a shorter --socket or MAKIMA_SOCKET"
        )
    return path


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    state_dir: Path
    socket_path: Path
    database_url: str | None = None
    heartbeat_interval: float = 5.0
    shutdown_grace: float = 5.0
    agent_write_timeout: float = 30.0  # an agent that reads nothing for this long is stopped
    agent_restart_limit: int = 5
    agent_restart_window: float = 300.0
    agent_restart_backoff: float = 0.5
    task_restart_policy: TaskRestartPolicy = TaskRestartPolicy.INTERRUPT
    max_connections: int = 256  # control connections served at once; more are refused
    lease_ttl: float = 15.0  # a lease not renewed for this long lets peers take over
    lease_renew: float = 5.0  # between renewals
    handover: bool = True  # SIGTERM with live peers: release the lease for them

    def __post_init__(self) -> None:
        check_socket_path(self.socket_path)
        if self.lease_ttl <= 0 or self.lease_renew <= 0:
            raise InvalidValueError(
                f"lease TTL and renew interval must be positive; got {self.lease_ttl} and "
                f"{self.lease_renew}"
            )
        if self.lease_renew > self.lease_ttl * 0.5:
            raise InvalidValueError(
                f"lease renew interval {self.lease_renew}s is more than half the lease TTL "
                f"{self.lease_ttl}s; expected at most {self.lease_ttl * 0.5:g}s (a third or "
                "less is better), so that a renewal can fail and be retried before the "
                "lease runs out"
            )
        if self.heartbeat_interval <= 0:
            raise InvalidValueError(
                f"heartbeat interval must be positive; got {self.heartbeat_interval}"
            )
        if self.max_connections < 1:
            raise InvalidValueError(
                f"max connections must be at least 1; got {self.max_connections}"
                " (it is how many control connections the daemon serves at once)"
            )

    @classmethod
    def resolve(
        cls,
        *,
        state_dir: str | os.PathLike[str] | None = None,
        socket: str | os.PathLike[str] | None = None,
        database_url: str | None = None,
        env: Mapping[str, str] | None = None,
        is_root: bool | None = None,
        **overrides: Any,
    ) -> DaemonConfig:
        environ = os.environ if env is None else env
        root = os.geteuid() == 0 if is_root is None else is_root
        state = Path(state_dir) if state_dir else default_state_dir(environ, is_root=root)
        sock = Path(socket) if socket else daemon_socket_path(environ, state)
        url = database_url or environ.get("MAKIMA_DATABASE_URL") or None
        return cls(
            state_dir=state.expanduser().absolute(),
            socket_path=sock.expanduser().absolute(),
            database_url=url,
            **overrides,
        )
