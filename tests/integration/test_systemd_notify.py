"""sd_notify, the watchdog interval and socket activation, against real sockets."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from anyio.streams.buffered import BufferedByteReceiveStream
from structlog.testing import capture_logs

from makima import systemd
from makima.systemd import (
    ListenEnvironment,
    Notifier,
    listen_fds,
    listen_fds_with_names,
    parse_listen_environment,
    parse_notify_address,
    watchdog_interval,
)

DEADLINE = 10.0


@pytest.fixture
def tmp_dir() -> Iterator[Path]:
    """A short directory for AF_UNIX paths (at most 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="mk-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def receiver(tmp_dir: Path) -> Iterator[tuple[str, socket.socket]]:
    """What systemd would listen on: a bound AF_UNIX datagram socket and its address."""
    path = tmp_dir / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(DEADLINE)  # a deadline for recv, not a pause
    yield str(path), sock
    sock.close()


@pytest.fixture
def notifier(receiver: tuple[str, socket.socket]) -> Iterator[Notifier]:
    n = Notifier(receiver[0])
    yield n
    n.close()


def received(receiver: tuple[str, socket.socket]) -> bytes:
    return receiver[1].recv(65536)


# ------------------------------------------------------------------ Notifier


def test_ready_sends_ready(notifier: Notifier, receiver: tuple[str, socket.socket]) -> None:
    assert notifier.enabled
    assert notifier.address == receiver[0]
    assert notifier.ready() is True
    assert received(receiver) == b"READY=1\n"


def test_ready_with_status(notifier: Notifier, receiver: tuple[str, socket.socket]) -> None:
    assert notifier.ready("3 supervisors restored")
    assert received(receiver) == b"READY=1\nSTATUS=3 supervisors restored\n"


def test_status_stopping_watchdog(notifier: Notifier, receiver: tuple[str, socket.socket]) -> None:
    assert notifier.status("restoring")
    assert received(receiver) == b"STATUS=restoring\n"
    assert notifier.stopping()
    assert received(receiver) == b"STOPPING=1\n"
    assert notifier.stopping("saving supervisors")
    assert received(receiver) == b"STOPPING=1\nSTATUS=saving supervisors\n"
    assert notifier.watchdog()
    assert received(receiver) == b"WATCHDOG=1\n"


def test_reloading_carries_the_monotonic_clock(
    notifier: Notifier, receiver: tuple[str, socket.socket]
) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)\n", received(receiver))
    assert match is not None
    assert before <= int(match.group(1)) <= after


def test_generic_notify_and_send(notifier: Notifier, receiver: tuple[str, socket.socket]) -> None:
    assert notifier.notify(STATUS="line one\nline two", MAINPID=42)
    assert received(receiver) == b"STATUS=line one line two\nMAINPID=42\n"
    assert notifier.send(["READY=1", "STATUS=ok"])
    assert received(receiver) == b"READY=1\nSTATUS=ok\n"
    assert notifier.extend_timeout(2.5)
    assert received(receiver) == b"EXTEND_TIMEOUT_USEC=2500000\n"


def test_bad_field_names_are_refused(notifier: Notifier) -> None:
    with pytest.raises(ValueError, match="field name"):
        notifier.notify(ready=1)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.send(["READY=1\nSTATUS=x"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.send(["READY"])


def test_abstract_socket() -> None:
    name = f"mk-notify-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(DEADLINE)
        n = Notifier("@" + name)
        try:
            assert n.enabled
            assert n.address == "@" + name
            assert n.ready("up")
            assert sock.recv(65536) == b"READY=1\nSTATUS=up\n"
        finally:
            n.close()


def test_built_from_the_environment(
    receiver: tuple[str, socket.socket], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", receiver[0])
    n = Notifier()
    try:
        assert n.enabled
        assert n.watchdog()
        assert received(receiver) == b"WATCHDOG=1\n"
        assert os.environ["NOTIFY_SOCKET"] == receiver[0]  # left for whoever needs it
    finally:
        n.close()
    assert Notifier(environ={"NOTIFY_SOCKET": receiver[0]}).enabled


def test_disabled_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = Notifier()
    assert not n.enabled
    assert n.address is None
    assert n.ready("x") is False
    assert n.status("x") is False
    assert n.stopping() is False
    assert n.reloading() is False
    assert n.watchdog() is False
    assert n.notify(STATUS="x") is False
    assert n.send(["READY=1"]) is False
    n.close()
    assert not Notifier(environ={"NOTIFY_SOCKET": ""}).enabled


def test_unsupported_address_disables_with_a_warning() -> None:
    with capture_logs() as logs:
        n = Notifier("vsock:2:1234")
    assert not n.enabled
    assert n.ready() is False
    assert [entry["event"] for entry in logs] == ["systemd.notify_socket_unsupported"]


def test_send_failure_is_logged_not_raised(tmp_dir: Path) -> None:
    n = Notifier(str(tmp_dir / "nobody-listens.sock"))
    try:
        with capture_logs() as logs:
            assert n.ready() is False
        assert len(logs) == 1
        assert logs[0]["event"] == "systemd.notify_failed"
        assert logs[0]["log_level"] == "warning"
        assert logs[0]["message"] == "READY=1"
    finally:
        n.close()


def test_a_full_receiver_does_not_block(
    notifier: Notifier, receiver: tuple[str, socket.socket]
) -> None:
    # Nobody reads: the receiver's queue fills, and the sender must fail fast
    # (EAGAIN) instead of waiting for systemd.
    with capture_logs() as logs:
        results = [notifier.watchdog() for _ in range(2000)]
    assert results[0] is True
    assert False in results
    assert {entry["event"] for entry in logs} == {"systemd.notify_failed"}
    # Once drained, sending works again.
    receiver[1].setblocking(False)
    while True:
        try:
            receiver[1].recv(65536)
        except BlockingIOError:
            break
    receiver[1].settimeout(DEADLINE)
    assert notifier.status("recovered")
    assert received(receiver) == b"STATUS=recovered\n"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("relative/path", None),
        ("@", None),
        ("vsock:2:1", None),
        ("/run/systemd/notify", "/run/systemd/notify"),
        ("@abstract", "\0abstract"),
    ],
)
def test_parse_notify_address(value: str | None, expected: str | None) -> None:
    assert parse_notify_address(value) == expected


# ------------------------------------------------------------------ watchdog


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, None),
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1234"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "999"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "abc"}, None),
        ({"WATCHDOG_USEC": "1000"}, 0.0005),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({"WATCHDOG_PID": "1234"}, None),
    ],
)
def test_watchdog_interval(environ: dict[str, str], expected: float | None) -> None:
    assert watchdog_interval(environ, pid=1234) == expected


def test_watchdog_interval_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_PID")
    assert watchdog_interval() == 10.0
    monkeypatch.delenv("WATCHDOG_USEC")
    assert watchdog_interval() is None


# ------------------------------------------------------------------ socket activation


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, ListenEnvironment(0, ())),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, ListenEnvironment(1, ("unknown",))),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control:extra"},
            ListenEnvironment(2, ("control", "extra")),
        ),
        (
            {"LISTEN_PID": "7", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "control"},
            ListenEnvironment(2, ("unknown", "unknown")),
        ),
        ({"LISTEN_PID": "8", "LISTEN_FDS": "1"}, ListenEnvironment(0, ())),
        ({"LISTEN_PID": "x", "LISTEN_FDS": "1"}, ListenEnvironment(0, ())),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "x"}, ListenEnvironment(0, ())),
        ({"LISTEN_PID": "7", "LISTEN_FDS": "0"}, ListenEnvironment(0, ())),
        ({"LISTEN_FDS": "1"}, ListenEnvironment(0, ())),
    ],
)
def test_parse_listen_environment(environ: dict[str, str], expected: ListenEnvironment) -> None:
    assert parse_listen_environment(environ, pid=7) == expected


def _free_fd_range(count: int) -> int:
    """The first of ``count`` consecutive unused descriptors (well above pytest's)."""
    base = 200
    while True:
        for fd in range(base, base + count):
            try:
                os.fstat(fd)
            except OSError:
                continue
            base = fd + 1
            break
        else:
            return base


@pytest.fixture
def passed_fds(tmp_dir: Path) -> Iterator[tuple[int, Path]]:
    """Two inheritable sockets on consecutive fds, as systemd would pass them:
    a listening Unix stream socket, then a bound UDP socket."""
    path = tmp_dir / "control.sock"
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(path))
    stream.listen()
    dgram = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dgram.bind(("127.0.0.1", 0))
    start = _free_fd_range(2)
    os.dup2(stream.fileno(), start)  # dup2 makes the copies inheritable
    os.dup2(dgram.fileno(), start + 1)
    stream.close()
    dgram.close()
    yield start, path
    for fd in (start, start + 1):
        with contextlib.suppress(OSError):  # adopted and closed by the test
            os.close(fd)


def test_listen_fds_adopts_sockets(
    passed_fds: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    start, path = passed_fds
    monkeypatch.setenv("LISTEN_PID", str(os.getpid()))
    monkeypatch.setenv("LISTEN_FDS", "2")
    monkeypatch.setenv("LISTEN_FDNAMES", "control:metrics")
    got = listen_fds_with_names(start_fd=start)
    try:
        assert [name for name, _ in got] == ["control", "metrics"]
        (_, control), (_, metrics) = got
        assert control.fileno() == start
        assert (control.family, control.type) == (socket.AF_UNIX, socket.SOCK_STREAM)
        assert (metrics.family, metrics.type) == (socket.AF_INET, socket.SOCK_DGRAM)
        assert not control.get_inheritable()
        assert not metrics.get_inheritable()
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            assert name not in os.environ
        # The adopted socket really is the listening one.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.connect(str(path))
            control.settimeout(DEADLINE)
            conn, _ = control.accept()
            with conn:
                client.sendall(b"ping")
                conn.settimeout(DEADLINE)
                assert conn.recv(4) == b"ping"
    finally:
        for _, sock in got:
            sock.close()


def test_listen_fds_for_another_pid(
    passed_fds: tuple[int, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    start, _ = passed_fds
    environ = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert listen_fds(environ, start_fd=start) == []
    assert environ == {}  # unset anyway: children must not inherit them
    assert os.get_inheritable(start)  # not ours: left untouched


def test_listen_fds_can_leave_the_environment(passed_fds: tuple[int, Path]) -> None:
    start, _ = passed_fds
    environ = {"LISTEN_PID": "77", "LISTEN_FDS": "1"}
    got = listen_fds(environ, pid=77, start_fd=start, unset_environment=False)
    try:
        assert len(got) == 1
        assert environ == {"LISTEN_PID": "77", "LISTEN_FDS": "1"}
    finally:
        for sock in got:
            sock.close()


def test_listen_fds_without_activation(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        monkeypatch.delenv(name, raising=False)
    assert listen_fds() == []


def test_listen_fds_skips_what_is_not_a_socket() -> None:
    read_end, write_end = os.pipe()
    start = _free_fd_range(1)
    os.dup2(read_end, start)
    try:
        with capture_logs() as logs:
            got = listen_fds({"LISTEN_PID": "5", "LISTEN_FDS": "1"}, pid=5, start_fd=start)
        assert got == []
        assert not os.get_inheritable(start)
        assert "systemd.listen_fd_not_socket" in [entry["event"] for entry in logs]
    finally:
        for fd in (read_end, write_end, start):
            os.close(fd)


_ACTIVATED_CHILD = """
import json, os
from makima.systemd import listen_fds_with_names
got = listen_fds_with_names()
report = {
    "names": [name for name, _ in got],
    "fds": [sock.fileno() for _, sock in got],
    "families": [int(sock.family) for _, sock in got],
    "types": [int(sock.type) for _, sock in got],
    "inheritable": [sock.get_inheritable() for _, sock in got],
    "left": sorted(name for name in os.environ if name.startswith("LISTEN_")),
}
conn, _ = got[0][1].accept()
conn.sendall(json.dumps(report).encode() + b"\\n")
conn.close()
"""


@pytest.mark.anyio
@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None, reason="systemd-socket-activate not found"
)
async def test_listen_fds_under_systemd_socket_activate(tmp_dir: Path) -> None:
    """The default contract (fd 3, our pid, our environment), set up by systemd's own tool."""
    path = tmp_dir / "activated.sock"
    tool = shutil.which("systemd-socket-activate")
    assert tool is not None
    command = [tool, "--listen", str(path), "--fdname=control"]
    command += [sys.executable, "-c", _ACTIVATED_CHILD]
    with anyio.fail_after(DEADLINE):
        async with await anyio.open_process(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL
        ) as process:
            assert process.stderr is not None
            stderr = BufferedByteReceiveStream(process.stderr)
            while b"Listening on" not in await stderr.receive_until(b"\n", 4096):
                pass
            # The tool runs the child on the first connection; the child answers on it.
            async with await anyio.connect_unix(path) as client:
                reply = BufferedByteReceiveStream(client)
                report = json.loads(await reply.receive_until(b"\n", 65536))
            assert await process.wait() == 0
    assert report == {
        "names": ["control"],
        "fds": [systemd.SD_LISTEN_FDS_START],
        "families": [int(socket.AF_UNIX)],
        "types": [int(socket.SOCK_STREAM)],
        "inheritable": [False],
        "left": [],
    }
