"""systemd integration, by hand: sd_notify, the watchdog and socket activation.

No dependency on python-systemd; the three protocols are small and stable:

* **sd_notify** — newline-separated ``KEY=VALUE`` lines in one datagram sent to
  the AF_UNIX socket named by ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an
  abstract socket). :class:`Notifier` never blocks and never raises into the
  daemon: a failed send is logged and reported as ``False``.
* **the watchdog** — ``$WATCHDOG_USEC`` (and ``$WATCHDOG_PID``, when set, must
  be our pid); :func:`watchdog_interval` gives the ping period, half the
  timeout, as systemd recommends.
* **socket activation** — ``$LISTEN_PID``, ``$LISTEN_FDS`` (fds from 3 on) and
  ``$LISTEN_FDNAMES``; :func:`listen_fds` returns the sockets, marks them
  close-on-exec and unsets the variables so children do not inherit them.

Parsing (environment → values) is pure and lives in the ``parse_*`` and
``encode_*`` functions; the rest only acts on their results.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass

import structlog

log = structlog.get_logger("makima.systemd")

SD_LISTEN_FDS_START = 3
"""The first file descriptor systemd passes to a socket-activated service."""

_LISTEN_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")
_FIELD_NAME = re.compile(r"[A-Z][A-Z0-9_]*")


# ------------------------------------------------------------------ pure parts


def encode_fields(fields: Mapping[str, object]) -> bytes:
    """One sd_notify datagram from ``{"READY": 1, "STATUS": "…"}``.

    Names must be upper-case assignments as systemd defines them; a value is
    written with ``str()``, and line breaks inside it (which would start a new
    assignment) become spaces.
    """
    lines = []
    for name, value in fields.items():
        if not _FIELD_NAME.fullmatch(name):
            raise ValueError(f"sd_notify field name must match [A-Z][A-Z0-9_]*, got {name!r}")
        text = str(value).replace("\r", " ").replace("\n", " ")
        lines.append(f"{name}={text}")
    return encode_lines(lines)


def encode_lines(lines: Iterable[str]) -> bytes:
    """One sd_notify datagram from ready-made ``KEY=VALUE`` lines."""
    checked = []
    for line in lines:
        if "\n" in line or "=" not in line:
            raise ValueError(f"sd_notify line must be one KEY=VALUE assignment, got {line!r}")
        checked.append(line)
    return ("\n".join(checked) + "\n").encode() if checked else b""


def parse_notify_address(value: str | None) -> str | None:
    """The ``sendto`` address for ``$NOTIFY_SOCKET``, or None when unusable.

    ``/path`` is a filesystem socket; ``@name`` is an abstract socket (leading
    NUL). Anything else (unset, empty, relative, ``vsock:…``) is not supported.
    """
    if not value:
        return None
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def parse_watchdog(environ: Mapping[str, str], pid: int) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None.

    None when the watchdog is off, the value is malformed, or ``$WATCHDOG_PID``
    names another process (the variables were inherited, not meant for us).
    """
    raw_usec = environ.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    raw_pid = environ.get("WATCHDOG_PID")
    if raw_pid:
        try:
            if int(raw_pid) != pid:
                return None
        except ValueError:
            return None
    try:
        usec = int(raw_usec)
    except ValueError:
        return None
    if usec <= 0:
        return None
    return usec / 2 / 1_000_000


@dataclass(frozen=True, slots=True)
class ListenEnvironment:
    """What ``$LISTEN_*`` says was passed to this process."""

    count: int
    names: tuple[str, ...]


def parse_listen_environment(environ: Mapping[str, str], pid: int) -> ListenEnvironment:
    """Read ``$LISTEN_PID``, ``$LISTEN_FDS`` and ``$LISTEN_FDNAMES``.

    A count of zero when the variables are absent, malformed, or meant for
    another pid. Names default to ``"unknown"`` (as in ``sd_listen_fds_with_names``)
    when ``$LISTEN_FDNAMES`` is absent or does not list one name per fd.
    """
    none = ListenEnvironment(0, ())
    raw_pid = environ.get("LISTEN_PID")
    raw_count = environ.get("LISTEN_FDS")
    if not raw_pid or not raw_count:
        return none
    try:
        if int(raw_pid) != pid:
            return none
        count = int(raw_count)
    except ValueError:
        return none
    if count <= 0:
        return none
    raw_names = environ.get("LISTEN_FDNAMES")
    names = tuple(raw_names.split(":")) if raw_names is not None else ()
    if len(names) != count:
        names = ("unknown",) * count
    return ListenEnvironment(count, names)


# ------------------------------------------------------------------ sd_notify


class Notifier:
    """Sends sd_notify messages to systemd; a no-op when not run by systemd.

    ``Notifier()`` reads ``$NOTIFY_SOCKET`` (and leaves it set); tests pass an
    address instead (``"/path"`` or ``"@abstract"``). Every method returns
    whether the message was sent; none blocks or raises ``OSError``.
    """

    def __init__(
        self, address: str | None = None, *, environ: Mapping[str, str] | None = None
    ) -> None:
        if address is None:
            address = (os.environ if environ is None else environ).get("NOTIFY_SOCKET")
        self._configured = address
        self._address = parse_notify_address(address)
        self._socket: socket.socket | None = None
        self._lock = threading.Lock()
        if address and self._address is None:
            log.warning("systemd.notify_socket_unsupported", notify_socket=address)

    @property
    def enabled(self) -> bool:
        """True when there is a notification socket to send to."""
        return self._address is not None

    @property
    def address(self) -> str | None:
        """The socket as configured (``/path`` or ``@name``), when enabled."""
        return self._configured if self.enabled else None

    def send(self, lines: Iterable[str]) -> bool:
        """Send ready-made ``KEY=VALUE`` lines as one datagram."""
        return self._send(encode_lines(lines))

    def notify(self, **fields: object) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram: ``notify(READY=1)``."""
        return self._send(encode_fields(fields))

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) is finished: ``READY=1``, with an optional ``STATUS=``."""
        fields: dict[str, object] = {"READY": 1}
        if status is not None:
            fields["STATUS"] = status
        return self._send(encode_fields(fields))

    def status(self, text: str) -> bool:
        """A one-line status shown by ``systemctl status``."""
        return self._send(encode_fields({"STATUS": text}))

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown has begun: ``STOPPING=1``."""
        fields: dict[str, object] = {"STOPPING": 1}
        if status is not None:
            fields["STATUS"] = status
        return self._send(encode_fields(fields))

    def reloading(self, status: str | None = None) -> bool:
        """A reload has begun: ``RELOADING=1`` and ``MONOTONIC_USEC=`` (Type=notify-reload).

        Send :meth:`ready` when the reload is done.
        """
        fields: dict[str, object] = {
            "RELOADING": 1,
            "MONOTONIC_USEC": time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000,
        }
        if status is not None:
            fields["STATUS"] = status
        return self._send(encode_fields(fields))

    def watchdog(self) -> bool:
        """Keep-alive ping for ``WatchdogSec=``: ``WATCHDOG=1``."""
        return self._send(b"WATCHDOG=1\n")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask for ``seconds`` more to start, reload or stop: ``EXTEND_TIMEOUT_USEC=``."""
        return self._send(encode_fields({"EXTEND_TIMEOUT_USEC": max(0, int(seconds * 1e6))}))

    def close(self) -> None:
        """Close the sending socket (a later send opens a new one)."""
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, datagram: bytes) -> bool:
        address = self._address
        if address is None or not datagram:
            return False
        with self._lock:
            try:
                if self._socket is None:
                    self._socket = socket.socket(
                        socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC
                    )
                    self._socket.setblocking(False)
                self._socket.sendto(datagram, address)
            except OSError as exc:
                log.warning(
                    "systemd.notify_failed",
                    notify_socket=self._configured,
                    message=datagram.decode(errors="replace").rstrip("\n"),
                    error=str(exc),
                    errno=exc.errno,
                )
                return False
        return True


# ------------------------------------------------------------------ watchdog


def watchdog_interval(
    environ: Mapping[str, str] | None = None, pid: int | None = None
) -> float | None:
    """Seconds between ``WATCHDOG=1`` pings (half of ``WatchdogSec=``), or None when off."""
    return parse_watchdog(
        os.environ if environ is None else environ, os.getpid() if pid is None else pid
    )


# ------------------------------------------------------------------ socket activation


def listen_fds_with_names(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    start_fd: int = SD_LISTEN_FDS_START,
    unset_environment: bool = True,
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed us, each with its ``FileDescriptorName=``.

    The default arguments are the systemd contract (our environment, our pid,
    fds from 3); tests may pass their own. Each socket is made close-on-exec;
    the ``LISTEN_*`` variables are removed afterwards (unless
    ``unset_environment`` is False) so child processes do not inherit them.
    A passed fd that is not a socket is logged, made close-on-exec and skipped.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    found = parse_listen_environment(env, os.getpid() if pid is None else pid)
    if unset_environment:
        for name in _LISTEN_VARIABLES:
            env.pop(name, None)
    sockets: list[tuple[str, socket.socket]] = []
    for index, name in enumerate(found.names):
        fd = start_fd + index
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            log.warning("systemd.listen_fd_unusable", fd=fd, name=name, error=str(exc))
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("systemd.listen_fd_not_socket", fd=fd, name=name, error=str(exc))
            continue
        sockets.append((name, sock))
    if found.count:
        log.info(
            "systemd.listen_fds",
            count=len(sockets),
            names=[name for name, _ in sockets],
        )
    return sockets


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    start_fd: int = SD_LISTEN_FDS_START,
    unset_environment: bool = True,
) -> list[socket.socket]:
    """The sockets systemd passed us (socket activation), in order; empty when none.

    See :func:`listen_fds_with_names` for the arguments.
    """
    return [
        sock
        for _, sock in listen_fds_with_names(
            environ, pid=pid, start_fd=start_fd, unset_environment=unset_environment
        )
    ]
