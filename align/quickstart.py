"""`align quickstart`: the embedded arithmetic task through every stage that exists.

Each stage runs from its YAML under `configs/arithmetic/`, writing to `OUTPUT_DIR/<stage>`;
a table of held-out exact-match accuracy is printed and `OUTPUT_DIR/report.md` written.
Reruns replace the quickstart's own outputs (overwrite=true).
"""

from __future__ import annotations

import json
from pathlib import Path

from align.errors import ConfigError
from align.tracking import read_metrics
from align.trainers.registry import load_stage_config, run_stage

# (run name, stage, config file, overrides wiring it to earlier runs' outputs; `{out}` in an
# override is replaced by the quickstart's output folder)
PIPELINE: list[tuple[str, str, str, list[str]]] = [
    ("sft", "sft", "sft.yaml", []),
    ("rm", "rm", "rm.yaml", ["model.name_or_path={out}/sft/final"]),
    ("grpo", "ppo", "grpo.yaml", ["model.name_or_path={out}/sft/final"]),
    ("ppo_rm", "ppo", "ppo_rm.yaml", ["model.name_or_path={out}/sft/final",
                                      "rewards.0.spec={out}/rm/final"]),
    ("dpo", "dpo", "dpo.yaml", ["model.name_or_path={out}/sft/final"]),
]
# What eval/accuracy means in each stage's summary.
ACCURACY_KIND = {"rm": "pairwise"}


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
    summaries = []
    for name, stage, filename, wiring in PIPELINE:
        run_dir = out / name
        extra = [f"output_dir={run_dir}", "overwrite=true",
                 *(w.format(out=out) for w in wiring), *scoped_overrides(overrides, name)]
        cfg = load_stage_config(stage, folder / filename, extra)
        print(f"\n=== {name}: align {stage} {folder / filename} -> {run_dir}")
        summary = run_stage(stage, cfg, show_progress=not quiet)
        summaries.append({"run": name, **summary})
    table = format_table(summaries)
    print("\n" + table)
    write_report(out, summaries, table)
    return summaries


def scoped_overrides(overrides: list[str] | None, run: str) -> list[str]:
    """Overrides for one run: plain `key=value` ones apply to every run, `RUN:key=value` ones
    only to that run (e.g. `grpo:rollout.prompts_per_step=8`)."""
    names = {name for name, *_ in PIPELINE}
    chosen = []
    for item in overrides or []:
        key = item.split("=", 1)[0]
        scope, sep, rest = key.partition(":")
        if not sep:
            chosen.append(item)
            continue
        if scope not in names:
            raise ConfigError(f"override '{item}': '{scope}' is not a quickstart run "
                              f"({', '.join(sorted(names))})")
        if scope == run:
            chosen.append(item[len(scope) + 1:])
    return chosen


def format_table(summaries: list[dict]) -> str:
    lines = ["| run | stage | held-out accuracy | steps | wall s | samples/s |",
             "|---|---|---|---|---|---|"]
    for s in summaries:
        acc = s.get("eval/accuracy")
        kind = ACCURACY_KIND.get(s["stage"], "exact match")
        shown = f"{100 * acc:.1f}% ({kind})" if acc is not None else "-"
        lines.append(f"| {s['run']} | {s['stage']} | {shown} | {s['steps']} | "
                     f"{s['wall_seconds']:.0f} | {s['samples_per_second']:.0f} |")
    return "\n".join(lines)


def write_report(out: Path, summaries: list[dict], table: str) -> None:
    parts = ["# Quickstart report", "", table, ""]
    for s in summaries:
        metrics = read_metrics(out / s["run"] / "metrics.jsonl")
        curve = [(m["step"], m.get("loss", m.get("reward"))) for m in metrics
                 if "loss" in m or "reward" in m]
        label = "loss" if any("loss" in m for m in metrics) else "reward"
        parts += [f"## {s['run']}", "", f"| step | {label} |", "|---|---|"]
        stride = max(1, len(curve) // 10)
        parts += [f"| {step} | {value:.4f} |" for step, value in curve[::stride]]
        gold = [(m["step"], m["reward/proxy"], m["reward/gold"]) for m in metrics
                if "reward/gold" in m]
        if gold:
            parts += ["", "| step | reward/proxy | reward/gold |", "|---|---|---|"]
            parts += [f"| {st} | {p:.3f} | {g:.3f} |" for st, p, g in gold[::stride]]
        parts.append("")
    (out / "report.md").write_text("\n".join(parts))
    (out / "report.json").write_text(json.dumps(summaries, indent=1) + "\n")
