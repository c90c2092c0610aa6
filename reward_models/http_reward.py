"""HttpReward: a reward served by a JSON API, with the standard library only (urllib).

Protocol: ``POST <url>`` with body ``{"prompts": [...], "completions": [...], <column>: [...]}``
(every column of the batch, as JSON) answered by ``{"rewards": [...]}``, one number or null per
sample. Connection failures, timeouts, HTTP 429 and 5xx are retried with exponential backoff up
to ``max_tries`` attempts in all; other 4xx answers, non-JSON bodies and oversize responses fail
at once. Environment proxy settings (``http_proxy``, ``no_proxy``) apply, as for any urllib
client.
"""

from __future__ import annotations

import http.client
import json
import math
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from align.errors import ConfigError, RewardError

_MiB = 1024 * 1024
_EXCERPT_BYTES = 200
_READ_CHUNK = 64 * 1024


class _RetryableError(Exception):
    """A failure worth another try (no connection, timeout, 429, 5xx)."""


@dataclass
class HttpReward:
    """Client for a remote reward endpoint; callable with the Reward protocol signature.

    Options come from a spec's ``kwargs``: ``{spec: https://rm/score, kwargs: {timeout_s: 5}}``.

    Raises:
        ConfigError: When the URL is not http(s) or an option is out of range.
    """

    url: str  # http:// or https:// endpoint that takes the batch and returns {"rewards": [...]}
    timeout_s: float = 30.0  # per attempt: to connect, and between bytes of the answer
    max_tries: int = 3  # attempts in all (1 = no retry)
    backoff_s: float = 0.5  # wait before the 2nd attempt; doubles for each further one
    max_response_bytes: int = 10 * _MiB  # a longer answer is an error, not read on
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers (e.g. auth)

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"reward {self.url!r}: URL must start with http:// or https://")
        self._check_number("timeout_s", self.timeout_s, minimum=0.0, inclusive=False)
        self._check_number("max_tries", self.max_tries, minimum=1, integer=True)
        self._check_number("backoff_s", self.backoff_s, minimum=0.0)
        self._check_number("max_response_bytes", self.max_response_bytes, minimum=1, integer=True)
        if not isinstance(self.headers, dict):
            raise ConfigError(f"reward {self.url!r}: headers must be a mapping")

    def _check_number(
        self, key: str, value: Any, minimum: float, integer: bool = False, inclusive: bool = True
    ) -> None:
        kind = int if integer else (int, float)
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if ok and math.isfinite(value) and (value >= minimum if inclusive else value > minimum):
            return
        bound = f">= {minimum}" if inclusive else f"> {minimum}"
        what = "an integer" if integer else "a number"
        raise ConfigError(f"reward {self.url!r}: {key} must be {what} {bound}, got {value!r}")

    def __call__(self, prompts: list[str], completions: list[str], **columns: Any) -> list[Any]:
        """POST the batch and return the endpoint's ``rewards`` list (validated by the caller).

        Raises:
            RewardError: When a column is not JSON-serialisable, every attempt failed, or the
                answer is a 4xx, too large, not JSON, or has no ``rewards`` list.
        """
        body = _encode({"prompts": list(prompts), "completions": list(completions), **columns})
        last_error: Exception | None = None
        for attempt in range(1, self.max_tries + 1):
            try:
                return self._post_once(body)
            except _RetryableError as err:
                last_error = err
                if attempt < self.max_tries:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        tries = "1 try" if self.max_tries == 1 else f"{self.max_tries} tries"
        raise RewardError(f"POST {self.url} failed after {tries}: {last_error}") from last_error

    def _post_once(self, body: bytes) -> list[Any]:
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                **self.headers,
            },
        )
        # A fresh opener per call reads the proxy environment now, not at first import.
        opener = urllib.request.build_opener()
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                payload = self._read_limited(response)
        except urllib.error.HTTPError as err:
            detail = _excerpt(err.read(_EXCERPT_BYTES) if err.fp else b"")
            message = f"HTTP {err.code} {err.reason}: {detail}"
            if err.code == 429 or err.code >= 500:
                raise _RetryableError(message) from err
            raise RewardError(f"POST {self.url} answered {message}") from err
        except urllib.error.URLError as err:
            raise _RetryableError(f"cannot reach the endpoint: {err.reason}") from err
        except TimeoutError as err:
            raise _RetryableError(f"no answer within timeout_s={self.timeout_s}") from err
        except (ConnectionError, http.client.HTTPException) as err:
            raise _RetryableError(f"connection broke: {type(err).__name__}: {err}") from err
        return self._rewards_from(payload)

    def _read_limited(self, response: Any) -> bytes:
        limit = self.max_response_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise RewardError(
                f"POST {self.url}: response of {int(declared)} bytes exceeds "
                f"max_response_bytes={limit}"
            )
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # reads at most limit + 1 bytes
            chunk = response.read(min(_READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise RewardError(f"POST {self.url}: response exceeds max_response_bytes={limit}")
        return b"".join(chunks)

    def _rewards_from(self, payload: bytes) -> list[Any]:
        try:
            answer = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise RewardError(
                f"POST {self.url}: answer is not JSON ({err}): {_excerpt(payload)}"
            ) from err
        if not isinstance(answer, dict) or not isinstance(answer.get("rewards"), list):
            got = f"keys {sorted(answer)}" if isinstance(answer, dict) else type(answer).__name__
            raise RewardError(f'POST {self.url}: answer must be {{"rewards": [...]}}, got {got}')
        return answer["rewards"]


def _encode(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, allow_nan=False).encode()
    except (TypeError, ValueError):
        for key, value in body.items():  # name the culprit
            try:
                json.dumps(value, allow_nan=False)
            except (TypeError, ValueError) as err:
                raise RewardError(f"column {key!r} cannot be sent as JSON: {err}") from err
        raise


def _excerpt(data: bytes) -> str:
    text = data[:_EXCERPT_BYTES].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(data) > _EXCERPT_BYTES else ""))
