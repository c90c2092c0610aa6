"""SFT throughput: align's `sft` against TRL's SFTTrainer, same model, data and batch.

    python benchmarks/sft_vs_trl.py [--models embedded,h256] [--steps 20] [--batch 64]

Both train on the same arithmetic prompt/completion rows (`align.tasks.arithmetic`) with the
loss on completions only, fp32 on CPU, lr 3e-3 constant, examples up to 32 tokens. align packs
micro-batches without padding; TRL's SFTTrainer pads. Prints one JSON line per model (see
`side_by_side.py` for how samples/s and peak RSS are measured).
"""

from __future__ import annotations

from side_by_side import RunSpec, arithmetic_data, run_align_stage, run_trl_stage, stage_main

write_data = arithmetic_data("sft")


def run_align(spec: RunSpec) -> list[float]:
    return run_align_stage(spec, "sft", 3e-3)


def run_trl(spec: RunSpec) -> list[float]:
    return run_trl_stage(spec, "SFT", 3e-3, max_length=spec.max_length,
                         completion_only_loss=True)


if __name__ == "__main__":
    stage_main(__file__, ("sft",), 64, write_data, {"align": run_align, "trl": run_trl})
