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

GROUP = 8  # completions per prompt
NEW_TOKENS = 6


def write_data(folder: Path, num_rows: int) -> Path:
    from align.tasks import arithmetic

    return write_jsonl(folder / "prompts.jsonl", arithmetic.rl_rows(task_config(num_rows),
                                                                    num_rows))


def run_align(spec: RunSpec) -> list[float]:
    from align.config import PPOConfig, load_config
    from align.trainers.ppo import PPOTrainer

    rewards = Path(spec.out).with_suffix(".yaml")  # a list: easier in YAML than as overrides
    rewards.write_text("rewards:\n  - spec: reward_models.builtin:exact_match\n")
    cfg = load_config(PPOConfig, str(rewards), [
        *align_overrides(spec), f"trainer.global_batch_size={spec.batch}",
        f"trainer.micro_batch_size={spec.batch}", "trainer.lr=5e-4",
        f"rollout.engine={'vllm' if spec.vllm else 'hf'}",
        f"rollout.prompts_per_step={spec.batch // GROUP}",
        f"rollout.n_samples_per_prompt={GROUP}", f"rollout.max_new_tokens={NEW_TOKENS}",
        "rollout.temperature=1.0", "algorithm.estimator=grpo", "algorithm.kl_coef=0.04",
        "algorithm.kl_estimator=k3", "algorithm.ppo_epochs=1"])
    PPOTrainer(cfg, show_progress=False).fit()
    return align_step_seconds(spec.out)


def run_trl(spec: RunSpec) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from reward_models.builtin import exact_match

    args = GRPOConfig(**trl_common_args(spec), per_device_train_batch_size=spec.batch,
                      learning_rate=5e-4, num_generations=GROUP,
                      max_completion_length=NEW_TOKENS, temperature=1.0, beta=0.04,
                      use_vllm=spec.vllm, vllm_mode="colocate")
    trainer = GRPOTrainer(model=spec.model_dir, reward_funcs=[exact_match], args=args,
                          train_dataset=load_dataset("json", data_files=spec.data)["train"],
                          processing_class=AutoTokenizer.from_pretrained(spec.model_dir))
    return train_trl(trainer)


if __name__ == "__main__":
    stage_main(__file__, ("grpo",), 64, write_data, {"align": run_align, "trl": run_trl})
