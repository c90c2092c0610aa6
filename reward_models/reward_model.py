"""Trained reward models: scoring text with one, the same way everywhere, and a folder as a
reward (``load_reward("runs/arithmetic/rm/final")``).

Training (`align rm`), `align eval-rm`, `align serve-rm` and a reward-model folder used as a
reward all score through `score_batch` / `score_texts`, so one model gives one number for one
text wherever it runs. A (prompt, completion) pair is encoded as `align.data.preference`
encodes training pairs: prompt ids + completion ids + EOS for strings, the chat template for
message lists, no special tokens added. The PPO trainer hands rewards a conversational prompt
rendered (by the policy's template) and the decoded completion, with the prompt's messages in
the column `prompt_messages`; a reward model with a chat template scores such a sample as
training laid it out, the messages and the completion as an assistant turn rendered with its
own template (`as_trained`): a ChatML model is read at the `<|im_end|>\n` closing the turn, not
at an EOS appended to the text. A completion marked truncated (generation stopped at its token
budget, not at EOS; the PPO trainer passes the column `completion_truncated`) is scored as it
is, without the EOS or the template's closing of the turn, so the reward model sees that it
did not end. Rows are right-padded with an attention mask, and the score is read at each
sequence's last real token, even where the tokenizer's pad token is its EOS (`score_batch`).
`pair_sums` and `pair_means` turn chosen/rejected scores into the metrics TRL users know:
`accuracy`, `margin`, `mean_reward`, `min_reward`, `max_reward`.

As a reward, a folder holding ``config.json`` (a full model) or ``adapter_config.json`` (a
LoRA adapter) is scored by a ``RewardModelScorer``, which starts a Ray actor group of its own
(``align.distributed.WorkerGroup``): each actor (``RewardModelWorker``) holds a frozen copy of
the model and scores its share of every batch. Options, as spec ``kwargs``::

    - spec: runs/arithmetic/rm/final
      kwargs: {num_workers: 2, cpus_per_worker: 0.5, batch_size: 128}

``num_workers: 0`` scores in the calling process, without Ray.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Sequence
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

import torch

from align.config import ModelConfig
from align.data.batching import collate_padded
from align.data.conversations import is_messages, split_completion
from align.data.layout import batch_layout
from align.data.sft import TokenizedExample
from align.data.text import encode, eos_token_id, with_eos
from align.distributed.worker import BaseWorker
from align.errors import ConfigError, ModelError, RewardError, did_you_mean
from align.hub import fetch_model, is_repo_id
from align.model_loading import load_model, load_tokenizer
from align.packed_forward import head_outputs
from align.reward_columns import PROMPT_MESSAGES_COLUMN
from reward_models.protocol import TRUNCATED_COLUMN
from reward_models.style_adapters import conversational_form

SCORED_BATCH = "<scored batch>"  # the source named in errors about a scored sample


def model_folder(source: str | Path, key: str = "reward model") -> Path:
    """The reward-model folder on this machine: `source` itself, or for a hub id (`org/name`,
    and nothing of that name here) its snapshot in the Hugging Face cache, fetched if need be
    (`align.hub`), so each node of a cluster fetches its own copy.

    Raises:
        ModelError: a hub id that is neither cached nor reachable (named with `key`).
    """
    if is_repo_id(str(source)):
        return fetch_model(str(source), key)
    return Path(source).expanduser()


def load_reward_model(path: str | Path, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a reward-model folder (a full model, or a LoRA adapter over a base) for inference.

    Args:
        path: a folder written by `align rm` (final/) or any Hugging Face sequence classifier
            with one label; or the hub id of one (see `model_folder`).
        dtype: `auto` (bf16 on a GPU that supports it, else fp32), `float32`, `bfloat16`,
            `float16`.

    Returns:
        (model, tokenizer): the model frozen in eval mode, on the GPU when one is visible.

    Raises:
        ModelError: the folder is missing, or holds something other than a one-output
            sequence classifier (for example a causal LM).
    """
    folder = model_folder(path)
    adapter = folder / "adapter_config.json"
    if not (folder / "config.json").is_file() and adapter.is_file():
        settings = json.loads(adapter.read_text())
        if settings.get("task_type") != "SEQ_CLS":
            raise ModelError(f"{folder} holds a LoRA adapter for task "
                             f"{settings.get('task_type')!r}, not a reward model (SEQ_CLS)")
        cfg = ModelConfig(name_or_path=settings["base_model_name_or_path"],
                          tokenizer=str(folder), dtype=dtype)
        tokenizer = load_tokenizer(cfg)
        from peft import PeftModel

        base = load_model(cfg, tokenizer, "sequence_classification")
        model = PeftModel.from_pretrained(base, folder).merge_and_unload()
    else:
        check_reward_model_config(folder)
        cfg = ModelConfig(name_or_path=str(folder), dtype=dtype)
        tokenizer = load_tokenizer(cfg)
        model = load_model(cfg, tokenizer, "sequence_classification")
    if torch.cuda.is_available():
        model = model.to("cuda")
    return model.eval().requires_grad_(False), tokenizer


def check_reward_model_config(folder: Path) -> None:
    """Refuse a folder whose config.json is not a one-label sequence classifier: loading, say,
    an SFT model as a reward model would silently score with a random head."""
    config = folder / "config.json"
    if not config.is_file():
        raise ModelError(f"{folder} is not a model folder (no config.json); point at the "
                         "final/ folder of an `align rm` run")
    settings = json.loads(config.read_text())
    architectures = settings.get("architectures") or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelError(f"{folder} holds {', '.join(architectures) or 'an unknown model'}, "
                         "not a reward model (a ...ForSequenceClassification); train one with "
                         "`align rm`")
    labels = len(settings.get("id2label") or {}) or settings.get("num_labels", 1)
    if labels != 1:
        raise ModelError(f"{folder} is a classifier with {labels} labels; a reward model has "
                         "one output (num_labels=1)")


def encode_sample(tokenizer: Any, prompt: Any, completion: Any, max_length: int | None = None,
                  index: int = 0, truncated: bool = False) -> list[int]:
    """Token ids of one (prompt, completion), as training pairs are encoded.

    Strings: prompt ids + completion ids + EOS, without the EOS when `truncated` (the text did
    not end). Message lists: the chat template's rendering (`split_completion`, as training
    renders pairs), no EOS appended; when `truncated`, cut after the last message's content, so
    the turn stays open (see `_open_turn`). When longer than `max_length` the completion is cut
    (and loses its EOS).

    Raises:
        RewardError: the prompt alone fills `max_length`, or the sample is not text.
    """
    if is_messages(prompt):
        prompt_text, completion_text = split_completion(
            tokenizer, prompt, completion, SCORED_BATCH, index + 1, "completion")
        if truncated:
            completion_text = _open_turn(completion_text, completion)
        prompt_ids, completion_ids = encode(tokenizer, prompt_text), encode(tokenizer,
                                                                            completion_text)
    elif isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = encode(tokenizer, prompt)
        completion_ids = encode(tokenizer, completion)
        if not truncated:
            completion_ids = with_eos(completion_ids, eos_token_id(tokenizer))
    else:
        raise RewardError(f"sample {index}: prompt and completion must both be strings (or "
                          f"message lists), got {type(prompt).__name__} and "
                          f"{type(completion).__name__}")
    if max_length is not None:
        room = max_length - len(prompt_ids)
        if room <= 0:
            raise RewardError(f"sample {index}: the prompt has {len(prompt_ids)} tokens, leaving "
                              f"no room for the completion within max_length={max_length}")
        completion_ids = completion_ids[:room]
    return prompt_ids + completion_ids


def _open_turn(rendered: str, completion: list[dict]) -> str:
    """A rendered completion cut after its last message's content (templates may trim it):
    the turn left open, as training leaves a completion it had to cut. Where the template
    changed the content beyond trimming, the content as it was."""
    content = str(completion[-1].get("content", "")) if completion else ""
    kept = content.strip()
    end = rendered.rfind(kept) if kept else -1
    return rendered[:end + len(kept)] if end >= 0 else content


def as_trained(tokenizer: Any, prompts: Sequence[Any], completions: Sequence[Any],
               prompt_messages: Sequence[list[dict] | None] | None) -> tuple[list, list]:
    """The samples as a reward model trained on them saw them.

    Where `prompt_messages[i]` holds the messages of a conversational prompt (the PPO trainer's
    column; None for a string prompt) and the completion is text, the sample becomes those
    messages and `[{"role": "assistant", "content": completion}]`, which `encode_sample`
    renders with this tokenizer's chat template exactly as `align.data.preference` rendered
    the training pairs. A tokenizer without a chat template was trained on text: the texts are
    scored as they are.

    Raises:
        RewardError: `prompt_messages` is not as `check_prompt_messages` requires.
    """
    prompt_messages = check_prompt_messages(prompt_messages, len(prompts))
    if prompt_messages is None or getattr(tokenizer, "chat_template", None) is None:
        return list(prompts), list(completions)
    messages = [m if isinstance(c, str) else None for m, c in zip(prompt_messages, completions)]
    return conversational_form(prompts, completions, messages)


def check_prompt_messages(prompt_messages: Any, n: int) -> list[list[dict] | None] | None:
    """The `prompt_messages` of n samples: None, or per sample None or a list of
    `{"role": str, "content": str}` messages.

    Raises:
        RewardError: anything else, naming the first bad sample.
    """
    if prompt_messages is None:
        return None
    if not isinstance(prompt_messages, Sequence) or len(prompt_messages) != n:
        raise RewardError(f"'{PROMPT_MESSAGES_COLUMN}' must be a list of {n} message lists "
                          f"or nulls (one per sample), got {prompt_messages!r:.80}")
    for index, messages in enumerate(prompt_messages):
        if messages is not None and not (is_messages(messages) and all(
                isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in messages)):
            raise RewardError(f"sample {index}: '{PROMPT_MESSAGES_COLUMN}' must be null or a "
                              f"list of {{\"role\": str, \"content\": str}} messages, got "
                              f"{messages!r:.80}")
    return list(prompt_messages)


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores of a padded or packed batch, read at each sequence's true last token.

    Hugging Face's classification head reads the last token that is not `pad_token_id`; where
    pad is EOS (GPT-2 style tokenizers) that skips the EOS closing every sequence, so the head's
    output is read here instead: at the last position the attention mask keeps (left or right
    padding), or at each packed sequence's last token.

    Args:
        model: a sequence classifier with one label (a plain, peft or DeepSpeed-wrapped module).
        batch: `input_ids` and `attention_mask`, each (N, T); or packed rows, shared prompts
            included (see `align.data.layout`).

    Returns:
        (N,) float32 scores, differentiable when the model is.
    """
    scores = head_outputs(model, batch)  # (rows, W): through the model, as ZeRO-3 needs
    last = batch_layout(batch).last_positions(batch, scores.device)
    return scores.flatten()[last].float()


def collate_sequences(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token-id lists into `input_ids` and `attention_mask`."""
    batch = collate_padded([TokenizedExample(list(s), list(s)) for s in sequences], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def score_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any],
                completions: Sequence[Any], batch_size: int = 64,
                max_length: int | None = None,
                truncated: Sequence[bool] | None = None,
                turns: AbstractContextManager | None = None,
                prompt_messages: Sequence[list[dict] | None] | None = None) -> list[float]:
    """One score per (prompt, completion), in order.

    Args:
        model, tokenizer: as returned by `load_reward_model`.
        prompts, completions: strings, or message lists (TRL's conversational format).
        batch_size: sequences per forward pass.
        max_length: longest sequence scored; default the model's `max_position_embeddings`.
        truncated: per sample, whether the completion stopped without ending (scored without
            EOS, see `encode_sample`); None: every completion ended.
        turns: held around each forward pass, so that callers sharing the model take turns
            a batch at a time (the server's FairLock); None: no lock.
        prompt_messages: per sample, the messages a rendered prompt came from, or None (see
            `as_trained`); None: every prompt is scored as given.

    Raises:
        RewardError: the lists differ in length, or a sample cannot be encoded.
    """
    if len(prompts) != len(completions):
        raise RewardError(f"got {len(prompts)} prompts but {len(completions)} completions")
    truncated = check_truncated(truncated, len(prompts))
    prompts, completions = as_trained(tokenizer, prompts, completions, prompt_messages)
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    sequences = [encode_sample(tokenizer, p, c, max_length, i, cut)
                 for i, (p, c, cut) in enumerate(zip(prompts, completions, truncated))]
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        with turns or nullcontext():
            scores += score_batch(model, collate_sequences(chunk, tokenizer.pad_token_id)
                                  ).tolist()
    return scores


def check_truncated(truncated: Sequence[Any] | None, n: int) -> list[bool]:
    """The `truncated` flags of n samples (all False when None).

    Raises:
        RewardError: not a list of n booleans.
    """
    if truncated is None:
        return [False] * n
    if (not isinstance(truncated, Sequence) or len(truncated) != n
            or not all(isinstance(t, bool) for t in truncated)):
        raise RewardError(f"'{TRUNCATED_COLUMN}' must be a list of {n} booleans (one per "
                          f"sample), got {truncated!r:.80}")
    return list(truncated)


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Additive statistics of a batch of pairs, to add up over batches and ranks.

    `min_reward` and `max_reward` are the exception: they combine by min and max (see
    `align.metrics.combine_metric`). `pair_means` turns the totals into metrics.

    Args:
        chosen, rejected: (B,) scores of the preferred and the other completions, B >= 1.
    """
    c, r = chosen.detach().float(), rejected.detach().float()
    both = torch.cat([c, r])
    return {"pairs": float(len(c)), "correct": float((c > r).sum()),
            "margin_sum": float((c - r).sum()), "chosen_sum": float(c.sum()),
            "rejected_sum": float(r.sum()), "min_reward": float(both.min()),
            "max_reward": float(both.max())}


def pair_means(sums: dict[str, float]) -> dict[str, float]:
    """TRL's reward-model metrics from `pair_sums` totals.

    Returns:
        `accuracy` (share of pairs scored chosen > rejected; a tie counts as wrong, as in TRL),
        `margin` (mean r_c - r_r), `mean_reward`, `min_reward`, `max_reward` (over both sides),
        and `chosen_reward`, `rejected_reward` (mean of each side).
    """
    n = sums["pairs"]
    return {"accuracy": sums["correct"] / n, "margin": sums["margin_sum"] / n,
            "mean_reward": (sums["chosen_sum"] + sums["rejected_sum"]) / (2 * n),
            "min_reward": sums["min_reward"], "max_reward": sums["max_reward"],
            "chosen_reward": sums["chosen_sum"] / n, "rejected_reward": sums["rejected_sum"] / n}


class RewardModelWorker(BaseWorker):
    """One rank: loads the folder once, then scores the samples it is sent."""

    def load(self, path: str, dtype: str, batch_size: int, max_length: int | None) -> None:
        self.model, self.tokenizer = load_reward_model(path, dtype)
        self.batch_size, self.max_length = batch_size, max_length

    def score(self, prompts: list[Any], completions: list[Any],
              truncated: list[bool] | None = None,
              prompt_messages: list[list[dict] | None] | None = None) -> list[float]:
        return score_texts(self.model, self.tokenizer, prompts, completions, self.batch_size,
                           self.max_length, truncated, prompt_messages=prompt_messages)


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a trained reward model; a Reward.

    Args:
        path: the model folder (``final/`` of an ``align rm`` run, or any one-label Hugging
            Face sequence classifier, or a LoRA adapter for one).
        num_workers: Ray actors, each with a full copy, scoring in parallel; 0: in this
            process, no Ray.
        cpus_per_worker: CPUs each actor reserves (fractional values share a core with other
            roles); its torch threads follow it.
        gpus_per_worker: GPUs each actor reserves; None: 1 when the cluster has GPUs, else 0.
        batch_size: sequences per forward pass.
        max_length: longest sequence scored (longer completions are cut); None: the model's
            ``max_position_embeddings``.
        dtype: ``auto`` (bf16 on a GPU that supports it, else fp32), ``float32``, ``bfloat16``
            or ``float16``.
        ray_address: Ray cluster to join when none is running; None starts a local one.

    Raises:
        ModelError: the folder does not hold a reward model.
    """

    def __init__(self, path: str | Path, num_workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float | None = None, batch_size: int = 64,
                 max_length: int | None = None, dtype: str = "auto",
                 ray_address: str | None = None) -> None:
        self.path = Path(path)
        self.group = None
        if num_workers == 0:
            self.model, self.tokenizer = load_reward_model(self.path, dtype)
            self.batch_size, self.max_length = batch_size, max_length
            return
        from align.config import DistributedConfig
        from align.distributed import WorkerGroup

        dist = DistributedConfig(num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                                 gpus_per_worker=gpus_per_worker, ray_address=ray_address)
        self.group = WorkerGroup(RewardModelWorker, dist, role=f"reward model {self.path}")
        try:
            self.group.call("load", str(self.path), dtype, batch_size, max_length)
        except BaseException:  # Ctrl-C included: the actors must not outlive a failed start
            self.close()
            raise

    @classmethod
    def from_options(cls, path: Path | str, label: str,
                     options: dict[str, Any]) -> RewardModelScorer:
        """Build from a config entry: `path` the folder (or a hub id), `options` its spec
        ``kwargs``.

        Raises:
            ConfigError: an unknown or ill-typed option (the closest valid one suggested), or
                a hub id that is neither cached nor reachable.
            RewardError: the folder does not hold a reward model.
        """
        _check_options(label, options)
        try:
            folder = model_folder(path, f"reward {label!r}")
        except ModelError as err:  # a hub id not to be had: the config's spec is at fault
            raise ConfigError(str(err)) from None
        try:
            if not (folder / "adapter_config.json").is_file():
                check_reward_model_config(folder)  # fail before any actor starts
            return cls(path, **options)  # a hub id stays one: each node fetches it
        except ModelError as err:
            raise RewardError(f"reward {label!r}: {err}") from None

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        """One score per sample. The PPO trainer's columns `completion_truncated` (the
        completions marked True are scored without EOS) and `prompt_messages` (conversational
        samples are scored as training laid them out, see `as_trained`) are read; other columns
        are ignored."""
        truncated = check_truncated(columns.get(TRUNCATED_COLUMN), len(prompts))
        messages = check_prompt_messages(columns.get(PROMPT_MESSAGES_COLUMN), len(prompts))
        if self.group is None:
            return score_texts(self.model, self.tokenizer, prompts, completions,
                               self.batch_size, self.max_length, truncated,
                               prompt_messages=messages)
        n, size = len(prompts), self.group.size
        bounds = [n * rank // size for rank in range(size + 1)]
        shards = [(list(prompts[a:b]), list(completions[a:b]), truncated[a:b],
                   None if messages is None else list(messages[a:b]))
                  for a, b in zip(bounds, bounds[1:])]
        return [score for part in self.group.call_each("score", shards) for score in part]

    def close(self) -> None:
        """Stop the actors and free their resources (safe to call twice). Trainers call it
        when a run ends; `__del__` is only a fallback."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; Ray may already be gone
            pass


def _check_options(label: str, options: dict[str, Any]) -> None:
    params = inspect.signature(RewardModelScorer.__init__).parameters
    valid = [name for name in params if name not in ("self", "path")]
    for key in options:
        if key not in valid:
            hint = did_you_mean(key, valid, otherwise=f"; options: {valid}")
            raise ConfigError(f"reward {label!r}: unknown reward-model option {key!r}{hint}")
    workers = options.get("num_workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"reward {label!r}: num_workers must be an integer >= 0, got "
                          f"{workers!r}")
    batch = options.get("batch_size", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"reward {label!r}: batch_size must be an integer >= 1, got "
                          f"{batch!r}")
