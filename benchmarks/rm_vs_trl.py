"""Reward-model throughput: align's `rm` against TRL's RewardTrainer, same model, data, batch.

    python benchmarks/rm_vs_trl.py [--models embedded,h256] [--steps 20] [--batch 32]

Both train a Bradley-Terry scorer (`AutoModelForSequenceClassification`, one label) from the
same saved causal LM on the same arithmetic preference pairs `{prompt, chosen, rejected}`,
fp32 on CPU, lr 1e-3 constant, sequences up to 32 tokens. A sample is one pair. Prints one
JSON line per model (see `side_by_side.py` for how samples/s and peak RSS are measured).
"""

from __future__ import annotations

from pathlib import Path

from side_by_side import (
    RunSpec,
    align_overrides,
    align_step_seconds,
    stage_main,
    task_config,
    train_trl,
    trl_common_args,
    write_jsonl,
)


def write_data(folder: Path, num_pairs: int) -> Path:
    from align.tasks import arithmetic

    rows = arithmetic.preference_rows(task_config(num_pairs), num_pairs)
    return write_jsonl(folder / "pairs.jsonl", rows)


def run_align(spec: RunSpec) -> list[float]:
    from align.config import RMConfig, load_config
    from align.trainers.reward import RewardTrainer

    cfg = load_config(RMConfig, None, [
        *align_overrides(spec), f"trainer.global_batch_size={spec.batch}",
        f"trainer.micro_batch_size={spec.batch}", "trainer.lr=1e-3"])
    RewardTrainer(cfg, show_progress=False).fit()
    return align_step_seconds(spec.out)


def run_trl(spec: RunSpec) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import RewardConfig, RewardTrainer

    args = RewardConfig(**trl_common_args(spec), per_device_train_batch_size=spec.batch,
                        learning_rate=1e-3, max_length=spec.max_length)
    trainer = RewardTrainer(model=spec.model_dir, args=args,
                            train_dataset=load_dataset("json", data_files=spec.data)["train"],
                            processing_class=AutoTokenizer.from_pretrained(spec.model_dir))
    return train_trl(trainer)


if __name__ == "__main__":
    stage_main(__file__, ("rm",), 32, write_data, {"align": run_align, "trl": run_trl})
