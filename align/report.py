"""Run reports: `report.md` with PNG plots, for one run or several (`align report RUN_DIR ...`).

What a person looks at first after a run: the loss of every stage per step; for the RL stages
the reward and the KL to the reference per iteration; where a gold reward was logged beside a
learned one (`reward/proxy`, `reward/gold`), both against the KL, so reward hacking shows as
the two curves parting; and held-out accuracy per run as bars. Plots are written with
matplotlib's file backend under `plots/` beside the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from align.errors import ConfigError
from align.tracking import read_metrics

# What eval/accuracy means in a stage's summary.
ACCURACY_KIND = {"rm": "pairwise"}


@dataclass
class Run:
    """One run folder's outputs."""

    name: str
    folder: Path
    summary: dict[str, Any] = field(default_factory=dict)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def series(self, key: str, x: str = "step") -> tuple[list[float], list[float]]:
        """(x values, key values) of the metric records that have both."""
        points = [(m[x], m[key]) for m in self.metrics if _number(m.get(key))
                  and _number(m.get(x))]
        return [p[0] for p in points], [p[1] for p in points]


def load_run(folder: str | Path, name: str | None = None) -> Run:
    """A run folder's summary.json and metrics.jsonl.

    Raises:
        ConfigError: the folder does not exist or holds neither file (not a run folder).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such run folder")
    summary_path, metrics_path = folder / "summary.json", folder / "metrics.jsonl"
    if not summary_path.is_file() and not metrics_path.is_file():
        raise ConfigError(f"{folder} has no metrics.jsonl or summary.json: give the output_dir "
                          "of an `align sft|rm|dpo|ppo` run")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    metrics = read_metrics(metrics_path) if metrics_path.is_file() else []
    return Run(name or folder.name, folder, summary, metrics)


def write_report(runs: list[Run], output: Path, title: str = "Report",
                 table: str | None = None) -> Path:
    """`output/report.md` with plots in `output/plots/`; returns the report's path."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    output.mkdir(parents=True, exist_ok=True)
    plots = output / "plots"
    plots.mkdir(exist_ok=True)
    parts = [f"# {title}", "", table or summary_table(runs), ""]
    accuracy = _accuracy_bars(runs, plots / "accuracy.png")
    if accuracy:
        parts += ["## Held-out accuracy", "", f"![held-out accuracy]({accuracy})", ""]
    for run in runs:
        parts += [f"## {run.name}", ""]
        if not run.metrics:
            parts += ["No metrics were logged for this run (metrics.jsonl is missing or "
                      "empty).", ""]
            continue
        for image, caption in _run_plots(run, plots):
            parts += [f"![{caption}]({image})", ""]
    path = output / "report.md"
    path.write_text("\n".join(parts))
    return path


def summary_table(runs: list[Run]) -> str:
    """A markdown table: held-out accuracy, steps, wall time and throughput of each run."""
    lines = ["| run | stage | held-out accuracy | steps | wall s | samples/s |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        s = run.summary
        acc = s.get("eval/accuracy")
        kind = ACCURACY_KIND.get(s.get("stage", ""), "exact match")
        shown = f"{100 * acc:.1f}% ({kind})" if acc is not None else "-"
        lines.append(f"| {run.name} | {s.get('stage', '-')} | {shown} | {s.get('steps', '-')} | "
                     f"{_fmt(s.get('wall_seconds'))} | {_fmt(s.get('samples_per_second'))} |")
    return "\n".join(lines)


def _run_plots(run: Run, plots: Path) -> list[tuple[str, str]]:
    """The plots of one run that its metrics allow: (relative image path, caption)."""
    made = []
    loss_key = "loss" if run.series("loss")[0] else "policy_loss"
    if run.series(loss_key)[0]:
        made.append(_line_plot(run, [loss_key, "eval/loss"], plots / f"{run.name}-loss.png",
                               f"{run.name}: {loss_key} per step"))
    if run.series("reward")[0]:
        made.append(_line_plot(run, ["reward", "kl"], plots / f"{run.name}-reward-kl.png",
                               f"{run.name}: reward and KL per iteration", twin=True))
    if run.series("reward/gold")[0]:
        made.append(_hacking_plot(run, plots / f"{run.name}-proxy-gold.png"))
    return [(f"plots/{path.name}", caption) for path, caption in made]


def _line_plot(run: Run, keys: list[str], path: Path, caption: str,
               twin: bool = False) -> tuple[Path, str]:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    axes = [ax, ax.twinx()] if twin else [ax, ax]
    colours = ["tab:blue", "tab:orange"]
    for axis, key, colour in zip(axes, keys, colours):
        xs, ys = run.series(key)
        if xs:
            axis.plot(xs, ys, color=colour, label=key, marker="." if len(xs) < 30 else None)
            if twin:
                axis.set_ylabel(key, color=colour)
    ax.set_xlabel("step")
    if not twin:
        ax.legend()
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, caption


def proxy_key(run: Run) -> str:
    """The proxy reward to set against the gold one: `reward/proxy` (what was trained on), or,
    where a reward was normalised (`rewards/<name>/shaped_mean` logged), that reward's raw
    score `rewards/<name>/mean`: the normalised proxy is centred by construction, so only the
    raw score shows what the policy pushed up."""
    for record in run.metrics:
        for key in record:
            if key.startswith("rewards/") and key.endswith("/shaped_mean"):
                return key.removesuffix("/shaped_mean") + "/mean"
    return "reward/proxy"


def _hacking_plot(run: Run, path: Path) -> tuple[Path, str]:
    """Proxy (trained-on) and gold (held-back) reward against KL to the reference."""
    import matplotlib.pyplot as plt

    caption = f"{run.name}: proxy and gold reward against KL (reward hacking shows as a gap)"
    fig, ax = plt.subplots(figsize=(6, 3.2))
    gold_axis = ax.twinx()
    for axis, key, colour in ((ax, proxy_key(run), "tab:blue"),
                              (gold_axis, "reward/gold", "tab:green")):
        xs, ys = run.series(key, x="kl")
        # Points, not a line: the KL does not grow monotonically from one iteration to the next.
        axis.plot(xs, ys, color=colour, marker=".", linestyle="none", label=key)
        axis.set_ylabel(key, color=colour)
    ax.set_xlabel("KL to the reference (per sequence)")
    ax.set_title(caption, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path, caption


def _accuracy_bars(runs: list[Run], path: Path) -> str | None:
    import matplotlib.pyplot as plt

    scored = [(r.name, r.summary["eval/accuracy"]) for r in runs
              if _number(r.summary.get("eval/accuracy"))]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(scored), 3.2))
    bars = ax.bar([n for n, _ in scored], [100 * a for _, a in scored], color="tab:blue")
    ax.bar_label(bars, fmt="%.1f%%", fontsize=8)
    ax.set_ylim(0, 105)
    ax.set_ylabel("held-out accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plots/{path.name}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _fmt(value: Any) -> str:
    return f"{value:.0f}" if _number(value) else "-"
