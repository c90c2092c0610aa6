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

from pathlib import Path

from side_by_side import (
    RunSpec,
    align_overrides,
    align_step_seconds,
    stage_main,
    task_config,
    train_trl,
    trl_common_args,
    trl_lora_config,
    write_jsonl,
)


def write_data(folder: Path, num_pairs: int) -> Path:
    from align.tasks import arithmetic

    rows = arithmetic.preference_rows(task_config(num_pairs), num_pairs)
    return write_jsonl(folder / "pairs.jsonl", rows)


def run_align(spec: RunSpec) -> list[float]:
    from align.config import DPOConfig, load_config
    from align.trainers.dpo import DPOTrainer

    cfg = load_config(DPOConfig, None, [
        *align_overrides(spec), f"trainer.global_batch_size={spec.batch}",
        f"trainer.micro_batch_size={spec.batch}", "trainer.lr=5e-4", "dpo.beta=0.1",
        "dpo.loss_type=sigmoid"])
    DPOTrainer(cfg, show_progress=False).fit()
    return align_step_seconds(spec.out)


def run_trl(spec: RunSpec) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(**trl_common_args(spec), per_device_train_batch_size=spec.batch,
                     learning_rate=5e-4, max_length=spec.max_length, beta=0.1)
    trainer = DPOTrainer(model=AutoModelForCausalLM.from_pretrained(spec.model_dir), args=args,
                         train_dataset=load_dataset("json", data_files=spec.data)["train"],
                         processing_class=AutoTokenizer.from_pretrained(spec.model_dir),
                         peft_config=trl_lora_config(spec))
    return train_trl(trainer)


if __name__ == "__main__":
    stage_main(__file__, ("dpo", "dpo_lora"), 32, write_data,
               {"align": run_align, "trl": run_trl})
