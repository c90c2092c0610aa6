"""Data preparation at scale: align against TRL's SFTTrainer, same rows and tokenizer.

    python benchmarks/data_scale.py [--rows 10000 100000 1000000] [--num-proc 0]

Generates ChatML `{messages}` rows of about 80 words (a user turn of 30 words and an assistant
turn of 50, drawn Zipf-like from a 30,000-word vocabulary, as text is), a byte-level BPE
tokenizer (4,000 tokens, Qwen2's pre-tokenizer) and a tiny Qwen2, with `max_length=256`.
For each size, each tool prepares the data twice in a fresh process: first with an empty cache,
then again with nothing changed. Reported per run: seconds from reading the file to the first
step's batch (align: `SFTTrainer.prepare_data` and the first step's rows; TRL: `load_dataset`
and the `SFTTrainer` constructor, which tokenises), the peak RSS of the driver process
(preparation processes are reported apart) and the CPU seconds of all its processes (on a
shared machine, CPU seconds / cores bounds what an idle one would take). align trains on
assistant turns only, so it renders each conversation twice and tokenises its pieces; TRL's
default renders once and trains on every token. One JSON line per size and tool, then a table.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def vocabulary(rng: random.Random) -> tuple[list[str], list[float]]:
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "ti", "vo", "ze", "pa", "qu", "ri", "do",
                 "fe", "gu"]
    words = sorted({"".join(rng.choice(syllables) for _ in range(rng.randint(1, 4)))
                    for _ in range(40_000)})[:30_000]
    rng.shuffle(words)
    weights = list(itertools.accumulate(1.0 / (k + 1) ** 1.1 for k in range(len(words))))
    return words, weights


def write_rows(path: Path, num_rows: int, seed: int = 1) -> None:
    rng = random.Random(seed)
    words, cumulative = vocabulary(random.Random(0))
    with path.open("w") as handle:
        for _ in range(num_rows):
            user = " ".join(rng.choices(words, cum_weights=cumulative, k=30))
            assistant = " ".join(rng.choices(words, cum_weights=cumulative, k=50))
            handle.write(json.dumps({"messages": [{"role": "user", "content": user},
                                                  {"role": "assistant", "content": assistant}]})
                         + "\n")


def build_model(folder: Path) -> None:
    """A BPE tokenizer with Qwen2's pre-tokenizer and a 2-layer Qwen2, saved to `folder`."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, Qwen2Config

    rng = random.Random(2)
    words, cumulative = vocabulary(random.Random(0))
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        (" ".join(rng.choices(words, cum_weights=cumulative, k=80)) for _ in range(5000)),
        trainers.BpeTrainer(vocab_size=4000, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                            special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHATML
    config = Qwen2Config(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         max_position_embeddings=512, pad_token_id=tok.pad_token_id,
                         eos_token_id=tok.eos_token_id)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tok.save_pretrained(folder)


def measure_align(data: str, model: str, num_proc: int) -> dict:
    from align.config import SFTConfig, load_config
    from align.model_loading import load_tokenizer
    from align.trainers.sft import SFTTrainer

    cfg = load_config(SFTConfig, None, [
        f"model.name_or_path={model}", f"data.train={data}", "data.max_length=256",
        f"data.num_proc={num_proc}", "trainer.global_batch_size=64", "eval.exact_match=false",
        "output_dir=unused"])
    trainer = SFTTrainer(cfg, show_progress=False)
    trainer.tokenizer = load_tokenizer(cfg.model)
    start = time.perf_counter()
    rows = trainer.prepare_data()
    batch = trainer.train.take(trainer.schedule.indices(0))
    return {"seconds": time.perf_counter() - start, "rows": rows, "first_batch": len(batch)}


def measure_trl(data: str, model: str, num_proc: int, out: str) -> dict:
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model)
    net = AutoModelForCausalLM.from_pretrained(model)
    start = time.perf_counter()
    dataset = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(output_dir=out, max_length=256, dataset_num_proc=num_proc or None,
                     per_device_train_batch_size=64, report_to=[], bf16=False, use_cpu=True,
                     save_strategy="no", disable_tqdm=True)
    trainer = SFTTrainer(model=net, args=args, train_dataset=dataset, processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return {"seconds": time.perf_counter() - start, "rows": len(trainer.train_dataset),
            "first_batch": len(batch["input_ids"])}


def measure(args: argparse.Namespace) -> None:
    """One measurement in this (fresh) process; prints a JSON line."""
    if args.measure == "align":
        result = measure_align(args.data, args.model, args.num_proc)
    else:
        result = measure_trl(args.data, args.model, args.num_proc, args.out)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime + children.ru_utime + children.ru_stime
    print(json.dumps({**result, "peak_rss_mb": round(usage.ru_maxrss / 1024),
                      "workers_peak_rss_mb": round(children.ru_maxrss / 1024),
                      "cpu_seconds": round(cpu, 1)}))


def run_one(tool: str, data: Path, model: Path, caches: Path, num_proc: int) -> dict:
    env = {**os.environ, "ALIGN_DATA_CACHE": str(caches / "align"),
           "HF_DATASETS_CACHE": str(caches / "datasets")}
    done = subprocess.run([sys.executable, __file__, "--measure", tool, "--data", str(data),
                           "--model", str(model), "--num-proc", str(num_proc),
                           "--out", str(caches / "trl-out")],
                          capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tool} on {data} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--num-proc", type=int, default=0,
                        help="preparation processes (0: each tool's default for align, "
                             "one per core for TRL)")
    parser.add_argument("--tools", nargs="+", default=["align", "trl"])
    parser.add_argument("--workdir", help="keep data and caches here (default: a temp folder)")
    parser.add_argument("--measure", choices=["align", "trl"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    if args.measure:
        return measure(args)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="align-data-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    model = work / "model"
    if not model.is_dir():
        build_model(model)
    num_proc = args.num_proc or (os.cpu_count() or 1)
    table = []
    for rows in args.rows:
        data = work / f"chat-{rows}.jsonl"
        if not data.is_file():
            write_rows(data, rows)
        for tool in args.tools:
            caches = work / f"cache-{tool}-{rows}"
            first = run_one(tool, data, model, caches, args.num_proc if tool == "align"
                            else num_proc)
            cached = run_one(tool, data, model, caches, args.num_proc if tool == "align"
                             else num_proc)
            line = {"tool": tool, "rows": rows, "first_seconds": round(first["seconds"], 2),
                    "cached_seconds": round(cached["seconds"], 2),
                    "driver_peak_rss_mb": max(first["peak_rss_mb"], cached["peak_rss_mb"]),
                    "workers_peak_rss_mb": first["workers_peak_rss_mb"],
                    "first_cpu_seconds": first["cpu_seconds"]}
            print(json.dumps(line), flush=True)
            table.append(line)
    print("\n| tool | rows | first run s | first run CPU s | cached run s | driver peak RSS MB "
          "| workers peak RSS MB |\n|---|---|---|---|---|---|---|")
    for line in table:
        print(f"| {line['tool']} | {line['rows']:,} | {line['first_seconds']} | "
              f"{line['first_cpu_seconds']} | {line['cached_seconds']} | "
              f"{line['driver_peak_rss_mb']} | {line['workers_peak_rss_mb']} |")


if __name__ == "__main__":
    main()
