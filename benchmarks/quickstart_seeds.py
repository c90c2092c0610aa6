"""The quickstart's story over seeds and thread counts: one table of held-out figures.

    python benchmarks/quickstart_seeds.py [--seeds 0,1,2,3,4] [--threads 1,2] [--jobs 2]
                                          [--output-dir runs/quickstart_seeds] [key=value ...]

Runs `align quickstart` once per (trainer.seed, torch threads per worker), each in its own
subprocess and folder (`OUTPUT_DIR/seed{S}-threads{T}`). The seed applies to every stage, so
each later stage runs from that SFT model with its own seed varied. A change in the number of
torch threads changes how sums are rounded, as another CPU does, so a stage that learns only
at a lucky moment shows up here. Runs already finished (their `report.json` exists) are read,
not rerun; `--fresh` reruns them. Prints one JSON line per run, then a markdown table with the
spread per stage and, per run, what breaks the story (`align.quickstart.story_violations`);
exits 1 when any run breaks it.

Runs are deterministic for a given seed and thread count on one machine, so `--jobs 2` (two
quickstarts side by side) changes their wall times, not their figures.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from align.quickstart import PIPELINE, accuracies, story_violations

RUNS = [name for name, *_ in PIPELINE]


def run_one(out: Path, seed: int, threads: int, overrides: list[str], fresh: bool) -> dict:
    """One quickstart; its accuracies, wall seconds and broken bounds."""
    folder = out / f"seed{seed}-threads{threads}"
    report = folder / "report.json"
    started = time.time()
    ran = fresh or not report.is_file()
    if ran:
        folder.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "align.cli", "quickstart", "--quiet",
                   "--output-dir", str(folder), f"trainer.seed={seed}",
                   f"distributed.torch_threads={threads}", *overrides]
        with (folder / "quickstart.log").open("w") as log:
            done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT,
                                  env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
        if done.returncode != 0:
            return {"seed": seed, "threads": threads, "error":
                    f"exit {done.returncode}: see {folder / 'quickstart.log'}"}
    summaries = json.loads(report.read_text())
    acc = accuracies(summaries)
    return {"seed": seed, "threads": threads, **acc,
            "stage_seconds": {s["run"]: round(s["wall_seconds"], 1) for s in summaries},
            # None for a run read back from an earlier invocation: its time is not this one's
            "wall_seconds": round(time.time() - started, 1) if ran else None,
            "broken": story_violations(acc)}


def markdown(results: list[dict]) -> str:
    """Per run one row of percentages, then the minimum and maximum of each stage."""
    rows = ["| seed | threads | " + " | ".join(RUNS) + " | story |",
            "|---|---|" + "---|" * len(RUNS) + "---|"]
    good = [r for r in results if "error" not in r]
    for r in results:
        if "error" in r:
            rows.append(f"| {r['seed']} | {r['threads']} | " + " | ".join("-" for _ in RUNS)
                        + f" | {r['error']} |")
            continue
        cells = " | ".join(f"{100 * r[n]:.1f}" for n in RUNS)
        rows.append(f"| {r['seed']} | {r['threads']} | {cells} | "
                    f"{'; '.join(r['broken']) or 'holds'} |")
    if good:
        for label, pick in (("min", min), ("max", max)):
            cells = " | ".join(f"{100 * pick(r[n] for r in good):.1f}" for n in RUNS)
            rows.append(f"| {label} | | {cells} | |")
    return "\n".join(rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--threads", default="1,2", help="torch threads per worker")
    parser.add_argument("--jobs", type=int, default=1, help="quickstarts side by side")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/quickstart_seeds"))
    parser.add_argument("--fresh", action="store_true", help="rerun finished runs too")
    parser.add_argument("overrides", nargs="*", help="key=value (or RUN:key=value) for all")
    args = parser.parse_intermixed_args()
    grid = [(int(s), int(t)) for s in args.seeds.split(",") for t in args.threads.split(",")]
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_one, args.output_dir, s, t, args.overrides, args.fresh)
                   for s, t in grid]
        results = []
        for future in futures:
            results.append(future.result())
            print(json.dumps(results[-1]), flush=True)
    table = markdown(results)
    print("\n" + table)
    (args.output_dir / "table.md").write_text(table + "\n")
    (args.output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    return int(any("error" in r or r["broken"] for r in results))


if __name__ == "__main__":
    sys.exit(main())
