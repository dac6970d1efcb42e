"""structlog set-up: a console renderer on a terminal, JSON lines otherwise.

A log line that cannot be written (disk full, a broken pipe, a closed stream)
is dropped and counted; the write failure never reaches the code that logged,
so a request handler or an agent reader carries on as if the line had been
written. Once writing works again the count is reported, as the event
``log.lines_dropped``: at the first line that gets through, then at most once
per :data:`REPORT_INTERVAL` while writes keep failing now and then.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

WRITE_ERRORS: tuple[type[Exception], ...] = (OSError, ValueError)
"""What a failed write raises: OSError (ENOSPC, EIO, EPIPE…) and ValueError (a
closed stream; an encoding error is one too)."""

REPORT_INTERVAL = 10.0
"""Seconds between two ``log.lines_dropped`` reports."""

DROPPED_EVENT = "log.lines_dropped"


class LogSink:
    """The stream every logger of one configuration writes to, and the count of
    the lines it could not write.

    ``render`` turns the report's event dict into a line (the configured
    renderer); ``clock`` is monotonic seconds.
    """

    def __init__(
        self,
        stream: TextIO,
        render: Callable[[dict[str, Any]], str],
        *,
        report_interval: float = REPORT_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stream = stream
        self.dropped = 0
        """Lines lost since the last report."""
        self.dropped_total = 0
        """Lines lost since this sink was made."""
        self._render = render
        self._report_interval = report_interval
        self._clock = clock
        self._first_drop: datetime | None = None
        self._last_report: float | None = None
        # Reentrant: a signal handler that logs while this thread writes must not hang.
        self._lock = threading.RLock()

    def write(self, line: str) -> None:
        with self._lock:
            if not self._put(line):
                self._lost()
                return
            if self.dropped and self._report_due():
                self._report()

    def _put(self, line: str) -> bool:
        try:
            self.stream.write(line + "\n")
            self.stream.flush()
        except WRITE_ERRORS:
            return False
        return True

    def _lost(self) -> None:
        if not self.dropped:
            self._first_drop = datetime.now(UTC)
        self.dropped += 1
        self.dropped_total += 1

    def _report_due(self) -> bool:
        return (
            self._last_report is None or self._clock() - self._last_report >= self._report_interval
        )

    def _report(self) -> None:
        since = None
        if self._first_drop is not None:  # as the timestamps: ISO 8601, UTC, with a Z
            since = self._first_drop.isoformat().replace("+00:00", "Z")
        line = self._render({"event": DROPPED_EVENT, "lines": self.dropped, "since": since})
        if self._put(line):
            self._last_report = self._clock()
            self.dropped = 0
            self._first_drop = None
        # Otherwise the count stays, and the next line that gets through tries again.


class SinkLogger:
    """The logger structlog's bound loggers call: every level writes one line."""

    __slots__ = ("_sink",)

    def __init__(self, sink: LogSink) -> None:
        self._sink = sink

    def msg(self, message: str) -> None:
        self._sink.write(message)

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


class SinkLoggerFactory:
    """One shared :class:`LogSink`; a cheap :class:`SinkLogger` per ``get_logger``."""

    def __init__(self, sink: LogSink) -> None:
        self.sink = sink

    def __call__(self, *args: Any) -> SinkLogger:
        return SinkLogger(self.sink)


def _renderer_of(
    processors: Sequence[structlog.typing.Processor],
) -> Callable[[dict[str, Any]], str]:
    """Render an event dict (as a warning) through ``processors``, which end in a renderer."""

    def render(event: dict[str, Any]) -> str:
        result: Any = event
        for processor in processors:
            result = processor(None, "warning", result)
        return str(result)

    return render


def configure(
    *, level: str | None = None, stream: TextIO | None = None, json: bool | None = None
) -> None:
    out = stream or sys.stderr
    name = (level or os.environ.get("MAKIMA_LOG_LEVEL") or "info").upper()
    numeric = logging.getLevelName(name)
    if not isinstance(numeric, int):
        numeric = logging.INFO
    as_json = (not out.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if as_json
        else structlog.dev.ConsoleRenderer(colors=out.isatty())
    )
    stamp = structlog.processors.TimeStamper(fmt="iso", utc=True)
    # The drop report carries no request's context variables: it is about the stream.
    sink = LogSink(out, _renderer_of([structlog.processors.add_log_level, stamp, renderer]))
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            stamp,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=SinkLoggerFactory(sink),
        cache_logger_on_first_use=False,
    )
