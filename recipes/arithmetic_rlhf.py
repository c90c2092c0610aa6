"""The full pipeline on the embedded arithmetic task, one stage after another.

    python recipes/arithmetic_rlhf.py --output-dir runs/recipe [key=value ...]

SFT on imperfect demonstrations -> a reward model on preference pairs whose rejected answers miss
the tens digit either way, plus pairs mined from the SFT policy's own samples (`rm_mined.yaml`:
with the default seed, a model trained without the mined pairs never learnt the carry and PPO
exploited it) -> PPO against that reward model alone (with the exact-match gold reward logged
beside it, never trained on) -> and, from the same SFT model, DPO.
Each stage is one YAML from configs/arithmetic/, pointed at the previous stage's `final/`.
Copy this file and swap in your own configs to build your pipeline.
"""

from __future__ import annotations

from align.recipe import parse_args, run

RUNS = ("sft", "rm", "ppo_rm", "dpo")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/recipe")
    out, extra = args.output_dir, dict(overrides=args.overrides, runs=RUNS, quiet=args.quiet)

    sft = run("sft", "arithmetic/sft.yaml", out / "sft", **extra)
    sft_model = f"model.name_or_path={out / 'sft' / 'final'}"

    rm = run("rm", "arithmetic/rm_mined.yaml", out / "rm", sft_model,
             f"mining.policy={out / 'sft' / 'final'}", **extra)

    ppo = run("ppo", "arithmetic/ppo_rm.yaml", out / "ppo_rm", sft_model,
              f"rewards.0.spec={out / 'rm' / 'final'}", **extra)

    dpo = run("dpo", "arithmetic/dpo.yaml", out / "dpo", sft_model, **extra)

    print(f"SFT      held-out exact match  {sft['eval/accuracy']:.1%}")
    print(f"RM       held-out pairwise     {rm['eval/accuracy']:.1%}")
    print(f"PPO(RM)  held-out exact match  {ppo['eval/accuracy']:.1%}")
    print(f"DPO      held-out exact match  {dpo['eval/accuracy']:.1%}")


if __name__ == "__main__":
    main()
