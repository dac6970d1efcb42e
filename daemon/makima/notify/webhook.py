"""``--webhook URL``: the notice as JSON in an HTTP POST, signed when a secret is given.

Each attempt is bounded by the timeout; a network error, a timeout, 408, 425,
429 or a 5xx is tried again at once with a jittered exponential backoff
(tenacity), a few times, before the notice goes back to its lane (which tries
again later). Any other answer that is not 2xx (a 4xx, a redirect: redirects
are not followed) refuses the notice for this run. Every attempt is logged as
``notify.webhook_attempt`` with its number and the status.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from urllib.parse import urlsplit

import anyio
import httpx
import structlog
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from makima import __version__
from makima.errors import InvalidValueError
from makima.notify.base import DeliveryError, DeliveryRefusedError, fingerprint
from makima.notify.message import Notice, encode_payload
from makima.notify.signature import signature_headers

log = structlog.get_logger("makima.notify")

RETRY_STATUSES = frozenset({408, 425, 429})
ATTEMPTS = 4
FIRST_WAIT = 0.25
LONGEST_WAIT = 8.0


class _Retry(Exception):
    """A signal to tenacity, never seen outside."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def check_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidValueError(f"webhook URL {redact(url)!r}: expected an http:// or https:// URL")
    return url


def redact(url: str) -> str:
    """The URL without what may be a secret (credentials, path, query): for logs."""
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    rest = "/…" if parts.path.strip("/") or parts.query else ""
    return f"{parts.scheme}://{host}{port}{rest}"


class WebhookNotifier:
    def __init__(
        self,
        url: str,
        client: httpx.AsyncClient,
        *,
        secret: bytes | None = None,
        timeout: float = 10.0,
        attempts: int = ATTEMPTS,
        first_wait: float = FIRST_WAIT,
        longest_wait: float = LONGEST_WAIT,
        concurrency: int = 4,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.url = check_url(url)
        self.name = f"webhook:{fingerprint(url)}"
        self.label = f"webhook {redact(url)}"
        self.concurrency = concurrency
        self._client = client
        self._secret = secret
        self._timeout = timeout
        self._attempts = attempts
        self._first_wait = first_wait
        self._longest_wait = longest_wait
        self._clock = clock

    async def deliver(self, notice: Notice) -> None:
        body = encode_payload(notice)
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self._attempts),
            wait=wait_exponential_jitter(
                initial=self._first_wait, max=self._longest_wait, jitter=self._first_wait
            ),
            retry=retry_if_exception_type(_Retry),
            sleep=anyio.sleep,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._post(notice, body, attempt.retry_state.attempt_number)
        except _Retry as exc:
            raise DeliveryError(
                f"{self.label}: {exc.reason} after {self._attempts} attempts"
            ) from None

    async def retract(self, question_id: str) -> None:
        pass  # a POST cannot be taken back; --on answered tells the receiver instead

    async def _post(self, notice: Notice, body: bytes, attempt: int) -> None:
        headers = {
            "Content-Type": "application/json",
            "User-Agent": f"makima/{__version__}",
            "X-Makima-Event": notice.kind.event,
            "X-Makima-Delivery": notice.delivery_id,
        }
        if self._secret is not None:
            headers.update(signature_headers(self._secret, int(self._clock()), body))
        where = {
            "notifier": self.label,
            "question_id": notice.question_id,
            "notice": notice.kind.value,
            "attempt": attempt,
        }
        try:
            with anyio.fail_after(self._timeout):
                # The response's body is never read: a receiver cannot make it matter.
                async with self._client.stream(
                    "POST", self.url, content=body, headers=headers
                ) as response:
                    status = response.status_code
        except (httpx.HTTPError, TimeoutError) as exc:
            reason = type(exc).__name__ if isinstance(exc, TimeoutError) else repr(exc)
            log.warning("notify.webhook_attempt", **where, error=reason)
            raise _Retry(reason) from None
        log.info("notify.webhook_attempt", **where, status=status)
        if 200 <= status < 300:
            return
        if status >= 500 or status in RETRY_STATUSES:
            raise _Retry(f"HTTP {status}")
        raise DeliveryRefusedError(f"{self.label} refused the notice: HTTP {status}")
