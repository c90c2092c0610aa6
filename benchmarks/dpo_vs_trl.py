"""DPO throughput: align's `dpo` against TRL's DPOTrainer, full or LoRA, same model and data.

    python benchmarks/dpo_vs_trl.py [--stage dpo|dpo_lora] [--models embedded,h256]
                                    [--steps 20] [--batch 32]

Both run sigmoid DPO (beta 0.1) from the same saved causal LM on the same arithmetic
preference pairs, fp32 on CPU, lr 5e-4 constant, sequences up to 32 tokens; `dpo_lora` trains
peft LoRA adapters (r 8, alpha 16, all linear layers) in both, whose reference is the model
with the adapter off. Each tool keeps its default reference handling: align computes the
reference log-probs of full DPO once before training (outside the timed steps), TRL runs its
reference model every step. A sample is one pair. Prints one JSON line per model (see
`side_by_side.py` for how samples/s and peak RSS are measured).
"""

from __future__ import annotations

from side_by_side import RunSpec, arithmetic_data, run_align_stage, run_trl_stage, stage_main

write_data = arithmetic_data("pairs")


def run_align(spec: RunSpec) -> list[float]:
    return run_align_stage(spec, "dpo", 5e-4, "dpo.beta=0.1", "dpo.loss_type=sigmoid")


def run_trl(spec: RunSpec) -> list[float]:
    return run_trl_stage(spec, "DPO", 5e-4, max_length=spec.max_length, beta=0.1)


if __name__ == "__main__":
    stage_main(__file__, ("dpo", "dpo_lora"), 32, write_data,
               {"align": run_align, "trl": run_trl})
