"""The database: connection pool, schema, reconnect policy, the embedded default.

Connecting retries only named connection errors (never cancellation), with a
jittered exponential wait, each attempt under a timeout, and re-raises the
last error when it gives up. While PostgreSQL is away, save points wait for it
(:meth:`Database.save`); calls that answer a person fail fast with
:class:`~makima.errors.DatabaseUnavailableError` (:meth:`Database.query`).

The embedded server is supervised (:meth:`Database.supervise`): when it dies
it is started again on the same data, a bounded number of times.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, TypeVar

import anyio
import asyncpg
import structlog
from asyncpg.pool import PoolConnectionProxy
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_delay,
    stop_never,
    wait_random_exponential,
)

from makima.embedded import ConnectParams, EmbeddedPostgres
from makima.errors import (
    DatabaseUnavailableError,
    EmbeddedDatabaseError,
    SavePointRefusedError,
    SchemaVersionError,
)

log = structlog.get_logger("makima.database")

SCHEMA_VERSION = 2
SAVE_ATTEMPT_TIMEOUT = 30.0  # seconds one attempt of a save point may take
_SCHEMA_LOCK_KEY = 0x6D616B696D61  # "makima": serialises concurrent schema applies

Pool = asyncpg.Pool
Db = asyncpg.Pool | asyncpg.Connection | PoolConnectionProxy
T = TypeVar("T")

# The errors that mean "the server is not reachable right now". Retrying
# anything else (a constraint violation, a bug, a cancellation) would be wrong.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused, reset, socket file missing
    TimeoutError,
    asyncpg.PostgresConnectionError,  # includes ConnectionDoesNotExistError
    asyncpg.CannotConnectNowError,  # starting up, shutting down, in recovery
    asyncpg.exceptions.AdminShutdownError,  # server stopped under us
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.TooManyConnectionsError,
)


def is_connection_error(exc: BaseException) -> bool:
    """Is ``exc`` a lost or refused connection, worth retrying?

    asyncpg raises a bare InterfaceError for a connection closed mid-operation;
    its subclasses (a query argument that cannot be encoded, client settings)
    fail the same way every time and must never be retried.
    """
    if isinstance(exc, asyncpg.InterfaceError):
        return type(exc) is asyncpg.InterfaceError
    return isinstance(exc, CONNECTION_ERRORS)


def schema_sql() -> str:
    """The schema shipped inside the package (a copy of the top-level schema.sql)."""
    return resources.files("makima").joinpath("schema.sql").read_text(encoding="utf-8")


class Connection(asyncpg.Connection):
    """A pooled connection released without a reset query.

    asyncpg's pool sends ``get_reset_query()`` (advisory unlock, CLOSE ALL,
    UNLISTEN, RESET ALL) on every release: one more round trip per save point.
    makima keeps no session state on a pooled connection (no LISTEN, no session
    advisory lock, no SET, no cursor outside a transaction), so there is nothing
    to reset; asyncpg still rolls back a transaction left open, on its own.
    """

    def get_reset_query(self) -> str:
        return ""


async def _init_connection(conn: asyncpg.Connection) -> None:
    for name in ("json", "jsonb"):
        await conn.set_type_codec(
            name,
            encoder=json.dumps,
            decoder=json.loads,
            schema="pg_catalog",
        )


def _log_retry(what: str) -> Callable[[RetryCallState], None]:
    def before_sleep(state: RetryCallState) -> None:
        outcome = state.outcome
        error = outcome.exception() if outcome is not None else None
        log.warning(
            "database.retry",
            operation=what,
            attempt=state.attempt_number,
            error=repr(error),
            wait_s=round(state.upcoming_sleep, 3),
        )

    return before_sleep


def retrying(what: str, *, give_up_after: float | None) -> AsyncRetrying:
    """The reconnect policy: named errors only, jittered backoff, re-raise at the end."""
    return AsyncRetrying(
        retry=retry_if_exception(is_connection_error),
        wait=wait_random_exponential(multiplier=0.05, max=2.0),
        stop=stop_never if give_up_after is None else stop_after_delay(give_up_after),
        reraise=True,
        before_sleep=_log_retry(what),
    )


async def with_retries(
    what: str,
    operation: Callable[[], Awaitable[T]],
    *,
    give_up_after: float | None,
    attempt_timeout: float,
) -> T:
    """Run ``operation`` under the reconnect policy, each attempt under a timeout."""
    async for attempt in retrying(what, give_up_after=give_up_after):
        with attempt:
            with anyio.fail_after(attempt_timeout):
                return await operation()
    raise AssertionError("unreachable: tenacity re-raises")  # pragma: no cover


@dataclass(frozen=True, slots=True)
class DatabaseConfig:
    """Where the database is: a URL, or the embedded server in ``state_dir``."""

    state_dir: Path
    url: str | None = None
    min_connections: int = 2
    max_connections: int = 20
    connect_timeout: float = 10.0
    connect_give_up_after: float = 60.0
    # The embedded server is started again at most this many times within the
    # window; one death more and the daemon exits (systemd restarts it whole).
    embedded_restart_limit: int = 5
    embedded_restart_window: float = 60.0


async def create_pool(
    target: ConnectParams | str,
    *,
    min_size: int = 2,
    max_size: int = 20,
    connect_timeout: float = 10.0,
    give_up_after: float | None = 60.0,
) -> Pool:
    """Open a pool, retrying while the server is not reachable yet."""
    kwargs: dict[str, Any] = {"dsn": target} if isinstance(target, str) else target.asyncpg_kwargs()

    async def open_pool() -> Pool:
        return await asyncpg.create_pool(
            min_size=min_size,
            max_size=max_size,
            init=_init_connection,
            connection_class=Connection,
            timeout=connect_timeout,
            command_timeout=None,
            **kwargs,
        )

    return await with_retries(
        "create_pool",
        open_pool,
        give_up_after=give_up_after,
        attempt_timeout=connect_timeout * 2,
    )


async def ensure_database(params: ConnectParams) -> None:
    """Create ``params.database`` if it does not exist (embedded server only)."""

    async def create() -> None:
        conn = await asyncpg.connect(**params.asyncpg_kwargs(database="postgres"), timeout=10)
        try:
            exists = await conn.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", params.database
            )
            if not exists:
                # CREATE DATABASE takes no parameters; the name is our own constant,
                # quoted as an identifier by the server-side function.
                quoted = await conn.fetchval("SELECT quote_ident($1)", params.database)
                await conn.execute(f"CREATE DATABASE {quoted}")
                log.info("database.created", database=params.database)
        finally:
            await conn.close()

    await with_retries("ensure_database", create, give_up_after=60.0, attempt_timeout=20.0)


async def schema_version(db: Db) -> int | None:
    """The version recorded in ``makima_schema``, or None on a database without it."""
    exists = await db.fetchval("SELECT to_regclass('makima_schema') IS NOT NULL")
    if not exists:
        return None
    has_version = await db.fetchval(
        "SELECT EXISTS (SELECT 1 FROM information_schema.columns "
        "WHERE table_name = 'makima_schema' AND column_name = 'version' "
        "AND table_schema = current_schema())"
    )
    if not has_version:
        return None
    value = await db.fetchval("SELECT version FROM makima_schema WHERE singleton")
    return None if value is None else int(value)


async def apply_schema(pool: Pool) -> int:
    """Apply schema.sql (idempotent) and return the version now recorded.

    Refuses a database made by a newer makima.
    """
    text = schema_sql()
    checksum = hashlib.sha256(text.encode()).hexdigest()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _SCHEMA_LOCK_KEY)
        found = await schema_version(conn)
        if found is not None and found > SCHEMA_VERSION:
            raise SchemaVersionError(
                f"the database has schema version {found}, newer than this makima's "
                f"{SCHEMA_VERSION}; upgrade makima or point it at another database"
            )
        if found == SCHEMA_VERSION and await _applied_checksum(conn) == checksum:
            # This very schema.sql was applied: nothing to do, and no table locked (the
            # ALTERs would lock each table exclusively, in the way of running peers).
            log.info("database.schema_current", version=found)
            return found
        await conn.execute(text)
        await conn.execute("UPDATE makima_schema SET checksum = $1", checksum)
        version = await schema_version(conn)
    assert version is not None
    log.info("database.schema_applied", version=version, previous=found)
    return version


async def _applied_checksum(db: Db) -> str | None:
    """The checksum of the schema.sql last applied (None before it was recorded)."""
    # Read through to_jsonb: an older table has no such column, and an error would
    # end the transaction.
    value = await db.fetchval("SELECT to_jsonb(m) ->> 'checksum' FROM makima_schema m")
    return None if value is None else str(value)


class Database:
    """The pool and, when no URL is given, the embedded server behind it."""

    def __init__(
        self,
        pool: Pool,
        *,
        embedded: EmbeddedPostgres | None = None,
        url: str | None = None,
        connect_params: ConnectParams | None = None,
        connect_timeout: float = 10.0,
        restart_limit: int = 5,
        restart_window: float = 60.0,
        check_interval: float = 0.5,
    ) -> None:
        self.pool = pool
        self.embedded = embedded
        self.restart_limit = restart_limit
        self.restart_window = restart_window
        self.check_interval = check_interval
        self._url = url
        self._connect_params = connect_params
        self._connect_timeout = connect_timeout
        self._closing = False
        # Checks and restarts of the embedded server, and its stop, one at a time.
        self._embedded_lock = anyio.Lock()
        self._suspect: anyio.Event | None = None  # set on a connection error: check now
        self._available = True  # no connection error since the last success

    @property
    def is_embedded(self) -> bool:
        return self.embedded is not None

    @classmethod
    async def open(cls, config: DatabaseConfig) -> Database:
        embedded: EmbeddedPostgres | None = None
        target: ConnectParams | str
        if config.url:
            target = config.url
        else:
            embedded = EmbeddedPostgres(config.state_dir)
            target = await anyio.to_thread.run_sync(embedded.start)
            await ensure_database(target)
        try:
            pool = await create_pool(
                target,
                min_size=config.min_connections,
                max_size=config.max_connections,
                connect_timeout=config.connect_timeout,
                give_up_after=config.connect_give_up_after,
            )
            try:
                await apply_schema(pool)
            except BaseException:
                await pool.close()
                raise
        except BaseException:
            if embedded is not None:
                await anyio.to_thread.run_sync(embedded.stop)
            raise
        return cls(
            pool,
            embedded=embedded,
            url=target if isinstance(target, str) else None,
            connect_params=target if isinstance(target, ConnectParams) else None,
            connect_timeout=config.connect_timeout,
            restart_limit=config.embedded_restart_limit,
            restart_window=config.embedded_restart_window,
        )

    async def close(self) -> None:
        with anyio.CancelScope(shield=True):
            self._closing = True  # a server that stops now is not to be started again
            with anyio.move_on_after(10) as scope:
                await self.pool.close()
            if scope.cancelled_caught:  # a connection would not let go
                self.pool.terminate()
            if self.embedded is not None:
                async with self._embedded_lock:  # after a restart under way: stop that server
                    await anyio.to_thread.run_sync(self.embedded.stop)

    async def supervise(self) -> None:
        """Watch the embedded server and start it again when it dies; runs until cancelled.

        The server is checked every ``check_interval`` seconds, and at once when a
        save point or a request meets a connection error. A dead server is reaped
        (when the daemon started it), what it left behind set aside, and the
        server started again on the same data: PostgreSQL recovers from its WAL,
        so nothing committed is lost, and the pool reconnects while save points
        wait. More than ``restart_limit`` restarts (attempts, failed ones
        included) within ``restart_window`` seconds raise EmbeddedDatabaseError,
        which ends the daemon with a failure so that systemd restarts all of it.
        """
        embedded = self.embedded
        if embedded is None:
            await anyio.sleep_forever()
            return
        restarts: deque[float] = deque()
        while True:
            suspect = self._suspect = anyio.Event()
            with anyio.move_on_after(self.check_interval):
                await suspect.wait()
            async with self._embedded_lock:
                if self._closing:
                    break
                if await anyio.to_thread.run_sync(embedded.is_running):
                    continue
            await self._restart_embedded(embedded, restarts)
        log.info("embedded_postgres.supervision_ended", reason="closing")
        await anyio.sleep_forever()  # the server stops, and stays stopped

    async def _restart_embedded(self, embedded: EmbeddedPostgres, restarts: deque[float]) -> None:
        died_pid = embedded.pid
        detected = anyio.current_time()
        log.error(
            "embedded_postgres.died",
            pid=died_pid,
            exit_status=embedded.exit_status,
            pgdata=str(embedded.pgdata),
        )
        delay = 0.25
        while True:
            now = anyio.current_time()
            restarts.append(now)
            while restarts and now - restarts[0] > self.restart_window:
                restarts.popleft()
            if len(restarts) > self.restart_limit:
                log.error(
                    "embedded_postgres.restart_limit",
                    limit=self.restart_limit,
                    window_s=self.restart_window,
                )
                raise EmbeddedDatabaseError(
                    f"the embedded PostgreSQL in {embedded.pgdata} died and was started again "
                    f"{self.restart_limit} times within {self.restart_window:.0f}s; giving up "
                    f"(the daemon exits so that it is restarted whole); see {embedded.log_file}"
                )
            async with self._embedded_lock:
                if self._closing:
                    return
                try:
                    params = await anyio.to_thread.run_sync(embedded.restart)
                except EmbeddedDatabaseError as exc:
                    failed = exc
                else:
                    break
            log.warning(
                "embedded_postgres.restart_failed",
                attempt=len(restarts),
                error=str(failed),
                retry_in_s=delay,
            )
            await anyio.sleep(delay)
            delay = min(delay * 2, 5.0)
        await self._reconnect(params)
        log.warning(
            "embedded_postgres.restarted",
            pid=embedded.pid,
            previous_pid=died_pid,
            attempt=len(restarts),
            limit=self.restart_limit,
            window_s=self.restart_window,
            downtime_s=round(anyio.current_time() - detected, 3),
        )

    async def _reconnect(self, params: ConnectParams) -> None:
        """Point the pool at the server started again, if it is reached elsewhere now.

        The pool opens a new connection in place of each one the dead server
        closed, on its next use, so nothing else is needed in the usual case.
        """
        if params == self._connect_params:
            return
        self._connect_params = params
        self.pool.set_connect_args(
            **params.asyncpg_kwargs(), timeout=self._connect_timeout, command_timeout=None
        )
        await self.pool.expire_connections()
        log.info("database.reconnect_target_changed", host=params.host, port=params.port)

    async def connect(self, application_name: str) -> asyncpg.Connection:
        """One connection of its own, outside the pool (the lease's: its renewals must
        not queue behind save points, and it LISTENs), named ``application_name`` in
        ``pg_stat_activity``. Tried once, within the connect timeout."""
        kwargs: dict[str, Any] = (
            {"dsn": self._url}
            if self._url is not None
            else (self._connect_params.asyncpg_kwargs() if self._connect_params else {})
        )
        settings = {"application_name": application_name}
        return await asyncpg.connect(
            **kwargs, server_settings=settings, timeout=self._connect_timeout
        )

    @property
    def available(self) -> bool:
        """False from a connection error until an operation succeeds again: a request
        a person waits for can fail fast without trying (nor queueing) first."""
        return self._available

    def _connection_failed(self) -> None:
        """A connection error: have the supervisor check the embedded server now."""
        self._available = False
        if self._suspect is not None:
            self._suspect.set()

    async def save(self, operation: Callable[[Pool], Awaitable[T]], what: str) -> T:
        """Run a save point; while the database is away, wait for it (never drop).

        The first attempt runs as it is (under the attempt timeout only); the
        retry machinery is entered only when it meets a connection error. A save
        point the database refuses (a value it cannot store, a broken
        constraint) raises SavePointRefusedError: the caller answers its peer
        with an error, and the daemon carries on.
        """
        try:
            with anyio.fail_after(SAVE_ATTEMPT_TIMEOUT):
                result = await operation(self.pool)
            self._available = True
            return result
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            if not is_connection_error(exc):
                raise _refused(what, exc) from exc
            self._connection_failed()
            log.warning("database.retry", operation=what, attempt=1, error=repr(exc))
        except Exception as exc:
            if not is_connection_error(exc):
                raise
            self._connection_failed()
            log.warning("database.retry", operation=what, attempt=1, error=repr(exc))

        async def attempt() -> T:
            try:
                return await operation(self.pool)
            except Exception as exc:
                if is_connection_error(exc):
                    self._connection_failed()
                raise

        try:
            result = await with_retries(
                what, attempt, give_up_after=None, attempt_timeout=SAVE_ATTEMPT_TIMEOUT
            )
        except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise _refused(what, exc) from exc
        self._available = True
        return result

    async def query(self, operation: Callable[[Pool], Awaitable[T]]) -> T:
        """Run a read or a person's request; fail fast when the database is away."""
        try:
            result = await operation(self.pool)
        except Exception as exc:
            if is_connection_error(exc):
                self._connection_failed()
                raise DatabaseUnavailableError(f"the database is not reachable: {exc}") from exc
            raise
        self._available = True
        return result


def _refused(what: str, exc: Exception) -> SavePointRefusedError:
    return SavePointRefusedError(f"the database refused the {what} save point: {exc}")


def told_of_retries(
    operation: Callable[[Pool, bool], Awaitable[T]],
) -> Callable[[Pool], Awaitable[T]]:
    """``operation`` for :meth:`Database.save`, told whether this attempt is a retry:
    then the previous one may have committed with its reply lost, and a save point
    that is not naturally repeatable can recognise its own write."""
    attempts = 0

    def attempt(pool: Pool) -> Awaitable[T]:
        nonlocal attempts
        attempts += 1
        return operation(pool, attempts > 1)

    return attempt


@asynccontextmanager
async def transaction(db: Db) -> AsyncIterator[asyncpg.Connection | PoolConnectionProxy]:
    """A transaction on ``db``: a connection from the pool, or ``db`` itself."""
    if isinstance(db, asyncpg.Pool):
        async with db.acquire() as conn, conn.transaction():
            yield conn
    else:
        async with db.transaction():
            yield db
