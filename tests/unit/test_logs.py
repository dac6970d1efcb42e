"""A failed log write is dropped and counted, never raised into the code that
logged; the count is reported once writing works again."""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

from makima import logs


class FlakyStream(io.StringIO):
    """A stream whose writes fail with ``error`` while ``failing`` is set."""

    def __init__(self, error: BaseException | None = None) -> None:
        super().__init__()
        self.error = error or OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.failing = True
        self.attempts = 0

    def write(self, text: str) -> int:
        self.attempts += 1
        if self.failing:
            raise self.error
        return super().write(text)

    def isatty(self) -> bool:
        return False

    def lines(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.getvalue().splitlines()]


@pytest.fixture(autouse=True)
def restore_structlog() -> Iterator[None]:
    """logs.configure changes structlog's global configuration: put it back."""
    saved = structlog.get_config()
    try:
        yield
    finally:
        structlog.configure(**saved)


def log_at_every_level(log: Any) -> None:
    log.debug("t.debug", n=1)
    log.info("t.info", n=2)
    log.warning("t.warning", n=3)
    log.error("t.error", n=4)
    log.critical("t.critical", n=5)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        log.exception("t.exception", n=6)


def sink() -> logs.LogSink:
    factory = structlog.get_config()["logger_factory"]
    assert isinstance(factory, logs.SinkLoggerFactory)
    return factory.sink


@pytest.mark.parametrize(
    "error",
    [
        OSError(errno.ENOSPC, "No space left on device"),
        OSError(errno.EIO, "Input/output error"),
        BrokenPipeError(errno.EPIPE, "Broken pipe"),
        ValueError("I/O operation on closed file."),
    ],
    ids=["ENOSPC", "EIO", "EPIPE", "closed"],
)
def test_a_failed_write_is_dropped_and_reported_once_writing_works(error: Exception) -> None:
    stream = FlakyStream(error)
    logs.configure(stream=stream, json=True, level="debug")
    log = structlog.get_logger("test")

    log_at_every_level(log)  # nothing raises

    assert stream.attempts == 6
    assert sink().dropped == 6
    stream.failing = False
    log.info("t.back", n=7)
    back, report = stream.lines()
    assert back["event"] == "t.back"
    assert report["event"] == "log.lines_dropped"
    assert report["lines"] == 6
    assert report["level"] == "warning"
    assert report["since"] <= report["timestamp"]
    assert sink().dropped == 0
    assert sink().dropped_total == 6

    log.info("t.again")  # reported once: nothing more to say
    assert [line["event"] for line in stream.lines()] == ["t.back", "log.lines_dropped", "t.again"]


def test_the_traceback_of_an_exception_is_written_when_the_stream_works() -> None:
    stream = FlakyStream()
    stream.failing = False
    logs.configure(stream=stream, json=True)
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        structlog.get_logger().exception("t.exception")
    (line,) = stream.lines()
    assert "RuntimeError: boom" in line["exception"]


def test_a_real_full_disk() -> None:
    """/dev/full fails every write with ENOSPC (when the buffer is flushed)."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    full = open("/dev/full", "w")  # noqa: SIM115
    try:
        logs.configure(stream=full, json=True)
        log_at_every_level(structlog.get_logger())
        assert sink().dropped == 5  # debug is below the default level
    finally:
        with contextlib.suppress(OSError):  # the buffer still holds what failed
            full.close()
    structlog.get_logger().info("t.after_close")  # ValueError now: dropped too
    assert sink().dropped == 6


def test_a_closed_stream_drops_lines() -> None:
    stream = io.StringIO()
    logs.configure(stream=stream, json=True)
    stream.close()
    structlog.get_logger().warning("t.closed")
    assert sink().dropped == 1


def test_the_console_renderer_reports_too() -> None:
    stream = FlakyStream()
    logs.configure(stream=stream, json=False)
    structlog.get_logger().info("t.lost")
    stream.failing = False
    structlog.get_logger().info("t.back")
    text = stream.getvalue()
    assert "t.back" in text
    assert "log.lines_dropped" in text and "lines=1" in text


def test_anything_but_a_write_failure_still_raises() -> None:
    stream = FlakyStream(RuntimeError("a bug, not a full disk"))
    logs.configure(stream=stream, json=True)
    with pytest.raises(RuntimeError, match="a bug"):
        structlog.get_logger().info("t.info")


def test_the_report_is_rate_limited_while_writes_keep_failing() -> None:
    now = [0.0]
    stream = FlakyStream()
    sink = logs.LogSink(
        stream, lambda event: json.dumps(event), report_interval=10.0, clock=lambda: now[0]
    )

    def flap(lost: int) -> None:
        stream.failing = True
        for _ in range(lost):
            sink.write('{"event": "t.lost"}')
        stream.failing = False
        sink.write('{"event": "t.ok"}')

    flap(2)  # first recovery: reported at once
    now[0] = 3.0
    flap(3)  # within the interval: counted, not reported yet
    now[0] = 12.0
    flap(1)  # past the interval: reported with everything since the last report
    reports = [line for line in stream.lines() if line["event"] == "log.lines_dropped"]
    assert [r["lines"] for r in reports] == [2, 4]
    assert sink.dropped == 0 and sink.dropped_total == 6


def test_a_report_that_fails_is_tried_again() -> None:
    class FirstReportFails(FlakyStream):
        failed_report = False

        def write(self, text: str) -> int:
            if "log.lines_dropped" in text and not self.failed_report:
                self.failed_report = True
                raise OSError(errno.ENOSPC, "No space left on device")
            return super().write(text)

    stream = FirstReportFails()
    sink = logs.LogSink(stream, json.dumps)
    sink.write('{"event": "t.lost"}')
    stream.failing = False
    sink.write('{"event": "t.ok"}')  # written; its report is not
    sink.write('{"event": "t.ok"}')  # written, and the report with it
    assert [line["event"] for line in stream.lines()] == ["t.ok", "t.ok", "log.lines_dropped"]
    assert stream.lines()[-1]["lines"] == 1
    assert sink.dropped == 0
