"""GRPO throughput: align's `ppo` (estimator grpo) against TRL's GRPOTrainer, same model/data.

    python benchmarks/grpo_vs_trl.py [--models embedded,h256] [--steps 20] [--batch 64]
                                     [--vllm --bf16]

Both sample 8 completions per arithmetic prompt (`{prompt, answer}` rows), at most 6 new
tokens at temperature 1, score them with `reward_models.builtin:exact_match`, normalise
rewards within each group and take one optimizer step per batch of rollouts with a k3 KL
term (0.04) to the initial model, fp32 on CPU, lr 5e-4 constant. `--batch` counts
completions (batch / 8 prompts per step). Generation is each tool's default on CPU: align's
`hf` rollout engine (`rollout.engine=auto` resolves to it without a GPU), TRL's transformers
`generate`; `--vllm` switches both to vLLM (GPU runs). A sample is one completion. Prints one
JSON line per model (see `side_by_side.py` for how samples/s and peak RSS are measured).
"""

from __future__ import annotations

from side_by_side import RunSpec, arithmetic_data, run_align_grpo, run_trl_grpo, stage_main

GROUP = 8  # completions per prompt
NEW_TOKENS = 6

write_data = arithmetic_data("prompts")


def run_align(spec: RunSpec) -> list[float]:
    return run_align_grpo(spec, 5e-4, GROUP, NEW_TOKENS, "reward_models.builtin:exact_match")


def run_trl(spec: RunSpec) -> list[float]:
    from reward_models.builtin import exact_match

    return run_trl_grpo(spec, 5e-4, GROUP, NEW_TOKENS, exact_match)


if __name__ == "__main__":
    stage_main(__file__, ("grpo",), 64, write_data, {"align": run_align, "trl": run_trl})
