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
        self._key = os.environ.get(api_key_env) if api_key_env else None
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
        return text.replace(self._key, "***") if self._key else text

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
            else:
                if r.status_code == 200:
                    try:
                        body = r.json()
                    except ValueError:
                        last = "HTTP 200 with a body that is not JSON"
                    else:
                        usage = body.get("usage") or {}
                        self.stats.add(
                            prompt_tokens=int(usage.get("prompt_tokens") or 0),
                            completion_tokens=int(usage.get("completion_tokens") or 0),
                        )
                        return body
                elif r.status_code == 429 or r.status_code >= 500:
                    last = f"HTTP {r.status_code}: {r.text[:200]}"
                    retry_after = retry_after_seconds(r.headers.get("Retry-After"))
                else:
                    self.stats.add(failures=1)
                    raise APIError(
                        self._scrub(f"{url}: HTTP {r.status_code}: {r.text[:300]}"),
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
