"""The ``makima top`` command (registered by :mod:`makima.cli`)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import click

from makima import eventloop, logs
from makima.config import client_socket_path
from makima.control.client import ControlError, RemoteError
from makima.errors import MakimaError
from makima.top.app import HeldLog, quiet_stdout, run

EXIT_FAILURE = 1


def _only_error(exc: BaseException) -> BaseException:
    """The one exception inside nested exception groups (or the group itself)."""
    while isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
        exc = exc.exceptions[0]
    return exc


@click.command("top")
@click.option(
    "--socket",
    "socket_path",
    envvar="MAKIMA_SOCKET",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Control socket of the daemon (env MAKIMA_SOCKET).",
)
def top_command(socket_path: Path | None) -> None:
    """A live view of the supervisors and their open questions.

    \b
    Keys: up/down or j/k move, a answers the selected question (or the
    selected supervisor's oldest one), c cancels the selected supervisor,
    q quits. With stdout not a terminal it prints a plain table whenever
    what it shows changes.
    """
    path = socket_path or client_socket_path(os.environ, is_root=os.geteuid() == 0)
    screen = sys.stdout.isatty()
    held = HeldLog() if screen else None
    level = os.environ.get("MAKIMA_LOG_LEVEL") or "warning"
    logs.configure(level=level, stream=held)  # on a terminal: written after the screen
    code = EXIT_FAILURE
    message: str | None = None
    try:
        code = eventloop.run(run, path, sys.stdout, sys.stdin)
    except BrokenPipeError:
        quiet_stdout()
        code = 0
    except BaseException as exc:
        error = _only_error(exc)
        if isinstance(error, BrokenPipeError):
            quiet_stdout()
            code = 0
        elif isinstance(error, KeyboardInterrupt):
            code = 0
        elif isinstance(error, RemoteError):
            message = error.message
        elif isinstance(error, ControlError | MakimaError):
            message = str(error)
        else:
            raise
    finally:
        if held is not None:
            for line in held.lines:
                click.echo(line, err=True)
    if message is not None:
        click.echo(f"makima: {message}", err=True)
    sys.exit(code)
