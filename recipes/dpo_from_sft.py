"""DPO from an SFT model: the offline preference path, no reward model and no sampling.

    python recipes/dpo_from_sft.py --output-dir runs/dpo_recipe [key=value ...]

1. SFT on demonstrations (`configs/arithmetic/sft.yaml`).
2. DPO on preference pairs from the SFT model (`configs/arithmetic/dpo.yaml`: sigmoid DPO plus
   the NLL of the chosen answers, RPO), its reference the SFT model itself.
For your own data, point `data.train` of each config at your files (SFT rows
`{prompt, completion}` or `{messages}`, preference rows `{prompt, chosen, rejected}`).
"""

from __future__ import annotations

from align.recipe import parse_args, run

RUNS = ("sft", "dpo")


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], "runs/dpo_recipe")
    out, extra = args.output_dir, dict(overrides=args.overrides, runs=RUNS, quiet=args.quiet)

    sft = run("sft", "arithmetic/sft.yaml", out / "sft", **extra)
    dpo = run("dpo", "arithmetic/dpo.yaml", out / "dpo",
              f"model.name_or_path={out / 'sft' / 'final'}", **extra)

    print(f"SFT  held-out exact match  {sft['eval/accuracy']:.1%}")
    print(f"DPO  held-out exact match  {dpo['eval/accuracy']:.1%}  "
          f"(pairwise {dpo['eval/rewards/accuracies']:.1%} of held-out pairs preferred)")


if __name__ == "__main__":
    main()
