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
