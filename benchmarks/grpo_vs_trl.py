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

from pathlib import Path

from side_by_side import RunSpec, arithmetic_data, run_align_stage, run_trl_stage, stage_main

GROUP = 8  # completions per prompt
NEW_TOKENS = 6

write_data = arithmetic_data("prompts")


def run_align(spec: RunSpec) -> list[float]:
    rewards = Path(spec.out).with_suffix(".yaml")  # a list: easier in YAML than as overrides
    rewards.write_text("rewards:\n  - spec: reward_models.builtin:exact_match\n")
    return run_align_stage(
        spec, "ppo", 5e-4, f"rollout.engine={'vllm' if spec.vllm else 'hf'}",
        f"rollout.prompts_per_step={spec.batch // GROUP}",
        f"rollout.n_samples_per_prompt={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", "algorithm.estimator=grpo", "algorithm.kl_coef=0.04",
        "algorithm.kl_estimator=k3", "algorithm.ppo_epochs=1", config_file=str(rewards))


def run_trl(spec: RunSpec) -> list[float]:
    from reward_models.builtin import exact_match

    return run_trl_stage(spec, "GRPO", 5e-4, load_model=False,
                         trainer_kwargs={"reward_funcs": [exact_match]}, num_generations=GROUP,
                         max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.04,
                         use_vllm=spec.vllm, vllm_mode="colocate")


if __name__ == "__main__":
    stage_main(__file__, ("grpo",), 64, write_data, {"align": run_align, "trl": run_trl})
