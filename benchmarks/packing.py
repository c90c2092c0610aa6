"""Packing against padding: training samples per second, per row length and row width.

    python benchmarks/packing.py [--steps 3] [--micro-batch 32] [--lengths 16 64 256 1024]
    python benchmarks/packing.py --trainers   # also the real `align sft` / `align dpo` loops

The model is a GPT-2 of 2 layers, hidden 64, 4 heads, with the byte-level tokenizer, fp32 on
CPU. Each figure is one worker's optimizer step (forward, backward, AdamW) through the
project's own objectives and collation, timed over `--steps` steps after one warm-up step:
layouts take turns step by step and the fastest step of each is reported.

  - sweep: SFT on sequences of L/4..L tokens (uniform) for each row length L, one micro-batch
    per step: padded; packed into rows as wide as the micro-batch's longest sequence times
    1, 2 and 4; and packed into one row (the old layout; skipped when its N x N mask would
    be large).
  - chat: ChatML `{messages}` rows of about 70 tokens, micro-batch 64: SFT samples/s and DPO
    seconds per step (64 pairs, reference log-probs precomputed), padded and packed.
  - with --trainers, the same chat data through `SFTTrainer`/`DPOTrainer` (Ray, DeepSpeed,
    one worker), 10 steps each, `data.packing` unset (the default) against `false`, run
    A B A B; the median step after the first (SFT as samples/s).

Run on an otherwise idle machine; compare figures within one run only.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ONE_ROW_LIMIT = 8192  # tokens: one row of more builds a mask of over 64M entries per head


def tiny_gpt2(positions: int = 1024):
    from transformers import ByT5Tokenizer, GPT2Config, GPT2LMHeadModel

    tok = ByT5Tokenizer()
    tok.chat_template = CHATML
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4,
                        n_positions=positions, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return GPT2LMHeadModel(config), tok


def timed_steps(model, objective, layouts: dict[str, list[dict]], steps: int,
                **kwargs) -> dict[str, float]:
    """Fastest seconds per optimizer step of each layout over `steps` steps, after one warm-up
    step each. Layouts take turns step by step, so load from other processes on shared cores
    falls on all of them alike; the fastest step, not the mean, since load only adds time."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    times: dict[str, list[float]] = {name: [] for name in layouts}
    for step in range(steps + 1):
        for name, batches in layouts.items():
            start = time.perf_counter()
            loss, _ = objective(model, batches[step % len(batches)], **kwargs)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if step:
                times[name].append(time.perf_counter() - start)
    return {name: min(values) for name, values in times.items()}


def cost(batches: list[dict]) -> tuple[float, float]:
    """Mean tokens (rows x W, padding included) and attention cells (rows x W^2) per batch."""
    shapes = [b["input_ids"].shape for b in batches]
    return (statistics.mean(r * w for r, w in shapes),
            statistics.mean(r * w * w for r, w in shapes))


# ------------------------------------------------------------------------- sweep


def sweep(lengths: list[int], micro_batch: int, steps: int) -> list[dict]:
    from align.data import TokenizedExample, collate_packed, collate_padded
    from align.data.packing import ONE_ROW
    from align.trainers.sft import sft_objective

    model, _ = tiny_gpt2()
    rng = random.Random(0)
    rows = []
    for length in lengths:
        batches = [[TokenizedExample(ids, ids) for ids in (
            [rng.randrange(2, 256) for _ in range(rng.randint(max(1, length // 4), length))]
            for _ in range(micro_batch))] for _ in range(steps + 1)]
        longest = [max(len(e.input_ids) for e in batch) for batch in batches]
        layouts = {"padded": [collate_padded(b, 0) for b in batches]}
        for factor in (1, 2, 4):
            layouts[f"packed, rows {factor} x longest"] = [
                collate_packed(b, factor * n, 0) for b, n in zip(batches, longest)]
        if max(sum(len(e.input_ids) for e in b) for b in batches) <= ONE_ROW_LIMIT:
            layouts["packed, one row"] = [collate_packed(b, ONE_ROW, 0) for b in batches]
        seconds = timed_steps(model, sft_objective, layouts, steps, num_tokens=1.0)
        tokens, cells = cost(layouts["padded"])
        for name, collated in layouts.items():
            t, c = cost(collated)
            rows.append({"length": length, "layout": name,
                         "samples_per_second": round(micro_batch / seconds[name], 1),
                         "tokens_vs_padded": round(t / tokens, 2),
                         "attention_vs_padded": round(c / cells, 2)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------------- chat data


def chat_rows(n: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """SFT `{messages}` rows and preference rows of about 70 ChatML tokens each."""
    rng = random.Random(seed)
    sft, pairs = [], []
    for _ in range(n):
        a, b = rng.randint(1, 999), rng.randint(1, 999)
        question = {"role": "user", "content": f"{a}+{b}?"}
        answer = f"{a + b}"
        sft.append({"messages": [question, {"role": "assistant", "content": answer}]})
        pairs.append({"prompt": [question],
                      "chosen": [{"role": "assistant", "content": answer}],
                      "rejected": [{"role": "assistant", "content": f"{a + b + 10}"}]})
    return sft, pairs


def chat(steps: int, micro_batch: int = 64) -> dict:
    from align.config import DataConfig, DPOSettings
    from align.data import (
        collate_packed,
        collate_padded,
        collate_preference,
        collate_preference_packed,
        tokenize_preference,
        tokenize_sft,
    )
    from align.packed_forward import packing_length
    from align.trainers.dpo import dpo_objective
    from align.trainers.sft import sft_objective

    model, tok = tiny_gpt2(positions=128)
    sft, pairs = chat_rows(micro_batch * (steps + 1))
    examples, _ = tokenize_sft(sft, tok, max_length=128)
    preference = tokenize_preference(pairs, tok, max_length=128)
    row = packing_length(DataConfig(max_length=128), "sdpa")
    chunks = [slice(i * micro_batch, (i + 1) * micro_batch) for i in range(steps + 1)]
    out: dict = {"tokens_per_row": round(statistics.mean(len(e.input_ids) for e in examples), 1),
                 "row_length": row}
    sft_layouts = {"padded": [collate_padded(examples[c], 0) for c in chunks],
                   "packed": [collate_packed(examples[c], row, 0) for c in chunks]}
    for name, seconds in timed_steps(model, sft_objective, sft_layouts, steps,
                                     num_tokens=1.0).items():
        out[f"sft_{name}_samples_per_second"] = round(micro_batch / seconds, 1)
    dpo_layouts = {"padded": [collate_preference(preference[c], 0) for c in chunks],
                   "packed": [collate_preference_packed(preference[c], row, 0)
                              for c in chunks]}
    for batch in (b for layout in dpo_layouts.values() for b in layout):
        batch["reference_logps"] = torch.zeros(2 * micro_batch)
    for name, seconds in timed_steps(model, dpo_objective, dpo_layouts, steps,
                                     settings=DPOSettings(), num_pairs=float(micro_batch),
                                     num_chosen_tokens=1.0).items():
        out[f"dpo_{name}_seconds_per_step"] = round(seconds, 3)
    print(json.dumps(out), flush=True)
    return out


def median_step(run: Path) -> float:
    """Median `step_seconds` of a run after its first step (which pays one-off warm-up)."""
    from align.tracking import read_metrics

    seconds = [m["step_seconds"] for m in read_metrics(run / "metrics.jsonl")
               if "step_seconds" in m]
    return statistics.median(seconds[1:] or seconds)


def trainers(folder: Path, steps: int = 10, micro_batch: int = 64, rounds: int = 2) -> dict:
    """The real loops (Ray, DeepSpeed, one worker) on the chat data, packing unset vs false,
    alternating over `rounds`; each figure is the median over rounds of a run's median step."""
    from align.config import DPOConfig, SFTConfig, load_config
    from align.trainers.dpo import DPOTrainer
    from align.trainers.sft import SFTTrainer

    model, tok = tiny_gpt2(positions=128)
    model_dir = folder / "gpt2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    sft, pairs = chat_rows(micro_batch * steps)
    for name, rows in (("sft", sft), ("pairs", pairs)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs: dict[str, list[float]] = {}
    for round_ in range(rounds):  # A B A B: drift falls on both settings alike
        for packing in ("null", "false"):
            common = [f"model.name_or_path={model_dir}", "data.max_length=128",
                      f"data.packing={packing}", f"trainer.max_steps={steps}",
                      f"trainer.global_batch_size={micro_batch}",
                      f"trainer.micro_batch_size={micro_batch}", "trainer.log_every=1",
                      "eval.exact_match=false"]
            tag = f"{packing}-{round_}"
            cfg = load_config(SFTConfig, None, [*common, f"data.train={folder / 'sft.jsonl'}",
                                                f"output_dir={folder / ('sft-' + tag)}"])
            SFTTrainer(cfg, show_progress=False).fit()
            runs.setdefault(f"sft_packing_{packing}_samples_per_second", []).append(
                micro_batch / median_step(folder / f"sft-{tag}"))
            run = folder / f"dpo-{tag}"
            cfg = load_config(DPOConfig, None, [*common, f"data.train={folder / 'pairs.jsonl'}",
                                                f"output_dir={run}"])
            DPOTrainer(cfg, show_progress=False).fit()
            runs.setdefault(f"dpo_packing_{packing}_seconds_per_step", []).append(
                median_step(run))
    out = {key: round(statistics.median(values), 3) for key, values in runs.items()}
    print(json.dumps(out), flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=32)
    parser.add_argument("--lengths", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--trainers", action="store_true", help="also run the real loops")
    parser.add_argument("--skip-sweep", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    results: dict = {}
    if not args.skip_sweep:
        results["sweep"] = sweep(args.lengths, args.micro_batch, args.steps)
    results["chat"] = chat(args.steps)
    if args.trainers:
        with tempfile.TemporaryDirectory() as tmp:
            results["trainers"] = trainers(Path(tmp))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
