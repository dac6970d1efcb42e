"""Following the daemon: subscribe to its question events, and again whenever it comes back.

Each connection first lists the open questions (to forget those answered while
nobody was listening), then subscribes: the subscription's snapshot re-sends
every open question as ``question.pending``, and the record decides which
notifier still owes it. When the daemon goes away (no socket, connection
refused or closed, a call timed out), the follower waits with a jittered
exponential backoff and connects again.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio
import structlog

from makima.control.client import ControlClient, ControlError, DaemonNotRunningError, RemoteError
from makima.notify.lanes import Dispatcher
from makima.notify.message import (
    ANSWERED_EVENT,
    ASKING_EVENTS,
    FINISHED_STATES,
    STATE_EVENT,
    SUBSCRIBED_EVENTS,
    notice_from_event,
    supervisor_name,
)

log = structlog.get_logger("makima.notify")

EVENT_BUFFER = 16_384
MAX_NAMES = 4096
RECONNECT_FIRST = 0.2
RECONNECT_LONGEST = 10.0


class Follower:
    def __init__(
        self,
        socket_path: Callable[[], Path],
        dispatcher: Dispatcher,
        *,
        timeout: float = 10.0,
        first_wait: float = RECONNECT_FIRST,
        longest_wait: float = RECONNECT_LONGEST,
    ) -> None:
        self._socket_path = socket_path
        self.dispatcher = dispatcher
        self.timeout = timeout
        self.first_wait = first_wait
        self.longest_wait = longest_wait
        self._names: OrderedDict[str, str] = OrderedDict()
        self.connections = 0

    async def run(self) -> None:
        """Follow the daemon for ever (until cancelled)."""
        wait = self.first_wait
        while True:
            path = self._socket_path()
            before = self.connections
            try:
                await self._follow(path)
                reason = "the daemon closed the connection"
            except DaemonNotRunningError as exc:
                reason = exc.reason
            except ControlError as exc:
                reason = str(exc)
            if self.connections > before:
                wait = self.first_wait  # it was up: the next try comes soon
            log.warning(
                "notify.daemon_unreachable",
                socket=str(path),
                reason=reason,
                retry_in=round(wait, 2),
            )
            await anyio.sleep(wait * random.uniform(0.5, 1.0))  # noqa: S311 - jitter
            wait = min(wait * 2, self.longest_wait)

    async def _follow(self, path: Path) -> None:
        async with ControlClient.connect(path, timeout=self.timeout) as client:
            listing = await client.call("question.list")
            questions = listing.get("questions") if isinstance(listing, Mapping) else None
            if isinstance(questions, list) and not listing.get("more"):
                self.dispatcher.prune(
                    q["question_id"]
                    for q in questions
                    if isinstance(q, Mapping) and isinstance(q.get("question_id"), str)
                )
            async with client.events(SUBSCRIBED_EVENTS, buffer=EVENT_BUFFER) as events:
                self.connections += 1
                log.info("notify.subscribed", socket=str(path), open_questions=len(questions or ()))
                async for event in events:
                    await self._handle(client, event)

    async def _handle(self, client: ControlClient, event: Mapping[str, Any]) -> None:
        kind = event.get("kind")
        supervisor_id = event.get("supervisor_id")
        if not isinstance(supervisor_id, str):
            return
        if kind == STATE_EVENT:
            self._remember(supervisor_id, supervisor_name(event.get("name"), supervisor_id))
            if event.get("state") in FINISHED_STATES:
                self.dispatcher.supervisor_finished(supervisor_id)
            return
        if kind not in ASKING_EVENTS and kind != ANSWERED_EVENT:
            return
        name = await self._name(client, supervisor_id)
        notice = notice_from_event(event, name)
        if notice is None:
            log.warning("notify.bad_event", kind=kind)
            return
        self.dispatcher.notice(notice)

    async def _name(self, client: ControlClient, supervisor_id: str) -> str:
        name = self._names.get(supervisor_id)
        if name is not None:
            self._names.move_to_end(supervisor_id)
            return name
        try:
            found = await client.call("supervisor.get", {"supervisor_id": supervisor_id})
        except RemoteError as exc:
            log.debug("notify.supervisor_unnamed", supervisor_id=supervisor_id, reason=str(exc))
            return supervisor_name(None, supervisor_id)
        raw = found.get("name") if isinstance(found, Mapping) else None
        name = supervisor_name(raw, supervisor_id)
        self._remember(supervisor_id, name)
        return name

    def _remember(self, supervisor_id: str, name: str) -> None:
        self._names[supervisor_id] = name
        self._names.move_to_end(supervisor_id)
        while len(self._names) > MAX_NAMES:
            self._names.popitem(last=False)
