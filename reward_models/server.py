"""The commands around a trained reward model: `align serve-rm` and `align eval-rm`.

`align serve-rm`: a trained reward model behind the JSON API that `HttpReward` calls.

``POST /`` or ``POST /score`` with ``{"prompts": [...], "completions": [...], ...}`` (an
optional ``completion_truncated`` list scores the completions marked true without EOS; other
columns are accepted and ignored) answers ``{"rewards": [...]}``, one number per sample.
``GET /health`` answers ``{"status": "ok", "model": ...}``. A malformed request gets 400 and
``{"error": "..."}``; a body over the size limit gets 413 without being read. The standard
library's threading server is used; one lock serialises the forward passes so concurrent
requests never oversubscribe the cores. There is no authentication: the server binds
127.0.0.1 unless told otherwise.

`align eval-rm MODEL DATA` (`evaluate_reward_model`): pairwise accuracy and reward margin.
It runs in this process (no Ray). The data is any preference source `align rm` trains on (a
file, a `save_to_disk` folder, a hub name) or `embedded` for the task's held-out pairs, under
the task settings of the model's own run (its `config.yaml`); rows are tokenised exactly as in
training (`align.data.tokenize_preference`).
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import torch

from align.config import EMBEDDED, TaskConfig, from_dict, read_yaml
from align.data import collate_preference, load_rows, tokenize_preference
from align.errors import AlignError, ConfigError
from align.tasks import load_task
from reward_models.protocol import TRUNCATED_COLUMN
from reward_models.reward_model import (
    load_reward_model,
    pair_means,
    pair_sums,
    score_batch,
    score_texts,
)

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
SCORE_PATHS = ("/", "/score")
EMBEDDED_HELD_OUT = "embedded:arithmetic(held-out)"


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
