"""POST a JSON body, read a JSON answer: the transport of align's HTTP clients (remote rewards,
the sandbox's ``http`` backend), with the standard library only (urllib).

The rules, the same for every client: connection failures, timeouts and the transient statuses
429, 502, 503 and 504 are retried with exponential backoff up to ``max_tries`` attempts in all;
a 500 (the server failed on this very request, and would again), other 4xx answers, redirects,
non-JSON bodies and oversize answers fail at once. Redirects are never followed: they would send
the body, and any ``Authorization`` header, to wherever the server points. ``timeout_s`` bounds
each attempt as a whole, from connecting to the last byte of the answer (its sockets are shut
down at the deadline), so a server that trickles bytes cannot hold a call; a call takes at most
``max_tries * timeout_s`` plus the backoff. Environment proxy settings (``http_proxy``,
``no_proxy``) apply, as for any urllib client.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

from align.errors import AlignError

_EXCERPT_BYTES = 200
_READ_CHUNK = 64 * 1024
RETRY_STATUS = (429, 502, 503, 504)  # busy or a gateway's hiccup: worth another try


class _RetryableError(Exception):
    """A failure worth another try (no connection, timeout, 429, 5xx)."""


@dataclass(frozen=True)
class JsonPost:
    """One endpoint and its rules; calling it POSTs a body and returns the parsed answer.

    ``error`` is the exception class raised on failure (``RewardError`` for rewards,
    ``SandboxError`` for the sandbox), so each caller's errors keep their kind.
    """

    url: str
    timeout_s: float
    max_tries: int
    backoff_s: float
    max_response_bytes: int
    headers: dict[str, str] = field(default_factory=dict)
    error: type[AlignError] = AlignError

    def __call__(self, body: bytes, headers: dict[str, str] | None = None) -> Any:
        """POST ``body`` (JSON bytes) with ``headers`` added; the answer, parsed.

        Raises:
            error: When every attempt failed, or the answer is a 4xx, 500, redirect, too large
                or not JSON; the message names the URL and the last failure.
        """
        last_error: Exception | None = None
        for attempt in range(1, self.max_tries + 1):
            try:
                return self._post_once(body, headers or {})
            except _RetryableError as err:
                last_error = err
                if attempt < self.max_tries:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        tries = "1 try" if self.max_tries == 1 else f"{self.max_tries} tries"
        raise self.error(f"POST {self.url} failed after {tries}: {last_error}") from last_error

    def _post_once(self, body: bytes, headers: dict[str, str]) -> Any:
        with _Deadline(self.timeout_s) as deadline:
            try:
                return self._exchange(body, headers, deadline)
            except (AlignError, _RetryableError, OSError, http.client.HTTPException):
                if deadline.expired:  # whatever broke, it broke because time was up
                    raise _RetryableError(
                        f"no answer within timeout_s={self.timeout_s}") from None
                raise

    def _exchange(self, body: bytes, headers: dict[str, str], deadline: _Deadline) -> Any:
        request = urllib.request.Request(
            self.url, data=body, method="POST",
            headers={"Content-Type": "application/json", "Accept": "application/json",
                     **self.headers, **headers})
        # A fresh opener per call reads the proxy environment now, not at first import.
        opener = urllib.request.build_opener(
            _NoRedirect(), _HTTPHandler(deadline), _HTTPSHandler(deadline))
        try:
            with opener.open(request, timeout=self.timeout_s) as response:
                payload = self._read_limited(response)
        except urllib.error.HTTPError as err:
            message = f"HTTP {err.code} {err.reason}: {_error_body(err)}"
            if err.code in RETRY_STATUS:
                raise _RetryableError(message) from err
            if 300 <= err.code < 400:
                where = err.headers.get("Location", "?") if err.headers else "?"
                raise self.error(
                    f"POST {self.url} answered HTTP {err.code}, a redirect to {where}; "
                    "redirects are not followed (they would carry the request and its "
                    "headers elsewhere): configure the final URL") from None
            raise self.error(f"POST {self.url} answered {message}") from err
        except urllib.error.URLError as err:
            raise _RetryableError(f"cannot reach the endpoint: {err.reason}") from err
        except TimeoutError as err:
            raise _RetryableError(f"no answer within timeout_s={self.timeout_s}") from err
        except (ConnectionError, http.client.HTTPException) as err:
            raise _RetryableError(f"connection broke: {type(err).__name__}: {err}") from err
        try:
            return json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise self.error(
                f"POST {self.url}: answer is not JSON ({err}): {excerpt(payload)}") from err

    def _read_limited(self, response: Any) -> bytes:
        limit = self.max_response_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise self.error(f"POST {self.url}: response of {int(declared)} bytes exceeds "
                             f"max_response_bytes={limit}")
        chunks: list[bytes] = []
        size = 0
        while size <= limit:  # reads at most limit + 1 bytes
            chunk = response.read(min(_READ_CHUNK, limit + 1 - size))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise self.error(f"POST {self.url}: response exceeds max_response_bytes={limit}")
        return b"".join(chunks)


def bearer_header(token_env: str | None, error: type[AlignError], where: str) -> dict[str, str]:
    """``{"Authorization": "Bearer <token>"}`` with the token read from the environment
    variable ``token_env`` names (kept out of configs, which runs copy); {} for None.

    Raises:
        error: When the variable is not set, the message starting with ``where``.
    """
    if token_env is None:
        return {}
    token = os.environ.get(token_env)
    if not token:
        raise error(f"{where}: token_env names {token_env}, which is not set in the environment")
    return {"Authorization": f"Bearer {token}"}


def excerpt(data: bytes) -> str:
    """The first bytes of a body, as a quoted string, for messages."""
    text = data[:_EXCERPT_BYTES].decode("utf-8", errors="replace")
    return repr(text + ("..." if len(data) > _EXCERPT_BYTES else ""))


def _error_body(err: urllib.error.HTTPError) -> str:
    """An excerpt of an error answer's body; a body that cannot be read is no new error."""
    try:
        return excerpt(err.read(_EXCERPT_BYTES) if err.fp else b"")
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
