"""Reward-model throughput: align's `rm` against TRL's RewardTrainer, same model, data, batch.

    python benchmarks/rm_vs_trl.py [--models embedded,h256] [--steps 20] [--batch 32]

Both train a Bradley-Terry scorer (`AutoModelForSequenceClassification`, one label) from the
same saved causal LM on the same arithmetic preference pairs `{prompt, chosen, rejected}`,
fp32 on CPU, lr 1e-3 constant, sequences up to 32 tokens. A sample is one pair. Prints one
JSON line per model (see `side_by_side.py` for how samples/s and peak RSS are measured).
"""

from __future__ import annotations

from side_by_side import RunSpec, arithmetic_data, run_align_stage, run_trl_stage, stage_main

write_data = arithmetic_data("pairs")


def run_align(spec: RunSpec) -> list[float]:
    return run_align_stage(spec, "rm", 1e-3)


def run_trl(spec: RunSpec) -> list[float]:
    # RewardTrainer loads the folder as a one-label AutoModelForSequenceClassification
    return run_trl_stage(spec, "Reward", 1e-3, load_model=False, max_length=spec.max_length)


if __name__ == "__main__":
    stage_main(__file__, ("rm",), 32, write_data, {"align": run_align, "trl": run_trl})
