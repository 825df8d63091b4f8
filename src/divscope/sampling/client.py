"""A small OpenAI-compatible HTTP client: retries, backoff with jitter, Retry-After, a
whole-request deadline, counters."""

from __future__ import annotations

import contextlib
import email.utils
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests
import requests.adapters
import urllib3.connection
import urllib3.connectionpool

from divscope.sampling.config import RequestSpec

MAX_RETRY_AFTER_S = 120.0  # or backoff_max_s if larger: longer asks end the prompt's attempt
# Worth another attempt: no connection, a timeout, a body cut short or garbled on the way.
_RETRYABLE = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    requests.exceptions.ContentDecodingError,
)


class APIError(RuntimeError):
    """A request that failed for good (after retries where retrying made sense)."""

    def __init__(self, message: str, *, status: int | None = None, retryable: bool = False):
        super().__init__(message)
        self.status = status
        self.retryable = retryable


@dataclass
class RequestStats:
    """Counters shared by all clients of a run (thread-safe)."""

    requests: int = 0
    retries: int = 0
    failures: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for k, v in counts.items():
                setattr(self, k, getattr(self, k) + v)

    def to_json(self) -> dict[str, int]:
        return {
            k: getattr(self, k)
            for k in ("requests", "retries", "failures", "prompt_tokens", "completion_tokens")
        }


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header (seconds or an HTTP date) into seconds to wait."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def scrub(text: str, key: str | None) -> str:
    """``text`` with the key and every 8-character piece of it replaced by ``***``."""
    if not key or not text:
        return text
    text = text.replace(key, "***")
    for i in range(max(0, len(key) - 7)):
        piece = key[i : i + 8]
        if piece in text:
            text = text.replace(piece, "***")
    return text


def scrub_json(obj: Any, key: str | None) -> Any:
    """A decoded JSON value with :func:`scrub` applied to every string in it (keys too)."""
    if not key:
        return obj
    if isinstance(obj, str):
        return scrub(obj, key)
    if isinstance(obj, list):
        return [scrub_json(v, key) for v in obj]
    if isinstance(obj, dict):
        return {scrub(k, key): scrub_json(v, key) for k, v in obj.items()}
    return obj


_ACTIVE = threading.local()  # the connections the current thread's request is using


class _Tracked:
    """Mixin for urllib3 connections: registers itself with the thread's request watchdog."""

    def request(self, *args: Any, **kwargs: Any) -> Any:
        active = getattr(_ACTIVE, "conns", None)
        if active is not None:
            active.append(self)  # its socket while connecting and sending
        result = super().request(*args, **kwargs)  # type: ignore[misc]
        if active is not None and self.sock is not None:  # type: ignore[attr-defined]
            active.append(self.sock)  # the response reads it after the connection lets go
        return result


class _TrackedHTTP(_Tracked, urllib3.connection.HTTPConnection):
    pass


class _TrackedHTTPS(_Tracked, urllib3.connection.HTTPSConnection):
    pass


class _TrackedHTTPPool(urllib3.connectionpool.HTTPConnectionPool):
    ConnectionCls = _TrackedHTTP


class _TrackedHTTPSPool(urllib3.connectionpool.HTTPSConnectionPool):
    ConnectionCls = _TrackedHTTPS


class _DeadlineAdapter(requests.adapters.HTTPAdapter):
    """An adapter whose connections a watchdog can find and shut (see :func:`_with_deadline`)."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _TrackedHTTPPool,
            "https": _TrackedHTTPSPool,
        }


class DeadlineExceeded(Exception):
    """The whole request (connect, headers, body) took longer than its deadline."""


def _with_deadline(seconds: float, call: Callable[[], Any]) -> Any:
    """``call()``, its connections shut if it runs past ``seconds`` (then DeadlineExceeded).

    A socket timeout bounds each read, not the request: a server trickling one byte a second
    never trips it. The watchdog shuts the request's sockets, which ends any blocked read.
    """
    conns: list[Any] = []
    expired = threading.Event()

    def expire() -> None:
        expired.set()
        for c in conns:
            sock = c if isinstance(c, socket.socket) else getattr(c, "sock", None)
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    timer = threading.Timer(seconds, expire)
    _ACTIVE.conns = conns
    timer.start()
    try:
        result = call()
    except Exception:
        if expired.is_set():
            raise DeadlineExceeded from None
        raise
    finally:
        timer.cancel()
        _ACTIVE.conns = None
    if expired.is_set():
        raise DeadlineExceeded
    return result


class OpenAIClient:
    """POSTs to an OpenAI-compatible server with retries on 429, 5xx, timeouts and
    connection errors: exponential backoff with jitter, or the server's ``Retry-After``.

    The API key is read from the environment variable named in the config and only ever
    placed in the ``Authorization`` header; error messages are scrubbed of it.
    """

    def __init__(
        self,
        base_url: str,
        api_key_env: str | None,
        spec: RequestSpec,
        stats: RequestStats,
        *,
        sleep: Callable[[float], None] = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        # surrounding whitespace (a CRLF .env file's \r) would go into the header and into
        # the error requests raises about it
        self._key = (os.environ.get(api_key_env) or "").strip() or None if api_key_env else None
        self.spec = spec
        self.stats = stats
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._local = threading.local()

    @property
    def _session(self) -> requests.Session:
        s = getattr(self._local, "session", None)
        if s is None:
            s = self._local.session = requests.Session()
            for prefix in ("http://", "https://"):
                s.mount(prefix, _DeadlineAdapter())
        return s

    def _scrub(self, text: str) -> str:
        """``text`` without the key or any 8-character piece of it."""
        return scrub(text, self._key)

    def _count_usage(self, body: Any) -> None:
        usage = body.get("usage") if isinstance(body, dict) else None
        if not isinstance(usage, dict):
            return
        counts = {}
        for k in ("prompt_tokens", "completion_tokens"):
            v = usage.get(k)
            counts[k] = v if type(v) is int and 0 <= v < 10**9 else 0
        self.stats.add(**counts)

    @property
    def max_retry_after(self) -> float:
        """The longest ``Retry-After`` waited for; a longer one fails the prompt (resumable)."""
        return max(MAX_RETRY_AFTER_S, self.spec.backoff_max_s)

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        if retry_after is not None:
            return min(retry_after, self.max_retry_after)
        cap = min(self.spec.backoff_max_s, self.spec.backoff_base_s * 2**attempt)
        return cap * (0.5 + 0.5 * self._rng.random())  # jitter in [cap/2, cap]

    def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        """POST ``payload`` to ``base_url + path``; return the decoded JSON body.

        Raises:
            APIError: A non-retryable status (4xx other than 429), or retries exhausted.
        """
        url = f"{self.base_url}/{path.lstrip('/')}"
        headers = {"Content-Type": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        last = ""
        for attempt in range(self.spec.max_attempts):
            self.stats.add(requests=1)
            retry_after = None
            try:
                r = _with_deadline(
                    self.spec.timeout_s,
                    lambda: self._session.post(
                        url, json=payload, headers=headers, timeout=self.spec.timeout_s
                    ),
                )
            except DeadlineExceeded:
                last = f"no complete answer within timeout_s = {self.spec.timeout_s} s"
            except _RETRYABLE as e:  # a body cut short of its Content-Length too
                last = f"{type(e).__name__}: {e}"
            except (requests.RequestException, ValueError) as e:  # e.g. an invalid header
                self.stats.add(failures=1)
                raise APIError(self._scrub(f"{url}: {type(e).__name__}: {e}")) from None
            else:
                if r.status_code == 200:
                    try:
                        body = scrub_json(r.json(), self._key)
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON"
                    else:
                        self._count_usage(body)
                        return body
                elif r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {self._scrub(r.text)[:200]}"
                    retry_after = retry_after_seconds(r.headers.get("Retry-After"))
                    if retry_after is not None and retry_after > self.max_retry_after:
                        self.stats.add(failures=1)
                        raise APIError(
                            self._scrub(
                                f"{url}: HTTP {r.status_code} asks to wait {retry_after:.0f} s "
                                f"(Retry-After), over the {self.max_retry_after:.0f} s limit; "
                                "re-run later to resume"
                            ),
                            status=r.status_code,
                            retryable=True,
                        )
                else:
                    self.stats.add(failures=1)
                    raise APIError(
                        f"{url}: HTTP {r.status_code}: {self._scrub(r.text)[:300]}",
                        status=r.status_code,
                    )
            if attempt + 1 < self.spec.max_attempts:
                self.stats.add(retries=1)
                self._sleep(self.backoff(attempt, retry_after))
        self.stats.add(failures=1)
        raise APIError(
            self._scrub(f"{url}: gave up after {self.spec.max_attempts} attempts; last: {last}"),
            retryable=True,
        )
