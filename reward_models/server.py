"""`align serve-rm`: a trained reward model behind the JSON API that `HttpReward` calls.

``POST /`` or ``POST /score`` with ``{"prompts": [...], "completions": [...], ...}`` (an
optional ``completion_truncated`` list scores the completions marked true without EOS; other
columns are accepted and ignored) answers ``{"rewards": [...]}``, one number per sample.
``GET /health`` answers ``{"status": "ok", "model": ...}``. A malformed request gets 400 and
``{"error": "..."}``; a body over the size limit gets 413 without being read. The standard
library's threading server is used; one lock serialises the forward passes so concurrent
requests never oversubscribe the cores. There is no authentication: the server binds
127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from align.errors import AlignError
from reward_models.protocol import TRUNCATED_COLUMN
from reward_models.scorer import load_reward_model, score_texts

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
SCORE_PATHS = ("/", "/score")


class RewardModelServer(ThreadingHTTPServer):
    """An HTTP server holding one loaded reward model.

    Args:
        address: (host, port); port 0 picks a free one (see `url`).
        model_dir: the reward-model folder to load.
        batch_size: sequences per forward pass.
        max_body_bytes: largest request body accepted.
        dtype: model dtype (`auto`: bf16 on a GPU that supports it, else fp32).
    """

    daemon_threads = True  # in-flight requests never keep the process alive at Ctrl-C

    def __init__(self, address: tuple[str, int], model_dir: str | Path, batch_size: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, dtype: str = "auto") -> None:
        self.model, self.tokenizer = load_reward_model(model_dir, dtype)
        self.model_name = str(model_dir)
        self.batch_size, self.max_body_bytes = batch_size, max_body_bytes
        self.lock = threading.Lock()
        super().__init__(address, _Handler)

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"

    def score(self, body: dict[str, Any]) -> list[float]:
        """Validate a request body and score it.

        Raises:
            ValueError: the body is not `{prompts: [...], completions: [...]}` of equal lengths.
            AlignError: a sample cannot be encoded (e.g. a prompt longer than the model allows).
        """
        prompts, completions = body.get("prompts"), body.get("completions")
        for key, value in (("prompts", prompts), ("completions", completions)):
            if not isinstance(value, list):
                raise ValueError(f"'{key}' must be a list, got {type(value).__name__}")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        truncated = body.get(TRUNCATED_COLUMN)  # optional; sent by HttpReward from PPO
        with self.lock:
            return score_texts(self.model, self.tokenizer, prompts, completions,
                               self.batch_size, truncated=truncated)


class _Handler(BaseHTTPRequestHandler):
    server: RewardModelServer
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass  # one line per request would drown the URL the user needs

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self.path == "/health":
            self._reply(200, {"status": "ok", "model": self.server.model_name})
        else:
            self._reply(404, {"error": f"no such path {self.path!r}; POST to /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path not in SCORE_PATHS:
            self._reply(404, {"error": f"no such path {self.path!r}; POST to /score"})
            return
        length = self.headers.get("Content-Length", "")
        if not length.isdigit():
            self._reply(400, {"error": "a Content-Length header is required"}, close=True)
            return
        if int(length) > self.server.max_body_bytes:
            self._reply(413, {"error": f"request body of {length} bytes exceeds the limit of "
                                       f"{self.server.max_body_bytes}"}, close=True)
            return
        try:
            body = json.loads(self.rfile.read(int(length)))
            if not isinstance(body, dict):
                raise ValueError(f"the body must be a JSON object, got {type(body).__name__}")
            rewards = self.server.score(body)
        except (ValueError, AlignError) as err:  # JSONDecodeError is a ValueError
            self._reply(400, {"error": str(err)})
            return
        except Exception as err:  # noqa: BLE001 - report it to the client, keep serving
            self._reply(500, {"error": f"{type(err).__name__}: {err}"})
            return
        self._reply(200, {"rewards": rewards})

    def _reply(self, status: int, payload: dict[str, Any], close: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if close:  # the unread body must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
