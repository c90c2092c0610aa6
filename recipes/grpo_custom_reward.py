"""GRPO with your own reward function, kept in a file beside this recipe.

    python recipes/grpo_custom_reward.py --output-dir runs/grpo_recipe [key=value ...]

1. SFT on demonstrations.
2. GRPO from the SFT model, rewarded by `arithmetic_rewards.py:digit_credit` (exact answers
   score 1, near misses partial credit) instead of the built-in exact match. The run still
   reports held-out exact match (`eval/accuracy`), judged by the task.
Write your function with TRL's signature, `fn(prompts, completions, **columns)`, and name it in
`rewards` as `path/to/file.py:function`.
"""

from __future__ import annotations

from pathlib import Path

from align.recipe import parse_args, run

RUNS = ("sft", "grpo")
REWARD = Path(__file__).resolve().parent / "arithmetic_rewards.py"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/grpo_recipe")
    out, extra = args.output_dir, dict(overrides=args.overrides, runs=RUNS, quiet=args.quiet)

    sft = run("sft", "arithmetic/sft.yaml", out / "sft", **extra)
    grpo = run("ppo", "arithmetic/grpo.yaml", out / "grpo",
               f"model.name_or_path={out / 'sft' / 'final'}",
               f"rewards=[{{spec: '{REWARD}:digit_credit', name: digit_credit}}]", **extra)

    print(f"SFT   held-out exact match  {sft['eval/accuracy']:.1%}")
    print(f"GRPO  held-out exact match  {grpo['eval/accuracy']:.1%}  (trained on digit_credit)")


if __name__ == "__main__":
    main()
