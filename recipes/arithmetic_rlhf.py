"""The full pipeline on the embedded arithmetic task, one stage after another.

    python recipes/arithmetic_rlhf.py --output-dir runs/recipe [key=value ...]

SFT on imperfect demonstrations -> a reward model on preference pairs -> PPO against that reward
model (with the exact-match gold reward logged beside it) -> and, from the same SFT model, DPO.
Each stage is one YAML from configs/arithmetic/, pointed at the previous stage's `final/`.
Copy this file and swap in your own configs to build your pipeline.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from align.trainers.registry import load_stage_config, run_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "arithmetic"


def run(stage: str, config: str, output_dir: Path, *overrides: str) -> dict:
    """Train one stage from its YAML; returns its summary.json contents."""
    cfg = load_stage_config(stage, CONFIGS / config,
                            [f"output_dir={output_dir}", "overwrite=true", *overrides])
    return run_stage(stage, cfg)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output-dir", type=Path, default=Path("runs/recipe"))
    parser.add_argument("overrides", nargs="*", help="applied to every stage")
    args = parser.parse_args()
    out, extra = args.output_dir, args.overrides

    sft = run("sft", "sft.yaml", out / "sft", *extra)
    sft_model = f"model.name_or_path={out / 'sft' / 'final'}"

    rm = run("rm", "rm.yaml", out / "rm", sft_model, *extra)

    ppo = run("ppo", "ppo_rm.yaml", out / "ppo_rm", sft_model,
              f"rewards.0.spec={out / 'rm' / 'final'}", *extra)

    dpo = run("dpo", "dpo.yaml", out / "dpo", sft_model, *extra)

    print(f"SFT      held-out exact match  {sft['eval/accuracy']:.1%}")
    print(f"RM       held-out pairwise     {rm['eval/accuracy']:.1%}")
    print(f"PPO(RM)  held-out exact match  {ppo['eval/accuracy']:.1%}")
    print(f"DPO      held-out exact match  {dpo['eval/accuracy']:.1%}")


if __name__ == "__main__":
    main()
