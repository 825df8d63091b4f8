"""A small OpenAI-compatible HTTP client: retries, backoff with jitter, Retry-After, counters."""

from __future__ import annotations

import email.utils
import os
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import requests

from divscope.sampling.config import RequestSpec


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

    def backoff(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait before retry number ``attempt + 1``."""
        if retry_after is not None:
            return min(retry_after, 600.0)
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
                r = self._session.post(
                    url, json=payload, headers=headers, timeout=self.spec.timeout_s
                )
            except (requests.ConnectionError, requests.Timeout) as e:
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
