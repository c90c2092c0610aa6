"""Scoring text with a trained reward model, the same way everywhere.

Training (`align rm`), `align eval-rm`, `align serve-rm` and a reward-model folder used as a
reward all go through these functions, so one model gives one number for one text wherever it
runs. A (prompt, completion) pair is encoded as `align.data.preference` encodes training pairs:
prompt ids + completion ids + EOS for strings, the chat template for message lists, no special
tokens added. Rows are right-padded with an attention mask (training may pack them: see
`score_batch`); the Hugging Face sequence-classification head reads the score at the last token
that is not `pad_token_id` (for the byte tokenizer pad is 0 and EOS is 1, so that is the EOS).

`pair_sums` and `pair_means` turn chosen/rejected scores into the metrics TRL users know:
`accuracy`, `margin`, `mean_reward`, `min_reward`, `max_reward`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from align.config import ModelConfig
from align.data.batching import collate_padded
from align.data.conversations import is_messages, split_completion
from align.data.packing import last_token_positions
from align.data.sft import TokenizedExample
from align.data.text import encode, eos_token_id, with_eos
from align.errors import ModelError, RewardError
from align.model_loading import load_model, load_tokenizer
from align.packed_forward import classifier_parts, hidden_states, unwrap

SCORED_BATCH = "<scored batch>"  # the source named in errors about a scored sample


def load_reward_model(path: str | Path, dtype: str = "auto") -> tuple[Any, Any]:
    """Load a reward-model folder (a full model, or a LoRA adapter over a base) for inference.

    Args:
        path: a folder written by `align rm` (final/) or any Hugging Face sequence classifier
            with one label.
        dtype: `auto` (bf16 on a GPU that supports it, else fp32), `float32`, `bfloat16`,
            `float16`.

    Returns:
        (model, tokenizer): the model frozen in eval mode, on the GPU when one is visible.

    Raises:
        ModelError: the folder is missing, or holds something other than a one-output
            sequence classifier (for example a causal LM).
    """
    folder = Path(path).expanduser()
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
                  index: int = 0) -> list[int]:
    """Token ids of one (prompt, completion), as training pairs are encoded.

    Strings: prompt ids + completion ids + EOS. Message lists: the chat template's rendering,
    no EOS appended. When longer than `max_length` the completion is cut (and loses its EOS).

    Raises:
        RewardError: the prompt alone fills `max_length`, or the sample is not text.
    """
    if is_messages(prompt):
        prompt_text, completion_text = split_completion(
            tokenizer, prompt, completion, SCORED_BATCH, index + 1, "completion")
        prompt_ids, completion_ids = encode(tokenizer, prompt_text), encode(tokenizer,
                                                                            completion_text)
    elif isinstance(prompt, str) and isinstance(completion, str):
        prompt_ids = encode(tokenizer, prompt)
        completion_ids = with_eos(encode(tokenizer, completion), eos_token_id(tokenizer))
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


def score_batch(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Scores of a right-padded or packed batch.

    Args:
        model: a sequence classifier with one label (a plain, peft or DeepSpeed-wrapped module).
        batch: `input_ids` and `attention_mask`, each (N, T); or packed rows (see
            `align.data.packing`), where the head reads each sequence's last token that is not
            `pad_token_id`, as Hugging Face's head does in a padded row.

    Returns:
        (N,) float32 scores, differentiable when the model is.
    """
    if "sequence_index" in batch:
        hidden = hidden_states(model, batch)
        index = batch["sequence_index"].to(hidden.device)
        pad_id = unwrap(model).config.get_text_config().pad_token_id
        last = last_token_positions(batch["input_ids"].to(hidden.device), index,
                                    int(index.max()) + 1, pad_id)
        _, head = classifier_parts(model)
        return head(hidden.flatten(0, 1)[last])[:, 0].float()
    device = next(model.parameters()).device
    out = model(input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device), use_cache=False)
    return out.logits[:, 0].float()


def collate_sequences(sequences: Sequence[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad token-id lists into `input_ids` and `attention_mask`."""
    batch = collate_padded([TokenizedExample(list(s), list(s)) for s in sequences], pad_id)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


@torch.no_grad()
def score_texts(model: torch.nn.Module, tokenizer: Any, prompts: Sequence[Any],
                completions: Sequence[Any], batch_size: int = 64,
                max_length: int | None = None) -> list[float]:
    """One score per (prompt, completion), in order.

    Args:
        model, tokenizer: as returned by `load_reward_model`.
        prompts, completions: strings, or message lists (TRL's conversational format).
        batch_size: sequences per forward pass.
        max_length: longest sequence scored; default the model's `max_position_embeddings`.

    Raises:
        RewardError: the lists differ in length, or a sample cannot be encoded.
    """
    if len(prompts) != len(completions):
        raise RewardError(f"got {len(prompts)} prompts but {len(completions)} completions")
    if max_length is None:
        max_length = getattr(model.config, "max_position_embeddings", None)
    sequences = [encode_sample(tokenizer, p, c, max_length, i)
                 for i, (p, c) in enumerate(zip(prompts, completions))]
    scores: list[float] = []
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start:start + batch_size]
        scores += score_batch(model, collate_sequences(chunk, tokenizer.pad_token_id)).tolist()
    return scores


def pair_sums(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, float]:
    """Additive statistics of a batch of pairs, to add up over batches and ranks.

    `min_reward` and `max_reward` are the exception: they combine by min and max (see
    `align.policy.combine_metric`). `pair_means` turns the totals into metrics.

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
