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
``true``/``false`` is refused; other keys are ignored). Deadlines, retries, redirects and size
limits follow align's HTTP rules (``align.http_json``): ``timeout_s`` bounds each attempt from
connecting to the last byte; connection failures, timeouts and 429/502/503/504 are retried up to
``max_tries`` attempts with exponential backoff; a 500, other 4xx answers, redirects, non-JSON
bodies and oversize responses fail at once.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from align.errors import ConfigError, RewardError
from align.http_json import JsonPost, bearer_header
from align.reward_columns import ENVIRONMENTS_COLUMN
from reward_models.style_adapters import openrlhf_arguments

_MiB = 1024 * 1024
PROTOCOLS = ("align", "openrlhf")  # request bodies the client can send (see the docstring)


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
        post = JsonPost(self.url, self.timeout_s, self.max_tries, self.backoff_s,
                        self.max_response_bytes, self.headers, RewardError)
        headers = bearer_header(self.token_env, RewardError, f"POST {self.url}")
        return self._rewards_from(post(body, headers))

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

    def _rewards_from(self, answer: Any) -> list[Any]:
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
