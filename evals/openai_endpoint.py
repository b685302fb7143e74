"""A small client for OpenAI-compatible HTTP endpoints (``vllm serve``, ``python -m vllm.entrypoints.openai.api_server``,
or any hosted API), shared by the judge (chat completions) and the unedited model's answers (completions).

The key is read from an environment variable, sent as a Bearer token and never shown (not in ``repr``, not in
errors). Request starts are rate-limited across threads; 408/409/429 and 5xx answers and connection errors are
retried with exponential back-off; anything else, or an endpoint still failing after the retries, raises one
``EndpointUnavailable`` naming the URL and the model.
"""

from __future__ import annotations

import json
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

Item = TypeVar("Item")
RETRIED_STATUS = (408, 409, 429)  # and every 5xx


class EndpointUnavailable(RuntimeError):
    """The endpoint could not be reached, kept failing, or answered something unusable (URL named, never the key)."""


class RateLimiter:
    """At most ``per_second`` request starts per second across threads (0 = unlimited)."""

    def __init__(self, per_second: float):
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(max(0.0, start - now))


class OpenAIEndpoint:
    """POSTs JSON to ``<base_url>/<route>`` with the key, rate limit, retries and one clear error.

    ``role`` ("judge", "generation") starts every error message, so a user knows which endpoint of a trial failed.
    """

    def __init__(self, base_url: str, model: str, role: str, api_key_env: str | None = "OPENAI_API_KEY",
                 requests_per_second: float = 0.0, max_retries: int = 4, timeout_s: float = 60.0,
                 concurrency: int = 8, error: type[EndpointUnavailable] = EndpointUnavailable):
        self.base_url = base_url.rstrip("/")
        self.model, self.role, self.error = model, role, error
        self._api_key = os.environ.get(api_key_env, "") if api_key_env else ""
        self.max_retries, self.timeout_s, self.concurrency = max_retries, timeout_s, concurrency
        self._limiter = RateLimiter(requests_per_second)

    def __repr__(self) -> str:  # never show the key
        return f"OpenAIEndpoint({self.base_url!r}, model={self.model!r}, role={self.role!r})"

    def post(self, route: str, body: dict, read: Callable[[dict], str], what: str) -> str:
        """``read(payload)`` of the endpoint's JSON answer to ``body``; ``what`` names the expected answer."""
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        url = f"{self.base_url}/{route}"
        data = json.dumps({"model": self.model, **body}).encode()
        last_error = ""
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                    payload = json.loads(response.read())
                return read(payload)
            except urllib.error.HTTPError as err:
                detail = err.read()[:300].decode(errors="replace")
                last_error = f"HTTP {err.code}: {detail}"
                if err.code not in RETRIED_STATUS and err.code < 500:
                    raise self.error(f"{self.role} endpoint {url} refused the request ({last_error})") from None
            except (urllib.error.URLError, OSError, TimeoutError) as err:
                last_error = f"{type(err).__name__}: {getattr(err, 'reason', err)}"
            except (KeyError, IndexError, TypeError, ValueError) as err:
                raise self.error(f"{self.role} endpoint {url} answered something that is not {what} "
                                 f"({type(err).__name__}: {err})") from None
            if attempt < self.max_retries:
                time.sleep(min(0.5 * 2 ** attempt, 8.0))
        raise self.error(f"{self.role} endpoint {url} (model {self.model!r}) is not answering after "
                         f"{self.max_retries + 1} attempts: {last_error}")

    def map(self, request: Callable[[Item], str], items: list[Item]) -> list[str]:
        """``request`` over ``items`` on ``concurrency`` threads, results in input order."""
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(request, items))
