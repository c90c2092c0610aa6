"""GRPO with long generations: align's vLLM engine (sync and async) against TRL's GRPOTrainer.

    python benchmarks/long_generation.py [--lengths 128,256,512] [--steps 3] [--prompts 1]
                                         [--repeats 1] [--tools align,align_async,trl,trl_vllm]
                                         [--quick] [--bf16]

The shape of a reasoning run, scaled to this CPU: a 34M-parameter Llama (hidden 512, 8 layers,
8 heads, MLP 2,048, untied head, the 384-id byte tokenizer), built here (nothing is
downloaded); `--prompts` prompts of 128 tokens per iteration (TRL's tokenizer call appends EOS:
129 there), 8 completions each at temperature 1, every completion exactly `new_tokens` long:
the model never samples EOS or another special id (`save_model`), so both tools do equal work,
and each run reports its mean completion length to show it. One GRPO iteration: generate,
score (`side_by_side.varied_reward`), reference log-probs with a k3 KL of 0.04, one optimizer
step (lr 1e-6), fp32 on CPU, each tool's defaults otherwise (TRL checkpoints gradients).

The runs, alternating A B A B in fresh subprocesses at each length (`side_by_side.alternate`):
  align        the `vllm` engine colocated with the policy, synchronous
  align_async  `rollout.async_steps=1`: a separate engine samples the next iteration while
               the policy trains (on CPU the engine and the trainer get one core each)
  trl          TRL 1.16's GRPOTrainer with its default generation (transformers `generate`)
  trl_vllm     GRPOTrainer with `use_vllm=True, vllm_mode="colocate"`; where it fails, its line
               says how (`trl_error`, the traceback on stderr), it is not tried at the other
               lengths, and the other runs go on
Per run, over iterations 2..N (the first, with its warm-ups, is left out; async runs leave
out the last as well, which samples nothing ahead: `align_figures`; so run 3 steps at least,
and more to see more than one iteration of theirs): samples/s
(completions), tokens/s (generated tokens), mean seconds per iteration, the share of an
iteration the trainer spends generating (align: `time/generate` plus, async, `time/wait` for
rollouts sampled ahead; TRL: `_generate_single_turn`, its vLLM weight sync excluded),
weight-sync seconds (align's `time/weight_sync`, TRL vLLM's `sync_weights`), align's other
phases (`train_s`, `sync_check_s`: the async mode's probe after each sync) and each process
tree's peak RSS.

Prints one JSON line per measurement, each with `ratio`: `long_generation` per length, align
mode and TRL generation (`ratio`: align's samples/s over TRL's, above 1 is align faster, with
both runs' figures), `async_over_sync` per length (`ratio`: async's samples/s over sync's) and
`cost_growth` (each run's seconds per iteration at every length; `ratio` per length, align
sync over TRL). `--quick`: 16 and 32 new tokens, 2 steps, one run each (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import side_by_side as harness
from side_by_side import RunSpec

TOOLS = ("align", "align_async", "trl", "trl_vllm")
GROUP = 8  # completions per prompt
PROMPT_TOKENS = 128
LR = 1e-6  # small: the updates are real but keep the pinned EOS logit where it is
CHANNEL = 0  # the hidden dimension held constant to pin the special ids' logits
PINNED_LOGIT_WEIGHT = -50.0  # the special ids' head weight on that dimension


def save_model(folder: Path) -> Path:
    """A random Llama (hidden 512, 8 layers) on the byte tokenizer that never samples a special
    id (pad, EOS, unknown): hidden dimension CHANNEL is 1 in every token's embedding and no
    layer writes to it (its rows of `o_proj` and `down_proj` are zero), so after the final
    norm it is positive at every position; the head reads it only in the special ids' rows,
    with weight PINNED_LOGIT_WEIGHT, which puts their logits tens of nats below the rest."""
    import torch
    from transformers import ByT5Tokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = ByT5Tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=8, intermediate_size=2048, max_position_embeddings=1024,
        tie_word_embeddings=False, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=None))
    special = [tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id]
    with torch.no_grad():
        model.model.embed_tokens.weight[:, CHANNEL] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[CHANNEL] = 0.0
            layer.mlp.down_proj.weight[CHANNEL] = 0.0
        model.lm_head.weight[:, CHANNEL] = 0.0
        model.lm_head.weight[special] = 0.0
        model.lm_head.weight[special, CHANNEL] = PINNED_LOGIT_WEIGHT
    model_dir = folder / "model-llama-h512-l8"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def new_tokens(spec: RunSpec) -> int:
    return spec.max_length - PROMPT_TOKENS  # max_length: the prompt and its completion


def timed_figures(step_seconds: list[float], samples: int, lengths: list[float],
                  generating: list[float], syncing: list[float], **phases: float
                  ) -> dict[str, Any]:
    """A run's figures from its timed iterations (2..N): seconds per iteration, mean
    completion length, seconds generating and syncing weights in each, other phases' means."""
    total = sum(step_seconds)
    if not step_seconds or total <= 0:
        raise RuntimeError("no timed iterations: step 1 is not timed, run at least 2 steps")
    length = statistics.mean(lengths)
    return {"samples_per_s": samples * len(step_seconds) / total,
            "tokens_per_s": samples * length * len(step_seconds) / total,
            "iteration_s": total / len(step_seconds), "mean_new_tokens": length,
            "generate_share": sum(generating) / total,
            "weight_sync_s": statistics.mean(syncing) if syncing else None, **phases}


def align_figures(rows: list[dict[str, Any]], samples: int, ahead: bool) -> dict[str, Any]:
    """A run's figures from align's metrics `rows`, one per iteration, over iterations 2..N;
    with rollouts sampled ahead (`ahead`), 2..N-1 where N >= 3: the last iteration samples
    nothing ahead, so its trainer runs alone, as no iteration of a long run does."""
    steps = rows[1:-1] if ahead and len(rows) >= 3 else rows[1:]

    def mean(key: str) -> float:
        return statistics.mean(m.get(key, 0.0) for m in steps)

    # generating: the trainer's time in `generate`, or (async) waiting for a rollout
    return timed_figures(
        [m["step_seconds"] for m in steps], samples,
        [m["completions/mean_length"] for m in steps],
        [m["time/generate"] + m.get("time/wait", 0.0) for m in steps],
        [m["time/weight_sync"] for m in steps], generate_s=mean("time/generate"),
        wait_s=mean("time/wait"), overlap_s=mean("time/overlap"),
        sync_check_s=mean("time/sync_check"), experience_s=mean("time/experience"),
        train_s=mean("time/train"))


def align_runner(*overrides: str, ahead: bool = False) -> Any:
    """The child run of align's GRPO with the `vllm` engine and `overrides` (`ahead`: they
    make rollouts be sampled ahead)."""

    def run(spec: RunSpec) -> dict[str, Any]:
        from align.tracking import read_metrics

        harness.run_align_grpo(spec, LR, GROUP, new_tokens(spec), harness.VARIED_REWARD,
                               *overrides)
        rows = [m for m in read_metrics(Path(spec.out) / "metrics.jsonl") if "step_seconds" in m]
        return align_figures(rows, spec.batch, ahead)

    return run


def timed_grpo_trainer() -> type:
    """A GRPOTrainer class that times each generation (and, with vLLM, the weight sync inside
    it) and keeps the mean length of the completions, in its class list `generations`."""
    from trl import GRPOTrainer

    class TimedGRPOTrainer(GRPOTrainer):
        generations: list[tuple[float, float, float]] = []  # (seconds, sync seconds, length)

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.sync_seconds = 0.0
            if self.use_vllm:
                sync = self.vllm_generation.sync_weights

                def timed_sync() -> None:
                    start = time.perf_counter()
                    sync()
                    self.sync_seconds += time.perf_counter() - start

                self.vllm_generation.sync_weights = timed_sync

        def _generate_single_turn(self, prompt_ids: Any, *args: Any, **kwargs: Any) -> Any:
            self.sync_seconds, start = 0.0, time.perf_counter()
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
            self.generations.append((time.perf_counter() - start, self.sync_seconds,
                                     statistics.mean(len(c) for c in completion_ids)))
            return completion_ids, logprobs

    return TimedGRPOTrainer


def run_trl(spec: RunSpec) -> dict[str, Any]:
    extra: dict[str, Any] = {}
    if spec.vllm:  # before vLLM is imported: the engine settings align's engines use on CPU
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        extra = {"vllm_max_model_length": spec.max_length + 8}
    trainer = timed_grpo_trainer()
    step_seconds = harness.run_trl_grpo(spec, LR, GROUP, new_tokens(spec),
                                        harness.varied_reward, trainer=trainer, **extra)
    timed = trainer.generations[1:]
    return timed_figures(step_seconds, spec.batch, [g[2] for g in timed],
                         [g[0] - g[1] for g in timed], [g[1] for g in timed] if spec.vllm else [],
                         generate_s=statistics.mean(g[0] - g[1] for g in timed))


def run_trl_vllm(spec: RunSpec) -> dict[str, Any]:
    """TRL with vLLM colocated; a failure is a figure (the error and the TRL function it
    came from, the traceback on stderr), not a stop."""
    try:
        return run_trl(spec)
    except Exception as exc:  # noqa: BLE001 - what failed is what this run reports
        traceback.print_exc()
        frames = [f for f in traceback.extract_tb(exc.__traceback__)
                  if f"{os.sep}trl{os.sep}" in f.filename]
        where = (f" (in {frames[-1].filename.split(os.sep + 'site-packages' + os.sep)[-1]}:"
                 f"{frames[-1].lineno} {frames[-1].name})" if frames else "")
        lines = [ln for ln in str(exc).splitlines() if ln.strip()]
        return {"error": f"{type(exc).__name__}: {lines[-1] if lines else ''}{where}"[:500]}


RUNNERS = {"align": align_runner(), "trl": run_trl, "trl_vllm": run_trl_vllm,
           "align_async": align_runner("rollout.async_steps=1", "rollout.vllm.colocate=false",
                                       ahead=True)}


def median_figures(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each figure's median over a tool's runs (an `error` run gives its error alone)."""
    errors = [r["error"] for r in runs if "error" in r]
    if errors:
        return {"error": errors[0]}
    return {key: (None if runs[0][key] is None
                  else round(statistics.median(r[key] for r in runs), 4)) for key in runs[0]}


def measure(lengths: list[int], tools: tuple[str, ...], steps: int, prompts: int,
            repeats: int, bf16: bool, ray_address: str | None
            ) -> dict[int, dict[str, dict[str, Any]]]:
    """Alternate `tools` `repeats` times at each length; returns each tool's median figures
    per length."""
    figures: dict[int, dict[str, dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = save_model(folder)
        data = harness.write_prompts(folder, steps * prompts, PROMPT_TOKENS)
        for length in lengths:
            def spec_of(tool: str, r: int, length: int = length) -> RunSpec:
                return RunSpec(stage="grpo", model_dir=str(model_dir), data=str(data),
                               out=str(folder / f"{tool}-{length}-{r}"), steps=steps,
                               batch=prompts * GROUP, max_length=PROMPT_TOKENS + length,
                               bf16=bf16, vllm=tool != "trl", ray_address=ray_address)

            failed = {t: f for t, f in figures.get(lengths[0], {}).items() if "error" in f}
            runs = harness.alternate(__file__, tuple(t for t in tools if t not in failed),
                                     repeats, spec_of, timeout_s=1800)
            # a run that failed at the first length is not tried again
            figures[length] = {t: failed.get(t) or median_figures(runs[t]) for t in tools}
    return figures


def prefixed(tool: str, figures: dict[str, Any]) -> dict[str, Any]:
    return {f"{tool}_{key}": value for key, value in figures.items()}


def speed_ratio(a: dict[str, Any], b: dict[str, Any]) -> float | None:
    if "error" in a or "error" in b:
        return None
    return round(a["samples_per_s"] / b["samples_per_s"], 3)


def report_lines(figures: dict[int, dict[str, dict[str, Any]]], setting: dict[str, Any]
                 ) -> list[dict[str, Any]]:
    """The JSON lines: long_generation per length, align mode and TRL generation;
    async_over_sync per length; cost_growth over the lengths."""
    lines = []
    lengths = sorted(figures)
    for length in lengths:
        runs = figures[length]
        for theirs, failed in runs.items():
            if "error" in failed and length == lengths[0]:  # tried at the first length only
                lines.append({"measurement": "long_generation", "new_tokens": length,
                              "trl": theirs, "ratio": None, **setting,
                              "trl_error": failed["error"]})
        for mine in (t for t in runs if t.startswith("align") and "error" not in runs[t]):
            for theirs in (t for t in runs if t.startswith("trl") and "error" not in runs[t]):
                lines.append({"measurement": "long_generation", "new_tokens": length,
                              "align": mine, "trl": theirs,
                              "ratio": speed_ratio(runs[mine], runs[theirs]), **setting,
                              **prefixed("align", runs[mine]), **prefixed("trl", runs[theirs])})
        if "align" in runs and "align_async" in runs:
            lines.append({"measurement": "async_over_sync", "new_tokens": length,
                          "ratio": speed_ratio(runs["align_async"], runs["align"]), **setting,
                          "sync_samples_per_s": runs["align"]["samples_per_s"],
                          "async_samples_per_s": runs["align_async"]["samples_per_s"]})
    growth: dict[str, Any] = {"measurement": "cost_growth", "new_tokens": lengths, **setting}
    tools = [t for t in figures[lengths[0]] if "error" not in figures[lengths[0]][t]]
    for tool in tools:
        growth[f"{tool}_iteration_s"] = [figures[n][tool].get("iteration_s") for n in lengths]
    for mine in (t for t in tools if t.startswith("align")):
        for theirs in (t for t in tools if t.startswith("trl")):
            growth[f"ratio_{mine}_{theirs}"] = [speed_ratio(figures[n][mine], figures[n][theirs])
                                               for n in lengths]
    if "align" in tools and "trl" in tools:
        growth["ratio"] = growth["ratio_align_trl"]
    lines.append(growth)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="128,256,512", help="new tokens, comma-separated")
    parser.add_argument("--tools", default=",".join(TOOLS), help="runs, comma-separated")
    parser.add_argument("--steps", type=int, default=3, help="GRPO iterations per run")
    parser.add_argument("--prompts", type=int, default=1, help="prompts per iteration (x 8)")
    harness.add_run_flags(parser, TOOLS, repeats=1,
                          quick="16 and 32 tokens, 2 steps, one run each")
    args = parser.parse_args()
    if harness.run_as_child(args, RUNNERS):
        return
    if args.quick:
        args.lengths, args.steps, args.repeats = "16,32", 2, 1
    tools = tuple(args.tools.split(","))
    unknown = set(tools) - set(TOOLS)
    if unknown:
        parser.error(f"unknown tools {sorted(unknown)}: choose from {', '.join(TOOLS)}")
    lengths = [int(n) for n in args.lengths.split(",")]
    load_before, start = os.getloadavg()[0], time.perf_counter()
    figures = measure(lengths, tools, args.steps, args.prompts, args.repeats, args.bf16,
                      args.ray_address)
    setting = {"prompts": args.prompts, "group": GROUP, "prompt_tokens": PROMPT_TOKENS,
               "steps": args.steps, "repeats": args.repeats,
               "dtype": "bfloat16" if args.bf16 else "float32",
               "load_1min": [round(load_before, 2), round(os.getloadavg()[0], 2)],
               "wall_s": round(time.perf_counter() - start)}
    for line in report_lines(figures, setting):
        print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
