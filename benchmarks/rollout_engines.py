"""Rollout throughput: the `hf` engine against the `vllm` engine, same model, prompts, sampling.

    python benchmarks/rollout_engines.py --model embedded   # the quickstart's model, 6 tokens
    python benchmarks/rollout_engines.py --model large      # hidden 512, 8 layers, 128 tokens

One policy worker (a Ray actor, as in training) and one vLLM engine colocated with it; both
sample the same prompts (temperature 1, with log-probs, as PPO rollouts do), alternating
A B A B so drift of a shared machine hits both. Reported per engine: completions/s and
generated tokens/s (median over rounds, after one warm-up round each), and the seconds per
weight sync (policy -> engine).
Run it on an otherwise idle machine; compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = {  # name: (model.embedded overrides, prompts, new tokens)
    "embedded": ({}, 256, 6),
    "large": ({"hidden_size": 512, "num_layers": 8, "num_heads": 8, "intermediate_size": 2048,
               "max_position_embeddings": 256}, 256, 128),
}


def start(model: str):
    """(policy group, hf engine, vllm engine, tokenizer, prompt ids, new tokens)."""
    from align.config import (
        DistributedConfig,
        ModelConfig,
        TaskConfig,
        TrainerConfig,
        VLLMSettings,
    )
    from align.distributed import PolicyWorker, WorkerGroup
    from align.model_loading import load_tokenizer
    from align.rollout.eos import eos_token_ids
    from align.rollout.hf import HFEngine
    from align.rollout.vllm_engine import VLLMEngine
    from align.tasks import arithmetic

    shape, num_prompts, new_tokens = MODELS[model]
    model_cfg = ModelConfig()
    for key, value in shape.items():
        setattr(model_cfg.embedded, key, value)
    tokenizer = load_tokenizer(model_cfg)
    dist = DistributedConfig(num_workers=1)
    group = WorkerGroup(PolicyWorker, dist, role="policy")
    group.call("setup", model_cfg, TrainerConfig(), dist, 1, "causal_lm", True)
    rows = arithmetic.rl_rows(TaskConfig(), num_prompts)
    prompts = [tokenizer(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    max_len = max(len(p) for p in prompts) + new_tokens
    vllm = VLLMEngine(model_cfg, VLLMSettings(), max_len, eos_token_ids(model_cfg, tokenizer),
                      tokenizer, seed=0, colocate_with=group)
    vllm.bind(group)
    return group, HFEngine(group), vllm, prompts, new_tokens


def measure(engine, prompts: list[list[int]], new_tokens: int, seed: int) -> tuple[float, float]:
    from align.rollout import Sampling

    sampling = Sampling(max_new_tokens=new_tokens, temperature=1.0, seed=seed, logprobs=True)
    tick = time.perf_counter()
    out = engine.generate(prompts, sampling)
    seconds = time.perf_counter() - tick
    return len(prompts) / seconds, sum(len(t) for t in out.tokens) / seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=sorted(MODELS), default="embedded")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts", type=int, default=0, help="fewer prompts (0: the model's)")
    args = parser.parse_args()
    group, hf, vllm, prompts, new_tokens = start(args.model)
    prompts = prompts[:args.prompts] if args.prompts else prompts
    try:
        syncs = [vllm.update_weights() for _ in range(4)][1:]  # the first one warms up
        measure(hf, prompts, new_tokens, 0)  # warm-up: first-call costs out of the figures
        measure(vllm, prompts, new_tokens, 0)
        results: dict[str, list[tuple[float, float]]] = {"hf": [], "vllm": []}
        for i in range(args.rounds):
            for name, engine in (("hf", hf), ("vllm", vllm)):
                results[name].append(measure(engine, prompts, new_tokens, seed=i))
                print(f"round {i + 1} {name}: {results[name][-1][0]:.1f} completions/s, "
                      f"{results[name][-1][1]:.0f} tokens/s", flush=True)
    finally:
        vllm.shutdown()
        group.shutdown()
    print(f"\n{args.model}: {len(prompts)} prompts x {new_tokens} new tokens, temperature 1, "
          f"{args.rounds} rounds A B\n\n| engine | completions/s | tokens/s |\n|---|---|---|")
    for name, values in results.items():
        print(f"| {name} | {statistics.median(v[0] for v in values):.1f} | "
              f"{statistics.median(v[1] for v in values):.0f} |")
    print(f"\nweight sync (policy -> vllm): {statistics.median(syncs):.3f} s "
          "(median of 3, after one warm-up)")


if __name__ == "__main__":
    main()
