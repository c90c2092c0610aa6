"""HttpReward: a reward served by a JSON API, with the standard library only (urllib).

Protocols (``protocol``):

- ``align`` (the default, what ``align serve-rm`` answers at ``/score``): ``POST <url>`` with
  body ``{"prompts": [...], "completions": [...], <column>: [...]}`` (every column of the
  batch, as JSON).
- ``openrlhf`` (OpenRLHF's remote reward model, what its ``serve_rm`` and ``align serve-rm``
  answer at ``/get_reward``): body ``{"query": [...], "prompts": [...], "labels": [...]}``,
  where a query is the prompt followed by the completion, as text, and the labels come from
  the column ``label``, else ``answer``, else ``ground_truth`` (None where none exists). The
  query is text, so prompts and completions must be strings (a rendered chat prompt, not a
  message list).

Either is answered by ``{"rewards": [...]}``, one number or null per sample (a JSON
``true``/``false`` is refused; other keys are ignored). Connection failures, timeouts and the
transient statuses 429, 502, 503 and 504 are retried with exponential backoff up to
``max_tries`` attempts in all; a 500 (the server failed on this very batch, and would
again), other 4xx answers, redirects, non-JSON bodies and oversize responses fail at once.
Redirects are never followed: they would send the batch, and any ``Authorization`` header, to
wherever the server points.
``timeout_s`` bounds each attempt as a whole, from connecting to the last byte of the answer
(its sockets are shut down at the deadline), so a server that trickles bytes cannot hold a call;
a call takes at most ``max_tries * timeout_s`` plus the backoff. Environment proxy settings
(``http_proxy``, ``no_proxy``) apply, as for any urllib client.
"""

from __future__ import annotations

import http.client
import json
import math
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from align.errors import ConfigError, RewardError
from align.reward_columns import ENVIRONMENTS_COLUMN
from reward_models.style_adapters import openrlhf_arguments

_MiB = 1024 * 1024
_EXCERPT_BYTES = 200
_READ_CHUNK = 64 * 1024
_RETRY_STATUS = (429, 502, 503, 504)  # busy or a gateway's hiccup: worth another try
PROTOCOLS = ("align", "openrlhf")  # request bodies the client can send (see the docstring)


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
    timeout_s: float = 30.0  # per attempt, from connecting to the last byte of the answer
    max_tries: int = 3  # attempts in all (1 = no retry)
    backoff_s: float = 0.5  # wait before the 2nd attempt; doubles for each further one
    max_response_bytes: int = 10 * _MiB  # a longer answer is an error, not read on
    headers: dict[str, str] = field(default_factory=dict)  # extra request headers (e.g. auth)
    token_env: str | None = None  # environment variable holding a bearer token (kept out of
    # the config, which every run copies into its output_dir)
    protocol: str = "align"  # request body: align's, or openrlhf's {query, prompts, labels}

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"reward {self.url!r}: URL must start with http:// or https://")
        self._check_number("timeout_s", self.timeout_s, minimum=0.0, inclusive=False)
        self._check_number("max_tries", self.max_tries, minimum=1, integer=True)
        self._check_number("backoff_s", self.backoff_s, minimum=0.0)
        self._check_number("max_response_bytes", self.max_response_bytes, minimum=1, integer=True)
        if not isinstance(self.headers, dict):
            raise ConfigError(f"reward {self.url!r}: headers must be a mapping")
        if self.token_env is not None and not (isinstance(self.token_env, str)
                                               and self.token_env):
            raise ConfigError(f"reward {self.url!r}: token_env must name an environment "
                              f"variable, got {self.token_env!r}")
        if self.protocol not in PROTOCOLS:
            raise ConfigError(f"reward {self.url!r}: protocol must be one of "
                              f"{', '.join(PROTOCOLS)}, got {self.protocol!r}")

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
        body = _encode(self._body(prompts, completions, columns))
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

    def _body(self, prompts: list[Any], completions: list[Any],
              columns: dict[str, Any]) -> dict[str, Any]:
        if self.protocol == "align":  # an episode's environment instances stay here
            columns = {k: v for k, v in columns.items() if k != ENVIRONMENTS_COLUMN}
            return {"prompts": list(prompts), "completions": list(completions), **columns}
        for index, sample in enumerate(zip(prompts, completions)):
            for what, value in zip(("prompt", "completion"), sample):
                if not isinstance(value, str):
                    raise RewardError(
                        f"sample {index}: the OpenRLHF protocol sends each query as text "
                        f"(prompt + completion), but the {what} is a "
                        f"{type(value).__name__}; use string prompts (the chat template "
                        "already applied) or the align protocol, which takes message lists")
        queries, prompts, labels = openrlhf_arguments(prompts, completions, columns)
        return {"query": queries, "prompts": prompts, "labels": labels}

    def _post_once(self, body: bytes) -> list[Any]:
        with _Deadline(self.timeout_s) as deadline:
            try:
                return self._exchange(body, deadline)
            except (RewardError, _RetryableError, OSError, http.client.HTTPException):
                if deadline.expired:  # whatever broke, it broke because time was up
                    raise _RetryableError(
                        f"no answer within timeout_s={self.timeout_s}") from None
                raise

    def _exchange(self, body: bytes, deadline: _Deadline) -> list[Any]:
        request = urllib.request.Request(
            self.url,
            data=body,
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Accept": "application/json",
                **self.headers,
                **self._token_header(),
            },
        )
        # A fresh opener per call reads the proxy environment now, not at first import.
        opener = urllib.request.build_opener(
            _NoRedirect(), _HTTPHandler(deadline), _HTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                payload = self._read_limited(response)
        except urllib.error.HTTPError as err:
            message = f"HTTP {err.code} {err.reason}: {_error_body(err)}"
            if err.code in _RETRY_STATUS:
                raise _RetryableError(message) from err
            if 300 <= err.code < 400:
                where = err.headers.get("Location", "?") if err.headers else "?"
                raise RewardError(
                    f"POST {self.url} answered HTTP {err.code}, a redirect to {where}; "
                    "redirects are not followed (they would carry the batch and its "
                    "headers elsewhere): put the final URL in the spec") from None
            raise RewardError(f"POST {self.url} answered {message}") from err
        except urllib.error.URLError as err:
            raise _RetryableError(f"cannot reach the endpoint: {err.reason}") from err
        except TimeoutError as err:
            raise _RetryableError(f"no answer within timeout_s={self.timeout_s}") from err
        except (ConnectionError, http.client.HTTPException) as err:
            raise _RetryableError(f"connection broke: {type(err).__name__}: {err}") from err
        return self._rewards_from(payload)

    def _token_header(self) -> dict[str, str]:
        if self.token_env is None:
            return {}
        token = os.environ.get(self.token_env)
        if not token:
            raise RewardError(f"POST {self.url}: token_env names {self.token_env}, which is "
                              "not set in the environment")
        return {"Authorization": f"Bearer {token}"}

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
        for index, value in enumerate(answer["rewards"]):
            if isinstance(value, bool):  # JSON true/false is not a score
                raise RewardError(f"POST {self.url}: rewards[{index}] is {json.dumps(value)}; "
                                  "the API takes a number or null per sample")
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


def _error_body(err: urllib.error.HTTPError) -> str:
    """An excerpt of an error answer's body; a body that cannot be read is no new error."""
    try:
        return _excerpt(err.read(_EXCERPT_BYTES) if err.fp else b"")
    except (OSError, http.client.HTTPException, ValueError):
        return "(body unreadable)"


class _Deadline:
    """Shuts down the sockets of one attempt when its time is up.

    A socket timeout bounds only each read, so a server sending a byte a second could hold a
    call for ever; shutting the socket down from a timer ends any read in progress at once.
    """

    def __init__(self, seconds: float) -> None:
        self.expired = False
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self._expire)
        self._timer.daemon = True

    def __enter__(self) -> _Deadline:
        self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._timer.cancel()

    def track(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)
            if self.expired:
                _shut(sock)

    def _expire(self) -> None:
        with self._lock:
            self.expired = True
            for sock in self._sockets:
                _shut(sock)

    def connection(self, base: type[http.client.HTTPConnection]) -> type:
        deadline = self

        class Connection(base):  # type: ignore[misc, valid-type]
            def connect(self) -> None:
                super().connect()
                deadline.track(self.sock)

        return Connection


def _shut(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


class _HTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def http_open(self, req: urllib.request.Request) -> Any:
        return self.do_open(self.deadline.connection(http.client.HTTPConnection), req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, deadline: _Deadline) -> None:
        super().__init__()
        self.deadline = deadline

    def https_open(self, req: urllib.request.Request) -> Any:
        kwargs: dict[str, Any] = {"context": self._context}
        if hasattr(self, "_check_hostname"):  # Python < 3.12
            kwargs["check_hostname"] = self._check_hostname
        return self.do_open(self.deadline.connection(http.client.HTTPSConnection), req,
                            **kwargs)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Refuses every redirect: urllib then raises the 3xx as an HTTPError."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None
