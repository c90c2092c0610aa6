"""`align eval-rm MODEL DATA`: pairwise accuracy and reward margin of a trained reward model.

Runs in this process (no Ray). The data is any preference source `align rm` trains on (a
file, a `save_to_disk` folder, a hub name) or `embedded` for the arithmetic task's held-out
pairs; rows are tokenised exactly as in training (`align.data.tokenize_preference`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from align.config import EMBEDDED, TaskConfig
from align.data import collate_preference, load_rows, tokenize_preference
from align.tasks import arithmetic
from reward_models.scorer import load_reward_model, pair_means, pair_sums, score_batch

EMBEDDED_HELD_OUT = "embedded:arithmetic(held-out)"


def evaluate_reward_model(model_dir: str | Path, data: str, batch_size: int = 64,
                          max_length: int | None = None, split: str = "train",
                          dtype: str = "auto") -> dict[str, Any]:
    """Score every pair of `data` with the model in `model_dir`.

    Args:
        model_dir: a reward-model folder (see `reward_models.scorer.load_reward_model`).
        data: a preference source, or `embedded` for the arithmetic task's held-out pairs
            (the default task settings, as `align rm` uses them).
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
    """
    if data == EMBEDDED:
        rows, source = arithmetic.held_out_preference_rows(TaskConfig()), EMBEDDED_HELD_OUT
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
