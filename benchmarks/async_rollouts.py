"""Asynchronous against synchronous GRPO: iterations per second, same model, data and engine.

    python benchmarks/async_rollouts.py [--model runs/arithmetic/sft/final] [--iterations 12]

Both modes train GRPO (configs/arithmetic/grpo.yaml) with one separate vLLM engine
(`rollout.engine=vllm rollout.vllm.colocate=false`); the async runs add
`rollout.async_steps=1`, which gives the engine and the trainer one CPU core each. Runs
alternate sync, async, sync, async so drift of a shared machine hits both. Reported per mode:
iterations per second over the iterations after the first (start-up and the first sync
excluded), and the mean `time/overlap` and `time/wait` per iteration of the async runs.
Run it on an otherwise idle machine; compare within one run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "arithmetic" / "grpo.yaml"


def run(mode: str, model: str | None, iterations: int, out: Path, seed: int) -> list[dict]:
    from align.config import PPOConfig, load_config
    from align.tracking import read_metrics
    from align.trainers.registry import run_stage

    overrides = [f"output_dir={out}", "overwrite=true", f"trainer.max_steps={iterations}",
                 "trainer.log_every=1", "trainer.eval_every=0", "trainer.save_every=0",
                 "eval.max_samples=0", "rollout.engine=vllm", "rollout.vllm.colocate=false",
                 # the figures in benchmarks/README.md were measured at 32 prompts x 8
                 "rollout.prompts_per_step=32", "trainer.global_batch_size=256",
                 f"trainer.seed={seed}"]
    overrides.append(f"model.name_or_path={model}" if model else "model.name_or_path=embedded")
    if mode == "async":
        overrides.append("rollout.async_steps=1")
    run_stage("ppo", load_config(PPOConfig, CONFIG, overrides), show_progress=False)
    return [m for m in read_metrics(out / "metrics.jsonl") if "policy_loss" in m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="SFT folder (default: untrained embedded)")
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--rounds", type=int, default=2, help="runs per mode, alternating")
    args = parser.parse_args()
    rates: dict[str, list[float]] = {"sync": [], "async": []}
    overlap, wait = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for mode in ("sync", "async"):
                steps = run(mode, args.model, args.iterations, Path(tmp) / f"{mode}-{r}", r)
                timed = steps[1:]
                rates[mode].append(len(timed) / sum(m["step_seconds"] for m in timed))
                if mode == "async":
                    overlap += [m["time/overlap"] for m in timed]
                    wait += [m["time/wait"] for m in timed]
                print(f"round {r + 1} {mode:5s}: {rates[mode][-1]:.3f} iterations/s", flush=True)
    sync, asyn = statistics.median(rates["sync"]), statistics.median(rates["async"])
    print(f"\nsync  {sync:.3f} iterations/s\nasync {asyn:.3f} iterations/s"
          f"\nratio {asyn / sync:.2f}x  (async time/overlap {statistics.mean(overlap):.2f} s, "
          f"time/wait {statistics.mean(wait):.2f} s per iteration)")


if __name__ == "__main__":
    main()
