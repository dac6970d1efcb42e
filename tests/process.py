"""A real daemon as a subprocess for tests: makima.drill's runner with test
conveniences (a fault to inject, the log as text)."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path

from makima.drill import DaemonRunner
from makima.embedded import ConnectParams
from tests.harness import dsn


class DaemonProcess(DaemonRunner):
    """``python -m makima daemon`` on a test database and a short state dir."""

    def __init__(self, directory: Path, params: ConnectParams | None) -> None:
        name = uuid.uuid4().hex[:6]
        state_dir = directory / f"ps-{name}"
        state_dir.mkdir(exist_ok=True)
        super().__init__(
            state_dir=state_dir,
            socket_path=directory / f"p{name}.sock",
            database_url=dsn(params) if params is not None else None,
            log_path=state_dir / "daemon.log",
        )

    async def start(  # type: ignore[override]
        self,
        *,
        fault: str | None = None,
        args: list[str] | None = None,
        extra_env: Mapping[str, str] | None = None,
    ) -> None:
        env = dict(extra_env or {})
        if fault:
            env["MAKIMA_FAULT"] = fault
        await super().start(env, args)

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@asynccontextmanager
async def daemon_process(
    directory: Path, params: ConnectParams | None
) -> AsyncIterator[DaemonProcess]:
    proc = DaemonProcess(directory, params)
    try:
        yield proc
    finally:
        if proc.running:
            await proc.kill()
