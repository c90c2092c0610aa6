"""`align quickstart`: the embedded arithmetic task through every stage that exists.

Each stage runs from its YAML under `configs/arithmetic/`, writing to `OUTPUT_DIR/<stage>`;
a table of held-out accuracy is printed and `OUTPUT_DIR/report.md` written with its plots
(see align.report).
Reruns replace the quickstart's own outputs (overwrite=true).
"""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import ConfigError
from align.recipe import run
from align.report import load_run, summary_table, write_report

# (run name, stage, config file, overrides wiring it to earlier runs' outputs; `{out}` in an
# override is replaced by the quickstart's output folder)
PIPELINE: list[tuple[str, str, str, list[str]]] = [
    ("sft", "sft", "sft.yaml", []),
    ("rm", "rm", "rm_quickstart.yaml", ["model.name_or_path={out}/sft/final"]),
    ("grpo", "ppo", "grpo.yaml", ["model.name_or_path={out}/sft/final"]),
    ("ppo_rm", "ppo", "ppo_rm_quickstart.yaml", ["model.name_or_path={out}/sft/final",
                                                 "rewards.0.spec={out}/rm/final"]),
    ("dpo", "dpo", "dpo.yaml", ["model.name_or_path={out}/sft/final"]),
]


# The story the quickstart tells, as bounds on held-out accuracy: imperfect demonstrations give
# a plateau well below 100%, a reward model that checks the carry, and preference and RL
# stages that see the truth climb far above the plateau.
SFT_PLATEAU = (0.40, 0.75)
RM_MIN_PAIRWISE = 0.95
CLIMB_OVER_SFT = 0.25
CLIMBING_RUNS = ("grpo", "ppo_rm", "dpo")


def story_violations(accuracy: dict[str, float]) -> list[str]:
    """How a quickstart's held-out accuracies (run name -> fraction) break its story; [] when
    they tell it: SFT within `SFT_PLATEAU`, the reward model at `RM_MIN_PAIRWISE` or above,
    and each of `CLIMBING_RUNS` at least `CLIMB_OVER_SFT` above SFT."""
    sft = accuracy["sft"]
    low, high = SFT_PLATEAU
    broken = []
    if not low <= sft <= high:
        broken.append(f"sft {100 * sft:.1f}% is outside its plateau "
                      f"{100 * low:.0f}-{100 * high:.0f}%")
    if accuracy["rm"] < RM_MIN_PAIRWISE:
        broken.append(f"rm {100 * accuracy['rm']:.1f}% pairwise is below "
                      f"{100 * RM_MIN_PAIRWISE:.0f}%")
    for name in CLIMBING_RUNS:
        if accuracy[name] < sft + CLIMB_OVER_SFT:
            broken.append(f"{name} {100 * accuracy[name]:.1f}% is less than "
                          f"{100 * CLIMB_OVER_SFT:.0f} points above sft's {100 * sft:.1f}%")
    return broken


def find_configs(explicit: str | None) -> Path:
    """The arithmetic config folder: the one given, else the repository's, else ./configs."""
    candidates = [Path(explicit)] if explicit else [
        Path(__file__).resolve().parents[1] / "configs" / "arithmetic",
        Path.cwd() / "configs" / "arithmetic"]
    for folder in candidates:
        if (folder / "sft.yaml").is_file():
            return folder
    raise ConfigError("cannot find configs/arithmetic/sft.yaml; pass --configs FOLDER")


def run_quickstart(output_dir: str, configs: str | None = None,
                   overrides: list[str] | None = None, quiet: bool = False) -> list[dict]:
    folder = find_configs(configs)
    out = Path(output_dir)
    names = [name for name, *_ in PIPELINE]
    summaries = []
    for name, stage, filename, wiring in PIPELINE:
        summary = run(stage, folder / filename, out / name,
                      *(w.format(out=out) for w in wiring), overrides=overrides or [],
                      runs=names, quiet=quiet)
        summaries.append({"run": name, **summary})
    runs = [load_run(out / s["run"], s["run"]) for s in summaries]
    table = summary_table(runs)
    print("\n" + table)
    report = write_report(runs, out, "Quickstart report", table)
    (out / "report.json").write_text(json.dumps(summaries, indent=1) + "\n")
    print(f"\nreport with plots: {report}")
    return summaries


def accuracies(summaries: list[dict]) -> dict[str, float]:
    """Run name -> held-out accuracy, from `run_quickstart`'s summaries (or report.json)."""
    return {s["run"]: float(s["eval/accuracy"]) for s in summaries}
