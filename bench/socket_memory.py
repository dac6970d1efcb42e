"""What partial lines on the control socket cost the daemon in memory.

Starts a real daemon (``python -m makima daemon``, the embedded PostgreSQL
unless ``--database-url``) in a fresh short directory under ``/tmp``, then:

1. ``before``: the daemon's RSS once it is ready and has answered a request
   and one complete line of ``--line-bytes`` (as a daemon that has served one
   long request has; glibc then keeps buffers of that size on its heap instead
   of mapping each alone; ``--cold`` skips it);
2. ``during``: opens N connections one after another, each sending an almost
   full line (``--line-bytes``, default the protocol's limit) without its
   newline, waits until the daemon has read every byte of them, and reads the
   RSS while they hold their partial lines (some are refused or closed by the
   daemon's limits: they are counted by the error code they got). A fresh
   client's ``daemon.hello`` is timed at that moment;
3. ``after``: closes them all, waits until the daemon has closed their
   sockets (its open file count is back to what it was before), answers one
   more request, and reads the RSS again.

RSS is VmRSS from /proc/PID/status; VmHWM (the peak) is reported too.

    .venv/bin/python bench/socket_memory.py [--connections N] [--line-bytes B]
        [--max-connections M] [--cold] [--database-url URL] [--json] [-- DAEMON_OPTIONS]

Extra daemon options go after ``--``. To measure another copy of makima (an
older commit, say), put its source root first on PYTHONPATH. bench/README.md
has the figures measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import socket
import struct
import sys
import tempfile
import termios
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
import structlog

from makima.control.client import ControlClient
from makima.control.codec import MAX_LINE
from makima.drill import DaemonRunner

SETTLE_LIMIT = 60.0
"""Seconds to wait for the daemon to read every byte, or to close every socket."""
POLL = 0.05
LIMITS = {
    "too many connections": "max_connections",
    "unfinished input": "input_budget",
    "line longer than": "max_line",
}
"""Words of the daemon's refusals, and the limit each names."""


def say(args: argparse.Namespace, text: str) -> None:
    if not args.json:
        print(text, file=sys.stderr, flush=True)


def rss_kib(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process, in KiB."""
    values: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, rest = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            values[name] = int(rest.split()[0])
    return values


def open_files(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def unread(stream: anyio.abc.SocketStream) -> int:
    """Bytes this side sent that the daemon has not read yet (SIOCOUTQ), 0 once closed."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    if raw.fileno() < 0:
        return 0
    buffer = fcntl.ioctl(raw.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buffer)[0])


def reply_code(stream: anyio.abc.SocketStream) -> str | None:
    """What the daemon said on this connection: its error code and which limit;
    None if it sent nothing (the connection is held). Reads without waiting."""
    raw = stream.extra(anyio.abc.SocketAttribute.raw_socket)
    data = b""
    while b"\n" not in data:
        try:
            chunk = raw.recv(65536, socket.MSG_DONTWAIT)
        except BlockingIOError:
            break
        except OSError:
            return "reset" if not data else "garbled"
        if not chunk:
            return "closed" if not data else "garbled"
        data += chunk
    if not data:
        return None
    try:
        error = json.loads(data.split(b"\n", 1)[0])["error"]
        code, message = int(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        return "garbled"
    for words, limit in LIMITS.items():
        if words in message:
            return f"{code} {limit}"
    return f"{code} {message[:40]}"


def partial_line(size: int) -> bytes:
    """The first ``size`` bytes of a ``daemon.hello`` request padded with JSON
    whitespace: all of it but the ``}`` and newline that :func:`complete_line` adds."""
    head = b'{"jsonrpc":"2.0","id":1,"method":"daemon.hello"'
    return (head + b" " * max(0, size - len(head)))[:size]


def complete_line(size: int) -> bytes:
    """A valid request line of ``size`` bytes (at least 50), newline included."""
    return partial_line(max(size - 2, 48)) + b"}\n"


async def hello_ms(path: Path) -> float | None:
    """One ``daemon.hello`` on a fresh connection, in ms; None if it failed."""
    started = time.perf_counter()
    try:
        async with ControlClient.connect(path, timeout=10) as client:
            await client.call("daemon.hello")
    except Exception:
        return None
    return round((time.perf_counter() - started) * 1000, 2)


async def wait_until(condition: Callable[[], bool], what: str) -> None:
    try:
        with anyio.fail_after(SETTLE_LIMIT):
            # another process's state: there is nothing to wait on but time
            while not condition():  # noqa: ASYNC110
                await anyio.sleep(POLL)
    except TimeoutError:
        raise RuntimeError(f"gave up waiting for {what} after {SETTLE_LIMIT} s") from None


async def measure(args: argparse.Namespace, runner: DaemonRunner) -> dict[str, Any]:
    assert runner.process is not None
    pid = runner.process.pid
    path = runner.socket_path
    payload = partial_line(args.line_bytes)

    await hello_ms(path)
    if not args.cold:  # a daemon that has served one long request, as any will have
        async with await anyio.connect_unix(path) as stream:
            await stream.send(complete_line(args.line_bytes))
            await stream.receive()
    files_before = open_files(pid)
    before = rss_kib(pid)
    say(args, f"before: RSS {before['VmRSS'] / 1024:.1f} MiB")

    streams: list[anyio.abc.SocketStream] = []
    send_failed = 0
    try:
        started = time.perf_counter()
        for _ in range(args.connections):
            stream = await anyio.connect_unix(path)
            streams.append(stream)
            try:
                await stream.send(payload)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
                send_failed += 1  # refused or closed while sending: see its reply below
        await wait_until(lambda: all(unread(s) == 0 for s in streams), "every byte read")
        sent_seconds = time.perf_counter() - started
        hello_during = await hello_ms(path)
        during = rss_kib(pid)
        outcomes = Counter(reply_code(s) for s in streams)
        held = outcomes.pop(None, 0)
        say(
            args,
            f"during: RSS {during['VmRSS'] / 1024:.1f} MiB with {held} of"
            f" {args.connections} connections holding {args.line_bytes} bytes each"
            f" (others: {dict(outcomes) or 'none'})",
        )
    finally:
        for held_stream in streams:
            with contextlib.suppress(Exception):
                await held_stream.aclose()
    await wait_until(lambda: open_files(pid) <= files_before, "every socket closed")
    hello_after = await hello_ms(path)
    after = rss_kib(pid)
    say(args, f"after: RSS {after['VmRSS'] / 1024:.1f} MiB")

    def mib(kib: int) -> float:
        return round(kib / 1024, 1)

    grown = during["VmRSS"] - before["VmRSS"]
    return {
        "connections": args.connections,
        "line_bytes": args.line_bytes,
        "held": held,
        "not_held": {str(what): count for what, count in sorted(outcomes.items(), key=str)},
        "send_failed": send_failed,
        "send_seconds": round(sent_seconds, 2),
        "rss_mib": {
            "before": mib(before["VmRSS"]),
            "during": mib(during["VmRSS"]),
            "after": mib(after["VmRSS"]),
        },
        "peak_rss_mib": mib(after["VmHWM"]),
        "during_over_before": round(during["VmRSS"] / before["VmRSS"], 2),
        "after_over_before": round(after["VmRSS"] / before["VmRSS"], 2),
        "growth_per_held_kib": round(grown / held) if held else None,
        "hello_ms": {"during": hello_during, "after": hello_after},
        "open_files_before": files_before,
    }


async def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    extra = list(args.daemon_args)
    if args.max_connections is not None:
        extra += ["--max-connections", str(args.max_connections)]
    runner = DaemonRunner(
        state_dir=scratch / "st",
        socket_path=scratch / "d.sock",
        database_url=args.database_url,
        log_path=scratch / "daemon.log",
        args=extra,
    )
    say(args, f"starting a daemon in {scratch} ...")
    try:
        await runner.start(extra_env={"MAKIMA_LOG_LEVEL": "warning"})
    except Exception:
        log = await anyio.Path(runner.log_path).read_text(errors="replace")
        print(log[-3000:], file=sys.stderr)
        raise
    try:
        return await measure(args, runner)
    finally:
        with anyio.CancelScope(shield=True):
            if runner.running:
                await runner.terminate()


def print_table(data: dict[str, Any]) -> None:
    rss = data["rss_mib"]
    print(f"connections {data['connections']} x {data['line_bytes']} bytes partial lines")
    print(f"held {data['held']}, not held {data['not_held'] or 'none'}")
    print(f"{'':8}{'RSS MiB':>10}{'x before':>10}")
    print(f"{'before':8}{rss['before']:>10}{1.0:>10}")
    print(f"{'during':8}{rss['during']:>10}{data['during_over_before']:>10}")
    print(f"{'after':8}{rss['after']:>10}{data['after_over_before']:>10}")
    print(
        f"peak {data['peak_rss_mib']} MiB; growth per held connection"
        f" {data['growth_per_held_kib']} KiB; hello during {data['hello_ms']['during']} ms"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=400, help="connections opened")
    parser.add_argument(
        "--line-bytes", type=int, default=MAX_LINE, help="bytes of each partial line"
    )
    parser.add_argument("--max-connections", type=int, help="the daemon's --max-connections")
    parser.add_argument("--database-url", help="use this PostgreSQL instead of an embedded one")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="skip the one complete long line sent before 'before' (see the README)",
    )
    parser.add_argument("--json", action="store_true", help="print only the JSON line")
    parser.add_argument("daemon_args", nargs="*", help="more daemon options, after --")
    args = parser.parse_args(argv)
    if not 1 <= args.connections <= 5000:
        parser.error("--connections must be in [1, 5000]")
    if not 1 <= args.line_bytes <= 64 * MAX_LINE:
        parser.error("--line-bytes must be in [1, 64 MiB]")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
    )
    scratch = Path(tempfile.mkdtemp(prefix="mkm-", dir="/tmp"))
    try:
        if os.geteuid() == 0:
            scratch.chmod(0o711)  # as root, the embedded server runs as another account
        (scratch / "st").mkdir()
        data = anyio.run(run, args, scratch)
    except KeyboardInterrupt:
        print("interrupted; the daemon was stopped", file=sys.stderr)
        return 130
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if not args.json:
        print_table(data)
        print()
    print(json.dumps(data, separators=(",", ":")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
