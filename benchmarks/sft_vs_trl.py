"""SFT throughput: align's `sft` against TRL's SFTTrainer, same model, data and batch.

    python benchmarks/sft_vs_trl.py [--models embedded,h256] [--steps 20] [--batch 64]

Both train on the same arithmetic prompt/completion rows (`align.tasks.arithmetic`) with the
loss on completions only, fp32 on CPU, lr 3e-3 constant, examples up to 32 tokens. align packs
micro-batches without padding; TRL's SFTTrainer pads. Prints one JSON line per model (see
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


def write_data(folder: Path, num_rows: int) -> Path:
    from align.tasks import arithmetic

    return write_jsonl(folder / "sft.jsonl", arithmetic.sft_rows(task_config(num_rows)))


def run_align(spec: RunSpec) -> list[float]:
    from align.config import SFTConfig, load_config
    from align.trainers.sft import SFTTrainer

    cfg = load_config(SFTConfig, None, [
        *align_overrides(spec), f"trainer.global_batch_size={spec.batch}",
        f"trainer.micro_batch_size={spec.batch}", "trainer.lr=3e-3"])
    SFTTrainer(cfg, show_progress=False).fit()
    return align_step_seconds(spec.out)


def run_trl(spec: RunSpec) -> list[float]:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    args = SFTConfig(**trl_common_args(spec), per_device_train_batch_size=spec.batch,
                     learning_rate=3e-3, max_length=spec.max_length, completion_only_loss=True)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(spec.model_dir), args=args,
                         train_dataset=load_dataset("json", data_files=spec.data)["train"],
                         processing_class=AutoTokenizer.from_pretrained(spec.model_dir),
                         peft_config=trl_lora_config(spec))
    return train_trl(trainer)


if __name__ == "__main__":
    stage_main(__file__, ("sft",), 64, write_data, {"align": run_align, "trl": run_trl})
