"""The commands around a trained reward model: `align serve-rm` and `align eval-rm`.

`align serve-rm`: a trained reward model behind the JSON API that `HttpReward` calls.

``POST /`` or ``POST /score`` with ``{"prompts": [...], "completions": [...], ...}`` (an
optional ``completion_truncated`` list scores the completions marked true without EOS; an
optional ``prompt_messages`` list, as the PPO trainer sends it, scores each sample whose entry
holds its prompt's messages as training laid it out, with the model's chat template; other
columns are accepted and ignored) answers ``{"rewards": [...]}``, one number per sample.
``POST /get_reward`` speaks OpenRLHF's remote reward-model protocol, so an OpenRLHF trainer
(``--remote_rm_url http://host:port/get_reward``) or a spec ``openrlhf:http://host:port/get_reward``
can use the server: ``{"query": [...], "prompts": [...]}`` (``labels`` and other keys are
ignored), where each query is its prompt followed by the completion, as text, answers
``{"rewards": [...], "scores": [...]}`` (the same numbers twice, as OpenRLHF's own server
does). Pad tokens around a query and the EOS tokens that end it are dropped (OpenRLHF decodes
padded sequences with their special tokens); a query that starts with its prompt is scored as
that (prompt, completion) pair, exactly as ``/score`` scores it, any other (or one without a
prompt) as a completion of an empty prompt; the completion is scored as ended (EOS appended),
as OpenRLHF's server does.
``GET /health`` answers ``{"status": "ok", "model": <the folder's name>}``.

The API is for programs, not web pages, and refuses what only a browser would send:
  - a request with an ``Origin`` header (any page's script) gets 403, and so does one whose
    ``Host`` is not a loopback name while the server listens on loopback (DNS rebinding);
  - a POST must say ``Content-Type: application/json`` (415 otherwise), which no page can send
    to another origin without a CORS preflight this server never grants;
  - with a token (``--token``, or the ``ALIGN_SERVE_RM_TOKEN`` environment variable), every
    request needs ``Authorization: Bearer <token>`` (401 otherwise).

Limits: a body over ``max_body_bytes`` gets 413 without being read, more than ``max_samples``
samples 413, a malformed request (bad ``Content-Length``, JSON, nesting or sample shape) 400
with ``{"error": "..."}``. A 500 says only that scoring failed; the traceback goes to the
server's log. At most ``max_connections`` requests are handled at once (one thread each); more
wait in a listen backlog of 256. Forward passes take turns a batch at a time, in arrival order,
so a small request waits for at most one batch of a large one.

`align eval-rm MODEL DATA` (`evaluate_reward_model`): pairwise accuracy and reward margin.
It runs in this process (no Ray). The data is any preference source `align rm` trains on (a
file, a `save_to_disk` folder, a hub name) or `embedded` for the task's held-out pairs, under
the task settings of the model's own run (its `config.yaml`); rows are tokenised exactly as in
training (`align.data.tokenize_preference`).
"""

from __future__ import annotations

import collections
import hmac
import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from align.config import EMBEDDED, TaskConfig, from_dict, read_yaml
from align.data import collate_preference, load_rows, tokenize_preference
from align.errors import AlignError, ConfigError
from align.reward_columns import PROMPT_MESSAGES_COLUMN
from align.tasks import load_task
from reward_models.protocol import TRUNCATED_COLUMN
from reward_models.reward_model import (
    load_reward_model,
    pair_means,
    pair_sums,
    score_batch,
    score_texts,
)

logger = logging.getLogger(__name__)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_SAMPLES = 1024
DEFAULT_MAX_CONNECTIONS = 64
TOKEN_ENV = "ALIGN_SERVE_RM_TOKEN"
SCORE_PATHS = ("/", "/score")
OPENRLHF_PATHS = ("/get_reward",)  # where OpenRLHF's examples post to a remote reward model
LOOPBACK = ("127.0.0.1", "localhost", "::1")
EMBEDDED_HELD_OUT = "embedded:arithmetic(held-out)"


class RewardModelServer(ThreadingHTTPServer):
    """An HTTP server holding one loaded reward model.

    Args:
        address: (host, port); port 0 picks a free one (see `url`).
        model_dir: the reward-model folder to load.
        batch_size: sequences per forward pass.
        max_body_bytes: largest request body accepted.
        dtype: model dtype (`auto`: bf16 on a GPU that supports it, else fp32).
        token: when set, requests need `Authorization: Bearer <token>`.
        max_samples: most samples one request may hold.
        max_connections: most requests handled at once.
    """

    daemon_threads = True  # in-flight requests never keep the process alive at Ctrl-C
    request_queue_size = 256  # listen backlog: socketserver's 5 reset bursts of connections

    def __init__(self, address: tuple[str, int], model_dir: str | Path, batch_size: int = 64,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, dtype: str = "auto",
                 token: str | None = None, max_samples: int = DEFAULT_MAX_SAMPLES,
                 max_connections: int = DEFAULT_MAX_CONNECTIONS) -> None:
        self.model, self.tokenizer = load_reward_model(model_dir, dtype)
        self.model_name = Path(model_dir).resolve().name  # never the absolute path
        self.batch_size, self.max_body_bytes = batch_size, max_body_bytes
        self.token, self.max_samples = token or None, max_samples
        self.lock = FairLock()
        self.slots = threading.BoundedSemaphore(max_connections)
        super().__init__(address, _Handler)
        host = self.server_address[0]
        self.loopback_only = host in LOOPBACK or host.startswith("127.")

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/score"

    def process_request(self, request: Any, client_address: Any) -> None:
        # Bounded threads: wait for a free slot; a connection that finds none in 5 s is
        # closed (the client retries), and the rest wait in the kernel's backlog meanwhile.
        if not self.slots.acquire(timeout=5):
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()

    def score(self, body: dict[str, Any]) -> list[float]:
        """Validate a request body and score it.

        Raises:
            ValueError: the body is not `{prompts: [...], completions: [...]}` of equal
                lengths, of strings or chat message lists.
            TooManySamples: more than `max_samples` samples.
            AlignError: a sample cannot be encoded (e.g. a prompt longer than the model allows).
        """
        prompts, completions = body.get("prompts"), body.get("completions")
        for key, value in (("prompts", prompts), ("completions", completions)):
            if not isinstance(value, list):
                raise ValueError(f"'{key}' must be a list, got {type(value).__name__}")
        if len(prompts) != len(completions):
            raise ValueError(f"got {len(prompts)} prompts but {len(completions)} completions")
        if len(prompts) > self.max_samples:
            raise TooManySamples(f"{len(prompts)} samples exceed the limit of "
                                 f"{self.max_samples} per request; split the batch")
        for index, sample in enumerate(zip(prompts, completions)):
            for what, value in zip(("prompt", "completion"), sample):
                _check_text(value, what, index)
        truncated = body.get(TRUNCATED_COLUMN)  # optional; sent by HttpReward from PPO
        return score_texts(self.model, self.tokenizer, prompts, completions, self.batch_size,
                           truncated=truncated, turns=self.lock,
                           prompt_messages=body.get(PROMPT_MESSAGES_COLUMN))


    def score_queries(self, body: dict[str, Any]) -> list[float]:
        """Score an OpenRLHF request (see the module docstring).

        Raises:
            ValueError: `query` is not a list of strings, or `prompts` is given but is not a
                list of as many strings.
            TooManySamples: more than `max_samples` queries.
        """
        queries, prompts = body.get("query"), body.get("prompts")
        if not isinstance(queries, list) or not all(isinstance(q, str) for q in queries):
            raise ValueError("'query' must be a list of strings (prompt + completion each)")
        if prompts is None:
            prompts = [""] * len(queries)
        if (not isinstance(prompts, list) or len(prompts) != len(queries)
                or not all(isinstance(p, str) for p in prompts)):
            raise ValueError(f"'prompts' must be a list of {len(queries)} strings, one per "
                             "query (or left out)")
        if len(queries) > self.max_samples:
            raise TooManySamples(f"{len(queries)} samples exceed the limit of "
                                 f"{self.max_samples} per request; split the batch")
        pairs = [split_query(self.tokenizer, q, p) for q, p in zip(queries, prompts)]
        return score_texts(self.model, self.tokenizer, [p for p, _ in pairs],
                           [c for _, c in pairs], self.batch_size, turns=self.lock)


def split_query(tokenizer: Any, query: str, prompt: str) -> tuple[str, str]:
    """(prompt, completion) of an OpenRLHF query: padding and closing EOS tokens dropped, the
    prompt split off where the query starts with it (else an empty prompt)."""
    pad, eos = tokenizer.pad_token, tokenizer.eos_token
    while pad and query.startswith(pad):
        query = query[len(pad):]
    while end := next((t for t in (pad, eos) if t and query.endswith(t)), None):
        query = query[:-len(end)]
    if prompt and query.startswith(prompt):
        return prompt, query[len(prompt):]
    return "", query


class TooManySamples(ValueError):
    """A request holds more samples than the server's `max_samples` (answered with 413)."""


class FairLock:
    """A lock granted in arrival order (`threading.Lock` may hand it straight back to the
    thread that just released it, starving the others)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: collections.deque[object] = collections.deque()

    def __enter__(self) -> None:
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            self._cond.wait_for(lambda: self._queue[0] is ticket)

    def __exit__(self, *exc: object) -> None:
        with self._cond:
            self._queue.popleft()
            self._cond.notify_all()


def _check_text(value: Any, what: str, index: int) -> None:
    """A prompt or completion is a string or a list of `{role, content}` string messages."""
    if isinstance(value, str):
        return
    if isinstance(value, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str) for m in value):
        return
    raise ValueError(f"sample {index}: the {what} must be a string or a list of "
                     "{\"role\": str, \"content\": str} messages")


class _Handler(BaseHTTPRequestHandler):
    server: RewardModelServer
    timeout = 60  # seconds a client may stall mid-request before its connection is dropped

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
        pass  # one line per request would drown the URL the user needs

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        if self._refused():
            return
        if self.path == "/health":
            self._reply(200, {"status": "ok", "model": self.server.model_name})
        else:
            self._reply(404, {"error": f"no such path {self.path!r}; POST to /score"})

    def do_POST(self) -> None:  # noqa: N802
        if self.path not in SCORE_PATHS + OPENRLHF_PATHS:
            self._reply(404, {"error": f"no such path {self.path!r}; POST to /score (or "
                                       "/get_reward for OpenRLHF's protocol)"}, close=True)
            return
        if self._refused():
            return
        kind = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind != "application/json":
            self._reply(415, {"error": "the body must be JSON sent with Content-Type: "
                                       "application/json"}, close=True)
            return
        length = self._content_length()
        if length is None:
            return
        try:
            body = json.loads(self.rfile.read(length))
            if not isinstance(body, dict):
                raise ValueError(f"the body must be a JSON object, got {type(body).__name__}")
            openrlhf = self.path in OPENRLHF_PATHS
            rewards = (self.server.score_queries(body) if openrlhf
                       else self.server.score(body))
        except TooManySamples as err:
            self._reply(413, {"error": str(err)})
            return
        except RecursionError:
            self._reply(400, {"error": "the JSON is nested too deeply"})
            return
        except (ValueError, AlignError) as err:  # JSONDecodeError is a ValueError
            self._reply(400, {"error": str(err)})
            return
        except Exception:  # noqa: BLE001 - logged here; the client learns no internals
            logger.exception("scoring a request failed")
            self._reply(500, {"error": "scoring failed on the server (its log has the cause)"})
            return
        self._reply(200, {"rewards": rewards, "scores": rewards} if openrlhf
                    else {"rewards": rewards})

    def _refused(self) -> bool:
        """Answer and return True when the request comes from a web page or lacks the token."""
        if self.headers.get("Origin") is not None:
            self._reply(403, {"error": "requests from web pages (an Origin header) are "
                                       "refused"}, close=True)
            return True
        host = _hostname(self.headers.get("Host", ""))
        if self.server.loopback_only and host not in LOOPBACK and not host.startswith("127."):
            self._reply(403, {"error": f"Host {host!r} is not this server's address"},
                        close=True)
            return True
        token = self.server.token
        if token is not None:
            given = self.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                self._reply(401, {"error": "a valid 'Authorization: Bearer <token>' header is "
                                           "required"}, close=True, auth=True)
                return True
        return False

    def _content_length(self) -> int | None:
        """The declared body size, or None once a 400/413 is sent."""
        text = self.headers.get("Content-Length", "")
        if not (text.isascii() and text.isdigit()):
            self._reply(400, {"error": "a Content-Length header of ASCII digits is required"},
                        close=True)
            return None
        limit = self.server.max_body_bytes
        if len(text) > len(str(limit)) or int(text) > limit:
            self._reply(413, {"error": f"request body of {text[:30]} bytes exceeds the limit "
                                       f"of {limit}"}, close=True)
            return None
        return int(text)

    def _reply(self, status: int, payload: dict[str, Any], close: bool = False,
               auth: bool = False) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if auth:
            self.send_header("WWW-Authenticate", "Bearer")
        if close:  # the unread body must not be parsed as the next request
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)


def _hostname(host: str) -> str:
    """`example.com:8000` -> `example.com`; `[::1]:8000` -> `::1`."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


# ------------------------------------------------------------------------------- eval-rm


def evaluate_reward_model(model_dir: str | Path, data: str, batch_size: int = 64,
                          max_length: int | None = None, split: str = "train",
                          dtype: str = "auto") -> dict[str, Any]:
    """Score every pair of `data` with the model in `model_dir`.

    Args:
        model_dir: a reward-model folder (see `reward_models.reward_model.load_reward_model`).
        data: a preference source, or `embedded` for the task's held-out pairs under the task
            settings the model was trained with (see `run_task_settings`).
        batch_size: pairs per forward pass (2 x batch_size sequences).
        max_length: longest prompt + completion; default the model's max_position_embeddings.
        split: the split to read from a folder or hub dataset.
        dtype: model dtype.

    Returns:
        `{model, data, pairs, accuracy, margin, mean_reward, min_reward, max_reward,
        chosen_reward, rejected_reward}`.

    Raises:
        ModelError: the folder holds no reward model.
        DataError: the data is missing or malformed (file, row and column named).
        ConfigError: `embedded` for a model whose run's task settings cannot be read.
    """
    if data == EMBEDDED:
        rows = load_task(run_task_settings(model_dir)).held_out_preference_rows()
        source = EMBEDDED_HELD_OUT
    else:
        rows, source = load_rows(data, split), data  # before the model: a typo fails fast
    model, tokenizer = load_reward_model(model_dir, dtype)
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None) or 1024
    examples = tokenize_preference(rows, tokenizer, max_length, source)
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(examples), batch_size):
            batch = collate_preference(examples[start:start + batch_size],
                                       tokenizer.pad_token_id)
            c, r = score_batch(model, batch).chunk(2)
            chosen.append(c)
            rejected.append(r)
    sums = pair_sums(torch.cat(chosen), torch.cat(rejected))
    return {"model": str(model_dir), "data": source, "pairs": len(examples), **pair_means(sums)}


def run_task_settings(model_dir: str | Path) -> TaskConfig:
    """The `task` section of the run that wrote `model_dir` (its `config.yaml` beside final/).

    The held-out pairs depend on it (`task.seed`, `task.num_eval`): with other settings they
    could be pairs the model trained on.
    """
    config = Path(model_dir).parent / "config.yaml"
    if not config.is_file():
        raise ConfigError(f"eval-rm {model_dir} embedded: the held-out pairs depend on the task "
                          f"settings the model was trained with, read from {config}, which "
                          "does not exist; evaluate on a preference file instead")
    return from_dict(TaskConfig, read_yaml(config).get("task") or {}, prefix="task.")


def format_report(report: dict[str, Any]) -> str:
    """The figures of `evaluate_reward_model` as a small aligned table."""
    rows = [("pairs", str(report["pairs"])),
            ("accuracy", f"{100 * report['accuracy']:.2f}%"),
            ("mean margin", f"{report['margin']:.4f}"),
            ("mean chosen reward", f"{report['chosen_reward']:.4f}"),
            ("mean rejected reward", f"{report['rejected_reward']:.4f}"),
            ("min / max reward", f"{report['min_reward']:.4f} / {report['max_reward']:.4f}")]
    width = max(len(name) for name, _ in rows)
    lines = [f"reward model {report['model']} on {report['data']}"]
    lines += [f"  {name:<{width}}  {value}" for name, value in rows]
    return "\n".join(lines)
