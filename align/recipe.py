"""What recipe scripts share: run one stage from a shipped config into a folder of a pipeline.

A recipe (`recipes/*.py`) chains stages top to bottom; each call here trains one of them and
returns its summary. Overrides given on a recipe's command line apply to every run, or,
written `RUN:key=value`, to the run of that name only (e.g. `grpo:rollout.prompts_per_step=8`).
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from align.errors import ConfigError
from align.trainers.registry import load_stage_config, run_stage

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def run(stage: str, config: str | Path, output_dir: str | Path, *wiring: str,
        overrides: Iterable[str] = (), runs: Iterable[str] | None = None,
        quiet: bool = False) -> dict[str, Any]:
    """Train `stage` from `config` into `output_dir` (replacing an earlier run of the recipe);
    `wiring` overrides connect it to earlier runs (e.g. `model.name_or_path=.../final`).

    Args:
        stage: sft, rm, dpo or ppo.
        config: a YAML file (relative paths: under the repository's `configs/`).
        output_dir: the run folder; its name is the run's name for scoped overrides.
        wiring: overrides this recipe always applies.
        overrides: the user's overrides (see the module docstring).
        runs: the recipe's run names, to reject a scoped override naming none of them.
        quiet: no progress bar.

    Returns:
        The run's summary (as in its summary.json).
    """
    path = Path(config)
    if not path.is_absolute() and not path.is_file():
        path = CONFIGS / path
    name = Path(output_dir).name
    extra = [f"output_dir={output_dir}", "overwrite=true", *wiring,
             *scoped_overrides(list(overrides), name, runs)]
    print(f"\n=== {name}: align {stage} {path} -> {output_dir}", flush=True)
    return run_stage(stage, load_stage_config(stage, path, extra), show_progress=not quiet)


def scoped_overrides(overrides: list[str], run: str,
                     runs: Iterable[str] | None = None) -> list[str]:
    """The overrides for one run: plain `key=value` ones, and `RUN:key=value` ones of `run`."""
    known = set(runs) if runs is not None else None
    chosen = []
    for item in overrides:
        key = item.split("=", 1)[0]
        scope, sep, _ = key.partition(":")
        if not sep:
            chosen.append(item)
            continue
        if known is not None and scope not in known:
            raise ConfigError(f"override '{item}': '{scope}' is not a run of this recipe "
                              f"({', '.join(sorted(known))})")
        if scope == run:
            chosen.append(item[len(scope) + 1:])
    return chosen


def parse_args(description: str, default_output: str,
               configure: Callable[[argparse.ArgumentParser], None] | None = None
               ) -> argparse.Namespace:
    """A recipe's command line: `--output-dir DIR`, `--quiet` and `[key=value ...]`, plus the
    options `configure` adds to the parser."""
    parser = argparse.ArgumentParser(description=description)
    if configure is not None:
        configure(parser)
    parser.add_argument("--output-dir", type=Path, default=Path(default_output))
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*",
                        help="key=value for every run, or RUN:key=value for one")
    return parser.parse_intermixed_args()  # options may follow the overrides
