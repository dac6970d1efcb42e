"""Shared fixtures: one embedded PostgreSQL per test session, a database per
test cloned from a template that already has the schema."""

from __future__ import annotations

import shutil
import signal
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
import asyncpg
import pytest
from hypothesis import HealthCheck, settings

from makima.database import apply_schema, create_pool, ensure_database
from makima.embedded import ConnectParams, EmbeddedPostgres
from makima.eventloop import Loop

TEMPLATE = "makima_template"

# Properties are judged by what they find, never by how fast: no per-example
# deadline and no "generation is slow" failure when CI shares its cores.
settings.register_profile("makima", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("makima")


@pytest.fixture(scope="session", autouse=True)
def ctrl_c_reaches_children() -> Iterator[None]:
    """Tests press Ctrl-C (SIGINT) in CLI children. A suite started in the background
    of a non-interactive shell inherits SIGINT ignored, and so would its children,
    which would then never see it: give them the default disposition back."""
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        yield
        return
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture(scope="session")
def anyio_backend() -> tuple[str, dict[str, object]]:
    # asyncpg needs asyncio; the loop is the daemon's own (makima.eventloop.Loop)
    return "asyncio", {"loop_factory": Loop}


def _in_thread(fn: object) -> None:
    """Run an async setup function on its own event loop, away from the test loop."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            anyio.run(fn)  # type: ignore[arg-type]
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


@pytest.fixture(scope="session")
def short_tmp() -> Iterator[Path]:
    """A short temporary directory (AF_UNIX paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mk-", dir="/tmp"))
    path.chmod(0o711)  # as root, the embedded server runs as another account
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def pg_server(short_tmp: Path) -> Iterator[ConnectParams]:
    """The embedded server, started once, with a template database holding the schema."""
    server = EmbeddedPostgres(short_tmp / "pg")
    params = server.start()

    async def make_template() -> None:
        await ensure_database(params)
        conn = await asyncpg.connect(**params.asyncpg_kwargs(database="postgres"))
        try:
            await conn.execute(f"DROP DATABASE IF EXISTS {TEMPLATE}")
            await conn.execute(f"CREATE DATABASE {TEMPLATE}")
        finally:
            await conn.close()
        pool = await create_pool(
            ConnectParams(params.host, params.port, params.user, params.password, TEMPLATE),
            min_size=1,
            max_size=1,
        )
        try:
            await apply_schema(pool)
        finally:
            await pool.close()

    try:
        _in_thread(make_template)
        yield params
    finally:
        server.stop()


@asynccontextmanager
async def scratch_database(
    server: ConnectParams, template: str | None
) -> AsyncIterator[ConnectParams]:
    """A new database (empty, or cloned from ``template``), dropped afterwards."""
    name = f"t_{uuid.uuid4().hex[:16]}"
    clone = f" TEMPLATE {template} STRATEGY FILE_COPY" if template else ""
    admin = await asyncpg.connect(**server.asyncpg_kwargs(database="postgres"))
    try:
        await admin.execute(f"CREATE DATABASE {name}{clone}")
    finally:
        await admin.close()
    try:
        yield ConnectParams(server.host, server.port, server.user, server.password, name)
    finally:
        admin = await asyncpg.connect(**server.asyncpg_kwargs(database="postgres"))
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        finally:
            await admin.close()


@pytest.fixture
async def fresh_database(pg_server: ConnectParams) -> AsyncIterator[ConnectParams]:
    """A new, empty database (no schema) dropped after the test."""
    async with scratch_database(pg_server, None) as params:
        yield params


@pytest.fixture
async def db_params(pg_server: ConnectParams) -> AsyncIterator[ConnectParams]:
    """A database cloned from the schema template, dropped after the test."""
    async with scratch_database(pg_server, TEMPLATE) as params:
        yield params


@pytest.fixture
async def pool(db_params: ConnectParams) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(db_params, min_size=1, max_size=10)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
async def relay(short_tmp: Path) -> AsyncIterator[object]:
    from tests.harness import relay_listener

    async with relay_listener(short_tmp) as r:
        yield r


@pytest.fixture
async def daemon(db_params: ConnectParams, short_tmp: Path) -> AsyncIterator[object]:
    from tests.harness import daemon_config, running_daemon

    async with running_daemon(daemon_config(db_params, short_tmp)) as d:
        yield d


@pytest.fixture
async def client(daemon: object) -> AsyncIterator[object]:
    from tests.harness import client_for

    async with client_for(daemon) as c:  # type: ignore[arg-type]
        yield c
