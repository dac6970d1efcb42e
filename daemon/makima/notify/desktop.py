"""``--desktop``: a freedesktop notification per question, straight over D-Bus.

The notification names the supervisor, the question and its choices. Where
the notification server supports actions (``GetCapabilities`` has
``actions``), each choice is an action, and a click on one (the
``ActionInvoked`` signal, from the server and for a notification this process
showed) answers the question through the control socket. A question that
is answered (here or elsewhere) has its notification closed.

:meth:`DesktopNotifier.run` keeps the bus connection: the first connection
must work (else :class:`DesktopUnavailableError`, which the command reports
in one line); a connection lost later is made again with backoff, and the
notices meanwhile fail and are tried again by their lane.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import anyio
import anyio.abc
import structlog
from jeepney import DBusAddress, MessageType, new_method_call  # type: ignore[import-untyped]

from makima.errors import MakimaError
from makima.notify.base import DeliveryError
from makima.notify.dbus import BUS, BusConnection, BusError, member, sender
from makima.notify.message import (
    Notice,
    NoticeKind,
    Question,
    choice_for_action,
    desktop_actions,
    desktop_text,
)

log = structlog.get_logger("makima.notify")

INTERFACE = "org.freedesktop.Notifications"
NOTIFICATIONS = DBusAddress(
    "/org/freedesktop/Notifications", bus_name=INTERFACE, interface=INTERFACE
)
APP_NAME = "makima"
MAX_SHOWN = 1000
"""Notifications remembered (to close them, to map a click to its question)."""
RECONNECT_FIRST = 1.0
RECONNECT_LONGEST = 60.0

Answerer = Callable[[str, str], Awaitable[None]]
"""Answers a question (question id, answer) through the control socket."""


class DesktopUnavailableError(MakimaError):
    """No desktop notification service can be had."""


class DesktopNotifier:
    name = "desktop"
    label = "desktop"
    concurrency = 2

    def __init__(
        self,
        answer: Answerer,
        *,
        env: Mapping[str, str] | None = None,
        timeout: float = 5.0,
    ) -> None:
        self._answer = answer
        self._env = env
        self._timeout = timeout
        self._bus: BusConnection | None = None
        self._owner: str | None = None
        self.capabilities: frozenset[str] = frozenset()
        self._shown: OrderedDict[str, int] = OrderedDict()  # question id → notification id
        self._questions: OrderedDict[int, Question] = OrderedDict()  # notification id → question

    # ------------------------------------------------------------------ the connection

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[None] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Keep a connection to the notification service, following its signals.

        Raises :class:`DesktopUnavailableError` (before it counts as started) when
        the first connection fails."""
        started = False
        wait = RECONNECT_FIRST
        while True:
            try:
                async with BusConnection.open(self._env, self._timeout) as bus:
                    await self._setup(bus)
                    self._bus = bus
                    log.info("notify.desktop_connected", capabilities=sorted(self.capabilities))
                    if not started:
                        started = True
                        task_status.started()
                    wait = RECONNECT_FIRST
                    async with anyio.create_task_group() as tg:  # the answers being given
                        await self._listen(bus, tg)
                    reason = bus.close_reason
            except BusError as exc:
                if not started:
                    raise DesktopUnavailableError(str(exc)) from exc
                reason = str(exc)
            finally:
                self._bus = None
                self._shown.clear()
                self._questions.clear()
            log.warning("notify.desktop_lost", reason=reason, retry_in=round(wait, 2))
            await anyio.sleep(wait * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            wait = min(wait * 2, RECONNECT_LONGEST)

    async def _setup(self, bus: BusConnection) -> None:
        try:
            (capabilities,) = await bus.call(new_method_call(NOTIFICATIONS, "GetCapabilities"))
        except BusError as exc:
            raise BusError(f"no notification service on the session bus ({exc})") from exc
        self.capabilities = frozenset(str(c) for c in capabilities if isinstance(c, str))
        (self._owner,) = await bus.call(new_method_call(BUS, "GetNameOwner", "s", (INTERFACE,)))
        for signal in ("ActionInvoked", "NotificationClosed"):
            rule = f"type='signal',interface='{INTERFACE}',member='{signal}'"
            await bus.call(new_method_call(BUS, "AddMatch", "s", (rule,)))

    async def _listen(self, bus: BusConnection, tg: anyio.abc.TaskGroup) -> None:
        async with bus.incoming:
            async for message in bus.incoming:
                if message.header.message_type is not MessageType.signal:
                    continue
                interface, name = member(message)
                if interface != INTERFACE:
                    continue
                if sender(message) != self._owner and not await self._from_server(bus, message):
                    log.warning("notify.desktop_foreign_signal", sender=sender(message))
                    continue
                if name == "ActionInvoked":
                    self._invoked(message.body, tg)
                elif name == "NotificationClosed":
                    self._closed(message.body)

    async def _from_server(self, bus: BusConnection, message: Any) -> bool:
        """Whether the signal comes from the service's owner (which may have changed)."""
        try:
            (self._owner,) = await bus.call(new_method_call(BUS, "GetNameOwner", "s", (INTERFACE,)))
        except BusError:
            return False
        return sender(message) == self._owner

    def _invoked(self, body: Any, tg: anyio.abc.TaskGroup) -> None:
        if not (isinstance(body, tuple) and len(body) == 2):
            return
        notification_id, key = body
        question = (
            self._questions.get(notification_id) if isinstance(notification_id, int) else None
        )
        if question is None or not isinstance(key, str):
            return
        choice = choice_for_action(question, key)
        if choice is None:
            log.warning("notify.desktop_unknown_action", question_id=question.question_id)
            return
        tg.start_soon(self._answer_question, question, choice)

    async def _answer_question(self, question: Question, choice: str) -> None:
        try:
            await self._answer(question.question_id, choice)
        except MakimaError as exc:
            log.warning(
                "notify.desktop_answer_failed", question_id=question.question_id, reason=str(exc)
            )
            return
        log.info("notify.desktop_answered", question_id=question.question_id, answer=choice)

    def _closed(self, body: Any) -> None:
        if not (isinstance(body, tuple) and body and isinstance(body[0], int)):
            return
        question = self._questions.pop(body[0], None)
        if question is not None and self._shown.get(question.question_id) == body[0]:
            del self._shown[question.question_id]

    # ------------------------------------------------------------------ the notifier

    async def deliver(self, notice: Notice) -> None:
        bus = self._bus
        if bus is None:
            raise DeliveryError("desktop: no connection to the notification service now")
        if notice.kind is NoticeKind.ANSWERED:
            await self.retract(notice.question_id)
        actions = "actions" in self.capabilities
        summary, body = desktop_text(
            notice, markup="body-markup" in self.capabilities, actions=actions
        )
        asked = notice.kind is NoticeKind.ASKED
        buttons = desktop_actions(notice.question) if actions and asked else []
        replaces = self._shown.get(notice.question_id, 0) if asked else 0
        hints: dict[str, tuple[str, Any]] = {"urgency": ("y", 1)}
        # A question stays until it is answered (then closed); an answer goes by itself.
        expire = 0 if asked else -1
        call = new_method_call(
            NOTIFICATIONS,
            "Notify",
            "susssasa{sv}i",
            (APP_NAME, replaces, "", summary, body, buttons, hints, expire),
        )
        try:
            (notification_id,) = await bus.call(call)
        except BusError as exc:
            raise DeliveryError(f"desktop: {exc}") from exc
        if asked and isinstance(notification_id, int):
            self._remember(notice.question, notification_id)

    async def retract(self, question_id: str) -> None:
        notification_id = self._shown.pop(question_id, None)
        bus = self._bus
        if notification_id is None or bus is None:
            return
        self._questions.pop(notification_id, None)
        try:
            await bus.call(
                new_method_call(NOTIFICATIONS, "CloseNotification", "u", (notification_id,))
            )
        except BusError as exc:
            log.debug("notify.desktop_close_failed", question_id=question_id, reason=str(exc))

    def _remember(self, question: Question, notification_id: int) -> None:
        self._shown[question.question_id] = notification_id
        self._shown.move_to_end(question.question_id)
        self._questions[notification_id] = question
        while len(self._shown) > MAX_SHOWN:
            _, old = self._shown.popitem(last=False)
            self._questions.pop(old, None)
        while len(self._questions) > MAX_SHOWN:
            self._questions.popitem(last=False)
