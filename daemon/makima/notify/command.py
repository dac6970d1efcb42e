"""The ``makima notify`` command: follow the daemon and tell people about its questions."""

from __future__ import annotations

import os
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import anyio
import anyio.abc
import click
import httpx
import structlog

from makima import eventloop, logs
from makima.config import client_socket_path
from makima.control.client import ControlClient
from makima.errors import InvalidValueError, MakimaError
from makima.notify.base import Notifier
from makima.notify.desktop import DesktopNotifier, DesktopUnavailableError
from makima.notify.execute import ExecNotifier
from makima.notify.follow import Follower
from makima.notify.lanes import Dispatcher, RetryPolicy
from makima.notify.message import NoticeKind
from makima.notify.statefile import StateKeeper, default_state_file, load_state
from makima.notify.webhook import WebhookNotifier, check_url

log = structlog.get_logger("makima.notify")

EXIT_FAILURE = 1


@dataclass(frozen=True, slots=True)
class NotifySettings:
    socket_path: Path | None
    """None: found as the other commands find it, again at each connection."""
    state_file: Path
    desktop: bool = False
    webhooks: tuple[str, ...] = ()
    webhook_secret: bytes | None = None
    webhook_timeout: float = 10.0
    commands: tuple[tuple[str, ...], ...] = ()
    exec_timeout: float = 30.0
    exec_concurrency: int = 4
    wanted: frozenset[NoticeKind] = frozenset({NoticeKind.ASKED})
    retry_longest: float = 300.0
    reconnect_longest: float = 10.0

    def socket(self) -> Path:
        if self.socket_path is not None:
            return self.socket_path
        return client_socket_path(os.environ, is_root=os.geteuid() == 0)


def say(message: str) -> None:
    """One line on stderr, as the other commands say things."""
    click.echo(f"makima: {' '.join(message.splitlines())}", err=True)


async def answer_over_socket(socket_path: Path, question_id: str, answer: str) -> None:
    async with ControlClient.connect(socket_path, timeout=10.0) as client:
        await client.call("question.answer", {"question_id": question_id, "answer": answer})


async def run_notify(settings: NotifySettings) -> int:
    """Run until SIGTERM or SIGINT (then 0); 1 when no notifier can work."""
    keeper = StateKeeper(settings.state_file, load_state(settings.state_file))
    async with httpx.AsyncClient(
        timeout=httpx.Timeout(settings.webhook_timeout),
        follow_redirects=False,
        trust_env=True,
    ) as http:
        notifiers: list[Notifier] = [
            WebhookNotifier(
                url, http, secret=settings.webhook_secret, timeout=settings.webhook_timeout
            )
            for url in settings.webhooks
        ]
        notifiers += [
            ExecNotifier(argv, timeout=settings.exec_timeout, concurrency=settings.exec_concurrency)
            for argv in settings.commands
        ]
        async with anyio.create_task_group() as tg:
            tg.start_soon(_stop_on_signal, tg.cancel_scope)
            await tg.start(keeper.run)
            if settings.desktop:
                desktop = DesktopNotifier(
                    lambda qid, text: answer_over_socket(settings.socket(), qid, text)
                )
                try:
                    await tg.start(desktop.run)
                except DesktopUnavailableError as exc:
                    go_on = "; the other notifiers go on" if notifiers else ""
                    say(f"no desktop notifications: {exc}{go_on}")
                else:
                    notifiers.append(desktop)
            if not notifiers:
                tg.cancel_scope.cancel()
                return EXIT_FAILURE
            dispatcher = Dispatcher(
                notifiers,
                keeper,
                settings.wanted,
                RetryPolicy(longest=settings.retry_longest),
            )
            await tg.start(dispatcher.run)
            log.info(
                "notify.started",
                notifiers=[n.label for n in notifiers],
                on=sorted(settings.wanted),
                state_file=str(settings.state_file),
                known_questions=len(keeper.state),
            )
            follower = Follower(
                settings.socket, dispatcher, longest_wait=settings.reconnect_longest
            )
            await follower.run()
    return 0


async def _stop_on_signal(scope: anyio.CancelScope) -> None:
    with anyio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async for signum in signals:
            log.info("notify.stopping", signal=signal.Signals(signum).name)
            scope.cancel()
            return


def split_command(text: str) -> tuple[str, ...]:
    """``--exec`` text as an argv, split by POSIX shell quoting rules (no shell runs it)."""
    try:
        argv = tuple(shlex.split(text))
    except ValueError as exc:
        raise InvalidValueError(f"--exec {text!r}: {exc}") from None
    if not argv:
        raise InvalidValueError("--exec needs a command")
    return argv


@click.command(name="notify")
@click.option("--desktop", is_flag=True, help="Desktop notifications (freedesktop, over D-Bus).")
@click.option(
    "--webhook",
    "webhooks",
    multiple=True,
    metavar="URL",
    help="POST each notice as JSON to URL (repeatable).",
)
@click.option(
    "--webhook-secret",
    envvar="MAKIMA_WEBHOOK_SECRET",
    show_envvar=True,
    help="Sign webhook bodies with HMAC-SHA256 (X-Makima-Signature).",
)
@click.option("--webhook-timeout", type=click.FloatRange(min=0.1), default=10.0, show_default=True)
@click.option(
    "--exec",
    "commands",
    multiple=True,
    metavar="COMMAND",
    help="Run COMMAND (split as a shell would, never run by one) per notice, the notice's"
    " JSON on stdin and in MAKIMA_* variables (repeatable).",
)
@click.option("--exec-timeout", type=click.FloatRange(min=0.1), default=30.0, show_default=True)
@click.option("--exec-concurrency", type=click.IntRange(min=1), default=4, show_default=True)
@click.option(
    "--on",
    "wanted",
    multiple=True,
    type=click.Choice([k.value for k in NoticeKind]),
    default=[NoticeKind.ASKED.value],
    show_default=True,
    help="What to tell (repeatable): questions asked, and/or questions answered.",
)
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Where to remember what was told"
    " (default: $XDG_STATE_HOME/makima/notify-<socket hash>.json).",
)
@click.option(
    "--retry-max",
    type=click.FloatRange(min=0.1),
    default=300.0,
    show_default=True,
    help="Longest wait, in seconds, before a failed notice is tried again.",
)
@click.option(
    "--reconnect-max",
    type=click.FloatRange(min=0.05),
    default=10.0,
    hidden=True,
    help="Longest wait, in seconds, before connecting to the daemon again.",
)
@click.option(
    "--socket",
    "socket_path",
    envvar="MAKIMA_SOCKET",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Control socket of the daemon (env MAKIMA_SOCKET).",
)
def notify_command(
    desktop: bool,
    webhooks: tuple[str, ...],
    webhook_secret: str | None,
    webhook_timeout: float,
    commands: tuple[str, ...],
    exec_timeout: float,
    exec_concurrency: int,
    wanted: tuple[str, ...],
    state_file: Path | None,
    retry_max: float,
    reconnect_max: float,
    socket_path: Path | None,
) -> None:
    """Tell people about questions: on the desktop, by webhook, or by running a command.

    Each question is told once per notifier, across restarts of this command and of
    the daemon; a notifier that fails is tried again later. Runs until stopped.
    """
    if not (desktop or webhooks or commands):
        raise click.UsageError("give at least one of --desktop, --webhook URL, --exec COMMAND")
    try:
        argvs = tuple(split_command(text) for text in commands)
    except InvalidValueError as exc:
        raise click.UsageError(str(exc)) from None
    settings = NotifySettings(
        socket_path=socket_path,
        state_file=state_file or default_state_file(os.environ, socket_path),
        desktop=desktop,
        webhooks=tuple(webhooks),
        webhook_secret=webhook_secret.encode() if webhook_secret else None,
        webhook_timeout=webhook_timeout,
        commands=argvs,
        exec_timeout=exec_timeout,
        exec_concurrency=exec_concurrency,
        wanted=frozenset(NoticeKind(w) for w in wanted),
        retry_longest=retry_max,
        reconnect_longest=reconnect_max,
    )
    try:
        for url in settings.webhooks:
            check_url(url)
    except InvalidValueError as exc:
        raise click.UsageError(str(exc)) from None
    logs.configure()
    try:
        code = eventloop.run(run_notify, settings)
    except KeyboardInterrupt:
        code = 0
    except MakimaError as exc:
        say(str(exc))
        code = EXIT_FAILURE
    sys.exit(code)
