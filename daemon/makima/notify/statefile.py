"""The notify record on disk: read once, written atomically whenever it changed.

A write goes to a temporary file in the same directory, is fsynced, renamed
over the old file and the directory fsynced: a crash leaves the old record
or the new one, never half of one. Writes are coalesced (many successes in a
burst cost one write) and run in a worker thread, off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import anyio
import anyio.abc
import structlog

from makima.errors import MakimaError
from makima.notify.state import NotifyState

log = structlog.get_logger("makima.notify")

MAX_FILE = 16 * 1024 * 1024
"""A record file larger than this is not read (the record itself stays far smaller)."""


class StateFileError(MakimaError):
    """The notify record could not be written."""


def default_state_file(env: Mapping[str, str], socket_path: Path | None) -> Path:
    """``$XDG_STATE_HOME/makima/notify-<hash of the socket path>.json`` (or under
    ``~/.local/state``): one record per daemon a person follows (``None``: the
    socket the CLI finds by itself, one record for all of those)."""
    base = env.get("XDG_STATE_HOME") or str(Path(env.get("HOME") or Path.home()) / ".local/state")
    where = os.path.abspath(socket_path) if socket_path is not None else "(default)"
    digest = hashlib.sha256(os.fsencode(where)).hexdigest()[:16]
    return Path(base) / "makima" / f"notify-{digest}.json"


def load_state(path: Path) -> NotifyState:
    """The record at ``path``; an empty one when there is none, or when it cannot be
    read (said in a ``notify.state_unreadable`` event: the worst outcome is telling
    people again)."""
    try:
        with path.open("rb") as file:
            raw = file.read(MAX_FILE + 1)
    except FileNotFoundError:
        return NotifyState()
    except OSError as exc:
        log.warning("notify.state_unreadable", path=str(path), reason=str(exc))
        return NotifyState()
    if len(raw) > MAX_FILE:
        log.warning("notify.state_unreadable", path=str(path), reason="larger than 16 MiB")
        return NotifyState()
    try:
        data = json.loads(raw)
    except ValueError as exc:
        log.warning("notify.state_unreadable", path=str(path), reason=f"not JSON: {exc}")
        return NotifyState()
    state, problems = NotifyState.from_json(data)
    if problems:
        log.warning("notify.state_repaired", path=str(path), problems=problems)
    return state


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data``: temporary file, fsync, rename, fsync of the directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    directory = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(directory)
    finally:
        os.close(directory)


def save_state(path: Path, state: NotifyState) -> None:
    try:
        write_atomically(path, json.dumps(state.to_json(), separators=(",", ":")).encode())
    except OSError as exc:
        raise StateFileError(f"cannot write the notify record {path}: {exc}") from exc


class StateKeeper:
    """Owns the record and its file: :meth:`changed` asks for a write, which
    :meth:`run` makes soon after (one write for a burst of changes)."""

    def __init__(self, path: Path, state: NotifyState) -> None:
        self.path = path
        self.state = state
        self._wake = anyio.Event()
        self._written = state.revision
        self.writes = 0

    @property
    def dirty(self) -> bool:
        return self.state.revision != self._written

    def changed(self) -> None:
        self._wake.set()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Write whenever changed; on the way out (cancellation), write what is left."""
        task_status.started()
        try:
            while True:
                await self._wake.wait()
                self._wake = anyio.Event()
                if self.dirty:
                    await self._write()
        finally:
            if self.dirty:
                with anyio.CancelScope(shield=True):
                    await self._write()

    async def _write(self) -> None:
        revision = self.state.revision
        snapshot = json.dumps(self.state.to_json(), separators=(",", ":")).encode()
        try:
            await anyio.to_thread.run_sync(write_atomically, self.path, snapshot)
        except OSError as exc:
            # Still dirty: written at the next change or on the way out.
            log.error(  # noqa: TRY400 - the reason says it all
                "notify.state_write_failed", path=str(self.path), reason=str(exc)
            )
            return
        self._written = revision
        self.writes += 1
        log.debug("notify.state_written", path=str(self.path), questions=len(self.state))
