"""SFT throughput: align against TRL's SFTTrainer, same model, data and batch, in one run.

    python benchmarks/sft_vs_trl.py [--steps 200] [--batch 64]

Both start from the same saved weights (the embedded small Llama) and train on the same
arithmetic prompt/completion rows with loss on completions only, fp32 on CPU. Reported:
training samples per second of each (start-up excluded: align's from its per-step timing, TRL's
from `train_samples_per_second`) and their ratio. Run it on an otherwise idle machine; compare
ratios, not absolute figures, across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prepare(folder: Path, num_rows: int) -> tuple[Path, Path]:
    """Save the embedded model + tokenizer and the SFT rows, so both tools read the same."""
    from align.config import ModelConfig, TaskConfig
    from align.model_loading import load_model, load_tokenizer
    from align.tasks import arithmetic

    cfg = ModelConfig()
    tokenizer = load_tokenizer(cfg)
    model_dir = folder / "model"
    load_model(cfg, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = folder / "sft.jsonl"
    rows = arithmetic.sft_rows(TaskConfig(num_train=num_rows))
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return model_dir, data


def run_align(model_dir: Path, data: Path, out: Path, steps: int, batch: int) -> float:
    from align.config import SFTConfig, load_config
    from align.trainers.sft import SFTTrainer

    cfg = load_config(SFTConfig, None, [
        f"output_dir={out}", f"model.name_or_path={model_dir}", f"data.train={data}",
        "data.max_length=32", f"trainer.max_steps={steps}", f"trainer.global_batch_size={batch}",
        f"trainer.micro_batch_size={batch}", "trainer.lr=3e-3", "trainer.scheduler=constant",
        "trainer.log_every=50", "eval.exact_match=false"])
    return SFTTrainer(cfg, show_progress=False).fit()["samples_per_second"]


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, batch: int) -> float:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    torch.set_num_threads(os.cpu_count() or 1)
    args = SFTConfig(output_dir=str(out), max_steps=steps, per_device_train_batch_size=batch,
                     learning_rate=3e-3, lr_scheduler_type="constant", max_length=32,
                     completion_only_loss=True, bf16=False, fp16=False, use_cpu=True,
                     report_to=[], logging_steps=50, save_strategy="no",
                     dataloader_num_workers=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir), args=args,
                         train_dataset=load_dataset("json", data_files=str(data))["train"],
                         processing_class=AutoTokenizer.from_pretrained(model_dir))
    return trainer.train().metrics["train_samples_per_second"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, data = prepare(folder, args.steps * args.batch)
        started = time.time()
        align_sps = run_align(model_dir, data, folder / "align", args.steps, args.batch)
        trl_sps = run_trl(model_dir, data, folder / "trl", args.steps, args.batch)
    print(f"| tool  | samples/s |\n|---|---|\n| align | {align_sps:.1f} |\n"
          f"| TRL   | {trl_sps:.1f} |\n\nalign / TRL = {align_sps / trl_sps:.2f} "
          f"({args.steps} steps x {args.batch}, {time.time() - started:.0f} s in all)")


if __name__ == "__main__":
    main()
