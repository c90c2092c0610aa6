"""SFT on the tool task (`configs/tools/sft.yaml`) over seeds and thread counts, with the
greedy checks of what the multi-turn GRPO stage starts from.

    python benchmarks/tools_sft.py [--seeds 0,1,2] [--threads 1,2]
                                   [--output-dir runs/tools_sft] [key=value ...]

Runs `align sft configs/tools/sft.yaml` once per (trainer.seed, torch threads per worker), each
in its own subprocess and folder (`OUTPUT_DIR/seed{S}-threads{T}`), then scores its `final/` on
the task's held-out prompts, greedily, in this process:

- `tool_call`: the first turn is exactly the correct tool call;
- `copy`: given the correct call and the tool's response, the answer turn is the product;
- `episode`: a whole greedy episode with the calculator answers correctly (a guess counts only
  where it is the product), split into `easy` (one-digit factor) and `hard` prompts;
- `p_tool_easy`: the mean probability of `<tool_call>` as the first token on easy prompts,
  which is how often sampling explores the tool there.

Runs already finished (their `checks.json` exists) are read, not rerun; `--fresh` reruns them.
Prints one JSON line per run, then a markdown table with the spread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from align.config import SFTConfig, TaskConfig, load_config
from align.tasks import products
from align.tasks.calculator import tool_schemas

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tools" / "sft.yaml"
FIGURES = ("tool_call", "copy", "episode", "easy", "hard", "p_tool_easy")


def greedy(model, tokenizer, prompts: list[str], max_new_tokens: int,
           batch_size: int = 50) -> list[str]:
    """Greedy continuations of `prompts` (left-padded batches), decoded without special
    tokens (the tool markers stay)."""
    texts = []
    for start in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=False).input_ids
               for p in prompts[start:start + batch_size]]
        width = max(map(len, ids))
        pad = tokenizer.pad_token_id
        batch = torch.tensor([[pad] * (width - len(i)) + i for i in ids])
        mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids])
        with torch.no_grad():
            out = model.generate(input_ids=batch, attention_mask=mask, do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                 eos_token_id=tokenizer.eos_token_id)
        texts += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    return texts


def first_token_probability(model, tokenizer, prompts: list[str], token: str) -> float:
    """Mean probability of `token` as the first generated token of `prompts`."""
    target = tokenizer.convert_tokens_to_ids(token)
    total = 0.0
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False).input_ids])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1]
        total += float(torch.softmax(logits, -1)[target])
    return total / len(prompts)


def tool_checks(model_dir: Path, task: TaskConfig, num: int) -> dict[str, float]:
    """The figures of the module docstring on the first `num` held-out pairs of `task`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tools = tool_schemas()
    pairs = products.held_out_pairs(task)[:num]

    def render(messages: list[dict]) -> str:
        return tokenizer.apply_chat_template(messages, tools=tools, tokenize=False,
                                             add_generation_prompt=True)

    def user(a: int, b: int) -> list[dict]:
        return [{"role": "user", "content": products.question(a, b)}]

    firsts = greedy(model, tokenizer, [render(user(a, b)) for a, b in pairs], 80)
    called = [t == products.tool_call_text(a, b) for t, (a, b) in zip(firsts, pairs)]
    answers = greedy(model, tokenizer, [render(products.conversation(a, b)[:3])
                                        for a, b in pairs], 12)
    copied = [t.strip() == str(a * b) for t, (a, b) in zip(answers, pairs)]
    right = [(c and k) if t.startswith("<tool_call>") else t.strip() == str(a * b)
             for t, c, k, (a, b) in zip(firsts, called, copied, pairs)]
    easy = [products.looks_easy(a, b) for a, b in pairs]

    def share(flags: list[bool], where: list[bool] | None = None) -> float:
        picked = [f for f, w in zip(flags, where or [True] * len(flags)) if w]
        return sum(picked) / max(1, len(picked))

    easy_prompts = [render(user(a, b)) for (a, b), e in zip(pairs, easy) if e]
    return {"tool_call": share(called), "copy": share(copied), "episode": share(right),
            "easy": share(right, easy), "hard": share(right, [not e for e in easy]),
            "p_tool_easy": first_token_probability(model, tokenizer, easy_prompts,
                                                   "<tool_call>")}


def run_one(out: Path, seed: int, threads: int, overrides: list[str], num: int,
            fresh: bool) -> dict:
    """One SFT run and its checks (read back when already done)."""
    folder = out / f"seed{seed}-threads{threads}"
    checks = folder / "checks.json"
    if checks.is_file() and not fresh:
        return json.loads(checks.read_text())
    settings = [f"output_dir={folder}", "overwrite=true", f"trainer.seed={seed}",
                f"distributed.torch_threads={threads}", *overrides]
    folder.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with (folder.parent / f"{folder.name}.log").open("w") as log:
        done = subprocess.run([sys.executable, "-m", "align.cli", "sft", str(CONFIG), "--quiet",
                               *settings], stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    if done.returncode != 0:
        return {"seed": seed, "threads": threads, "error": f"exit {done.returncode}"}
    wall = time.time() - started
    torch.set_num_threads(threads)
    task = load_config(SFTConfig, CONFIG, settings).task
    summary = json.loads((folder / "summary.json").read_text())
    result = {"seed": seed, "threads": threads, "sft_seconds": summary["wall_seconds"],
              "wall_seconds": round(wall, 1), "eval_loss": summary.get("eval/loss"),
              **{k: round(v, 4) for k, v in tool_checks(folder / "final", task, num).items()}}
    checks.write_text(json.dumps(result) + "\n")
    return result


def markdown(results: list[dict]) -> str:
    """One row of percentages per run, then the minimum and maximum of each figure."""
    rows = ["| seed | threads | sft s | " + " | ".join(FIGURES) + " |",
            "|---|---|---|" + "---|" * len(FIGURES)]
    good = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['seed']} | {r['threads']} | {r['error']} |")
            continue
        cells = " | ".join(f"{100 * r[f]:.1f}" for f in FIGURES)
        rows.append(f"| {r['seed']} | {r['threads']} | {r['sft_seconds']:.0f} | {cells} |")
    if good:
        for label, pick in (("min", min), ("max", max)):
            cells = " | ".join(f"{100 * pick(r[f] for r in good):.1f}" for f in FIGURES)
            rows.append(f"| {label} | | | {cells} |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--threads", default="1,2", help="torch threads per worker")
    parser.add_argument("--num", type=int, default=200, help="held-out prompts checked")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/tools_sft"))
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs too")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    parser.add_argument("overrides", nargs="*", help="key=value for every run")
    args = parser.parse_intermixed_args()
    if args.ray_address:
        args.overrides.append(f"distributed.ray_address={args.ray_address}")
    results = []
    for seed in (int(s) for s in args.seeds.split(",")):
        for threads in (int(t) for t in args.threads.split(",")):
            results.append(run_one(args.output_dir, seed, threads, args.overrides, args.num,
                                   args.fresh))
            print(json.dumps(results[-1]), flush=True)
    table = markdown(results)
    print("\n" + table)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "table.md").write_text(table + "\n")
    return int(any("error" in r for r in results))


if __name__ == "__main__":
    sys.exit(main())
