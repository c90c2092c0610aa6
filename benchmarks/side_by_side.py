"""Shared pieces of the align-against-TRL benchmarks: models, data, alternation, peak RSS.

Each stage script (`sft_vs_trl.py`, `rm_vs_trl.py`, `dpo_vs_trl.py`, `grpo_vs_trl.py`) is a
row: its data (`arithmetic_data`), its align half (`run_align_stage`: the stage and the
overrides that differ) and its TRL half (`run_trl_stage`: the trainer and the arguments that
differ), handed to `stage_main`. The parent process saves the model and the data once, then
runs the tools alternately (A B A B, `alternate`), each run in a fresh subprocess of the same
script (`--child TOOL`), so that start-up state, caches and peak memory never carry over
between runs. A child prints its figures as one JSON line after `RESULT`.

Throughput is measured the same way for both tools: samples per second over optimizer steps
2..N (step 1, with its one-time warm-up, is left out). align's per-step times are the
`step_seconds` it logs in metrics.jsonl; TRL's are the intervals between its `on_step_end`
callbacks. Peak RSS is the largest sum of resident memory over the child's whole process tree
(for align that includes Ray's own processes and its worker actors), sampled every 0.2 s;
with `--ray-address` (align joins a running Ray, as the smoke test does to start faster) the
cluster's processes are not the child's and are left out.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

MODELS = ("embedded", "h256")
TOOLS = ("align", "trl")
RESULT = "side-by-side result: "  # starts the line of figures a child run prints
ROWS = ("sft", "pairs", "prompts")  # the arithmetic rows a stage trains on (arithmetic_data)


@dataclass
class RunSpec:
    """What one run of either tool gets: identical for align and TRL."""

    stage: str  # sft, rm, dpo, dpo_lora, grpo
    model_dir: str  # a saved causal LM with its tokenizer
    data: str  # JSONL rows of the stage's shape
    out: str  # this run's output folder
    steps: int  # optimizer steps
    batch: int  # samples per optimizer step (GRPO: completions)
    max_length: int = 32  # tokens per example (prompt + completion)
    lora: bool = False  # LoRA (r 8, alpha 16, all linear layers) instead of full training
    bf16: bool = False  # bf16 on a GPU; fp32 otherwise
    vllm: bool = False  # GRPO: align's `vllm` engine; TRL's vLLM, colocated
    ray_address: str | None = None  # align joins this Ray cluster instead of starting one
    compile: bool = False  # align: trainer.compile (torch.compile of the trained model)
    trl_compile: bool = False  # TRL: TrainingArguments.torch_compile
    seed: int | None = None  # both tools' seed (align: trainer.seed, TRL: 42); None: defaults
    align_extra: list[str] = field(default_factory=list)  # more align overrides (an option
    # a benchmark sets to match TRL's behaviour)


def save_model(kind: str, folder: Path) -> Path:
    """Save the `embedded` model or the `h256` Llama (hidden 256, 4 layers, 4 heads, on the
    embedded tokenizer) with its tokenizer; returns the folder."""
    from align.config import EmbeddedModelConfig, ModelConfig
    from align.model_loading import load_model, load_tokenizer

    if kind == "embedded":
        cfg = ModelConfig()
    elif kind == "h256":
        cfg = ModelConfig(embedded=EmbeddedModelConfig(
            hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024))
    else:
        raise ValueError(f"unknown model '{kind}': choose from {', '.join(MODELS)}")
    tokenizer = load_tokenizer(cfg)
    model_dir = folder / f"model-{kind}"
    load_model(cfg, tokenizer).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_prompts(folder: Path, num: int, prompt_tokens: int) -> Path:
    """`num` prompts of `prompt_tokens` random letters (one token each on a byte-level
    tokenizer) in `folder/prompts.jsonl`."""
    import random
    import string

    rng = random.Random(0)
    rows = [{"prompt": "".join(rng.choices(string.ascii_lowercase, k=prompt_tokens))}
            for _ in range(num)]
    return write_jsonl(folder / "prompts.jsonl", rows)


def varied_reward(prompts: list[str], completions: list[Any], **_: Any) -> list[float]:
    """A reward that differs within a group (from the completion's length in characters), so
    that advantages, and the update, are not zero. align names it
    `side_by_side.py:varied_reward` (VARIED_REWARD)."""
    return [(len(str(c)) % 97) / 96 for c in completions]


VARIED_REWARD = f"{Path(__file__).resolve()}:varied_reward"  # align's reward spec for it


def task_config(num: int) -> Any:
    """Arithmetic task settings with `num` training rows and `num` preference pairs."""
    from align.config import TaskConfig

    return TaskConfig(num_train=num, num_pairs=num)


def arithmetic_data(rows: str) -> Callable[[Path, int], Path]:
    """A stage's `write_data(folder, num)`: `num` arithmetic rows written to `folder/ROWS.jsonl`,
    `sft` (prompt, completion), `pairs` (prompt, chosen, rejected) or `prompts` (prompt,
    answer)."""
    if rows not in ROWS:
        raise ValueError(f"unknown rows '{rows}': choose from {', '.join(ROWS)}")

    def write_data(folder: Path, num: int) -> Path:
        from align.tasks import arithmetic

        task = task_config(num)
        made = (arithmetic.sft_rows(task) if rows == "sft" else
                arithmetic.preference_rows(task, num) if rows == "pairs" else
                arithmetic.rl_rows(task, num))
        return write_jsonl(folder / f"{rows}.jsonl", made)

    return write_data


def align_overrides(spec: RunSpec) -> list[str]:
    """The config overrides every align run shares: model, data, steps, batch, fp32/bf16, and
    the optimizer kernel TRL uses (`adamw_torch_fused`)."""
    joined = [f"distributed.ray_address={spec.ray_address}"] if spec.ray_address else []
    if spec.seed is not None:
        joined.append(f"trainer.seed={spec.seed}")
    return [*joined, f"output_dir={spec.out}", f"model.name_or_path={spec.model_dir}",
            f"data.train={spec.data}", f"data.max_length={spec.max_length}",
            f"model.dtype={'bfloat16' if spec.bf16 else 'float32'}",
            f"model.lora.enabled={str(spec.lora).lower()}", f"trainer.max_steps={spec.steps}",
            "trainer.scheduler=constant", "trainer.log_every=1", "eval.exact_match=false",
            "trainer.fused_adam=true",  # TRL's default optimizer is torch's fused AdamW too
            f"trainer.compile={str(spec.compile).lower()}"]


def run_align_stage(spec: RunSpec, stage: str, lr: float, *overrides: str,
                    config_file: str | None = None, trainer: type | None = None) -> list[float]:
    """Train align's `stage` (sft, rm, dpo, ppo) as `spec` says, the batch in one micro-batch
    at learning rate `lr`, with the stage's own `overrides` (after `config_file`, a YAML, when
    given); returns the wall times of steps 2..N. `trainer` replaces the stage's Trainer class
    (a subclass that measures more)."""
    from align.trainers.registry import load_stage_config, trainer_class

    cfg = load_stage_config(stage, config_file, [
        *align_overrides(spec), f"trainer.global_batch_size={spec.batch}",
        f"trainer.micro_batch_size={spec.batch}", f"trainer.lr={lr}", *overrides])
    (trainer or trainer_class(stage))(cfg, show_progress=False).fit()
    return align_step_seconds(spec.out)


def run_align_grpo(spec: RunSpec, lr: float, group: int, new_tokens: int, reward: str,
                   *overrides: str, trainer: type | None = None) -> list[float]:
    """align's GRPO (`run_align_stage` of ppo): `group` completions per prompt (batch / group
    prompts per step) of at most `new_tokens` tokens at temperature 1, scored by `reward`
    (`module:function` or `file.py:function`), a k3 KL term (0.04) to the initial model, one
    pass over each batch; generation by the `hf` engine, or vLLM with `spec.vllm`."""
    rewards = Path(spec.out).with_suffix(".yaml")  # a list: easier in YAML than as overrides
    rewards.write_text(f"rewards:\n  - spec: {reward}\n")
    return run_align_stage(
        spec, "ppo", lr, f"rollout.engine={'vllm' if spec.vllm else 'hf'}",
        f"rollout.prompts_per_step={spec.batch // group}",
        f"rollout.n_samples_per_prompt={group}", f"rollout.max_new_tokens={new_tokens}",
        "rollout.temperature=1.0", "algorithm.estimator=grpo", "algorithm.kl_coef=0.04",
        "algorithm.kl_estimator=k3", "algorithm.ppo_epochs=1", *overrides,
        config_file=str(rewards), trainer=trainer)


def align_step_seconds(out: str | Path) -> list[float]:
    """Wall times of steps 2..N, as align logged them in `out/metrics.jsonl` (log_every=1)."""
    from align.tracking import read_metrics

    return [r["step_seconds"] for r in read_metrics(Path(out) / "metrics.jsonl")
            if "step_seconds" in r][1:]


def trl_common_args(spec: RunSpec) -> dict[str, Any]:
    """TrainingArguments every TRL run shares (bf16 off unless asked: TRL defaults to it)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    return dict(output_dir=spec.out, max_steps=spec.steps, lr_scheduler_type="constant",
                bf16=spec.bf16, fp16=False, use_cpu=not spec.bf16, report_to=[],
                logging_steps=10_000, save_strategy="no", dataloader_num_workers=0,
                seed=42 if spec.seed is None else spec.seed, torch_compile=spec.trl_compile)


def trl_lora_config(spec: RunSpec) -> Any:
    if not spec.lora:
        return None
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear",
                      task_type="CAUSAL_LM")


def run_trl_stage(spec: RunSpec, name: str, lr: float, load_model: bool = True,
                  trainer_kwargs: dict[str, Any] | None = None, trainer: type | None = None,
                  **config: Any) -> list[float]:
    """Train TRL's `{name}Trainer` (SFT, Reward, DPO, GRPO) with its `{name}Config` as `spec`
    says, the batch on one device at learning rate `lr`, with the stage's own `config`
    arguments; returns the wall times of steps 2..N. `load_model`: hand the trainer an
    `AutoModelForCausalLM`, else the model's folder for it to load its own way.
    `trainer_kwargs`: further arguments of the trainer (GRPO's `reward_funcs`). `trainer`
    replaces the Trainer class (a subclass that measures more)."""
    import trl
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    args = getattr(trl, f"{name}Config")(**trl_common_args(spec), learning_rate=lr,
                                         per_device_train_batch_size=spec.batch, **config)
    model = AutoModelForCausalLM.from_pretrained(spec.model_dir) if load_model else spec.model_dir
    trainer = (trainer or getattr(trl, f"{name}Trainer"))(
        model=model, args=args, train_dataset=load_dataset("json", data_files=spec.data)["train"],
        processing_class=AutoTokenizer.from_pretrained(spec.model_dir),
        peft_config=trl_lora_config(spec), **(trainer_kwargs or {}))
    return train_trl(trainer)


def run_trl_grpo(spec: RunSpec, lr: float, group: int, new_tokens: int,
                 reward: Callable[..., list[float | None]], trainer: type | None = None,
                 **config: Any) -> list[float]:
    """TRL's GRPOTrainer as `run_align_grpo` runs align's: `group` completions per prompt of
    at most `new_tokens` tokens at temperature 1, scored by `reward`, beta 0.04; its own
    `generate`, or vLLM colocated with `spec.vllm`. `trainer`: a GRPOTrainer subclass."""
    return run_trl_stage(spec, "GRPO", lr, load_model=False, trainer=trainer,
                         trainer_kwargs={"reward_funcs": [reward]}, num_generations=group,
                         max_completion_length=new_tokens, temperature=1.0, beta=0.04,
                         use_vllm=spec.vllm, vllm_mode="colocate", **config)


def train_trl(trainer: Any) -> list[float]:
    """Train a TRL trainer; returns the intervals between consecutive optimizer-step ends
    (the wall times of steps 2..N)."""
    from transformers import TrainerCallback

    ends: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            ends.append(time.perf_counter())

    trainer.add_callback(StepClock())
    trainer.train()
    return [b - a for a, b in zip(ends, ends[1:])]


def samples_per_second(step_seconds: list[float], batch: int) -> float:
    """Samples/s over the timed steps; raises when there are none (run at least 2 steps)."""
    if not step_seconds or sum(step_seconds) <= 0:
        raise RuntimeError("no timed steps: step 1 is not timed, run at least 2 steps")
    return batch * len(step_seconds) / sum(step_seconds)


# ------------------------------------------------------------------ subprocess runs


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        proc = psutil.Process(pid)
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_child(script: str, tool: str, spec: RunSpec, timeout_s: float) -> dict[str, Any]:
    """Run one tool in a fresh `python script --child tool`; returns the figures it printed
    last (its samples/s, or whatever else the script reports) and the peak RSS (MB) of its
    process tree."""
    cmd = [sys.executable, script, "--child", tool, "--spec", json.dumps(asdict(spec))]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.2):
            peak = max(peak, _tree_rss(proc.pid))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
    done.set()
    sampler.join()
    lines = [ln[len(RESULT):] for ln in stdout.splitlines() if ln.startswith(RESULT)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{tool} {spec.stage} run failed (exit {proc.returncode}):\n"
                           f"{stderr[-3000:]}")
    return {**json.loads(lines[-1]), "peak_rss_mb": peak / 2**20}


def alternate(script: str, tools: tuple[str, ...], repeats: int,
              spec_of: Callable[[str, int], RunSpec],
              timeout_s: float = 900.0) -> dict[str, list[dict[str, Any]]]:
    """Run every tool once per repeat, in turn (A B A B), each `run_child` on `spec_of(tool,
    repeat)`; returns each tool's figures, one dict per run."""
    results: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
    for r in range(repeats):
        for tool in tools:  # A B A B: drift of the shared host hits every tool alike
            results[tool].append(run_child(script, tool, spec_of(tool, r), timeout_s))
    return results


def compare(script: str, stage: str, model: str, write_data: Callable[[Path, int], Path],
            steps: int, batch: int, repeats: int, timeout_s: float = 900.0,
            **spec_kwargs: Any) -> dict[str, Any]:
    """Alternate align and TRL `repeats` times each on one model; returns the JSON line."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = save_model(model, folder)
        data = write_data(folder, steps * batch)

        def spec_of(tool: str, r: int) -> RunSpec:
            return RunSpec(stage=stage, model_dir=str(model_dir), data=str(data),
                           out=str(folder / f"{tool}-{r}"), steps=steps, batch=batch,
                           **spec_kwargs)

        results = alternate(script, TOOLS, repeats, spec_of, timeout_s)
    sps = {t: statistics.median(x["samples_per_s"] for x in results[t]) for t in TOOLS}
    rss = {t: max(x["peak_rss_mb"] for x in results[t]) for t in TOOLS}
    return {"stage": stage, "model": model,
            "align_samples_per_s": round(sps["align"], 2),
            "trl_samples_per_s": round(sps["trl"], 2),
            "ratio": round(sps["align"] / sps["trl"], 3) if sps["trl"] else None,
            "align_peak_rss_mb": round(rss["align"]), "trl_peak_rss_mb": round(rss["trl"])}


def add_compile_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--compile", action="store_true",
                        help="align with trainer.compile=true (torch.compile)")
    parser.add_argument("--trl-compile", action="store_true",
                        help="TRL with torch_compile=True")


def add_child_flags(parser: argparse.ArgumentParser, tools: tuple[str, ...]) -> None:
    """The hidden flags of a child run: which tool, and its RunSpec as JSON."""
    parser.add_argument("--child", choices=tools, help=argparse.SUPPRESS)
    parser.add_argument("--spec", help=argparse.SUPPRESS)


def add_run_flags(parser: argparse.ArgumentParser, tools: tuple[str, ...], repeats: int,
                  quick: str) -> None:
    """The flags a comparison script shares: `--repeats` (default `repeats`), `--bf16`,
    `--quick` (`quick`: its help, what the smoke test runs), `--ray-address`, and a child
    run's hidden flags."""
    parser.add_argument("--repeats", type=int, default=repeats, help="runs of each (A B A B)")
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU runs)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--ray-address", help="align joins this Ray cluster (RSS leaves it out)")
    add_child_flags(parser, tools)


def run_as_child(args: argparse.Namespace,
                 runners: dict[str, Callable[[RunSpec], dict[str, Any]]]) -> bool:
    """With `--child TOOL`: run that tool once on `--spec` and print its figures after
    `RESULT`; returns whether this process was a child run."""
    if not args.child:
        return False
    figures = runners[args.child](RunSpec(**json.loads(args.spec)))
    print(RESULT + json.dumps(figures), flush=True)
    return True


def _throughput(run: Callable[[RunSpec], list[float]]) -> Callable[[RunSpec], dict[str, Any]]:
    """A runner returning step times, made one returning samples/s."""
    return lambda spec: {"samples_per_s": samples_per_second(run(spec), spec.batch)}


def stage_main(script: str, stages: tuple[str, ...], default_batch: int,
               write_data: Callable[[Path, int], Path],
               runners: dict[str, Callable[[RunSpec], list[float]]]) -> None:
    """Command line of a stage script: the comparison, or (`--child`) one run of one tool."""
    parser = argparse.ArgumentParser(description=sys.modules["__main__"].__doc__)
    parser.add_argument("--stage", choices=stages, default=stages[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--batch", type=int, default=default_batch, help="samples per step")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool (A B A B)")
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU runs)")
    parser.add_argument("--vllm", action="store_true", help="GRPO: vLLM generation (GPU)")
    parser.add_argument("--ray-address", help="align joins this Ray cluster (RSS leaves it out)")
    add_compile_flags(parser)
    add_child_flags(parser, TOOLS)
    args = parser.parse_args()
    if run_as_child(args, {tool: _throughput(run) for tool, run in runners.items()}):
        return
    for model in args.models.split(","):
        line = compare(script, args.stage, model, write_data, args.steps, args.batch,
                       args.repeats, lora=args.stage.endswith("_lora"), bf16=args.bf16,
                       vllm=args.vllm, ray_address=args.ray_address, compile=args.compile,
                       trl_compile=args.trl_compile)
        print(json.dumps(line), flush=True)
