"""Every align-against-TRL benchmark: one JSON line per stage and model, then a table.

    python benchmarks/run_all.py [--stages sft,rm,dpo,dpo_lora,grpo] [--models embedded,h256]
                                 [--steps 20] [--repeats 2] [--bf16] [--vllm]
                                 [--compile] [--trl-compile]

Runs the stage scripts' comparisons (`sft_vs_trl.py`, `rm_vs_trl.py`, `dpo_vs_trl.py`,
`grpo_vs_trl.py`) with their default batches: align and TRL alternate A B A B, each run in a
fresh subprocess (see `side_by_side.py`). `--bf16` and `--vllm` are for GPU runs (vLLM applies
to GRPO only). `--compile` turns on align's `trainer.compile`, `--trl-compile` TRL's
`torch_compile`; the first optimizer step, which compiles, is never timed.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import dpo_vs_trl
import grpo_vs_trl
import rm_vs_trl
import sft_vs_trl
from side_by_side import MODELS, add_compile_flags, compare

HERE = Path(__file__).resolve().parent
# stage -> (script, its data writer, samples per optimizer step)
STAGES = {
    "sft": ("sft_vs_trl.py", sft_vs_trl.write_data, 64),
    "rm": ("rm_vs_trl.py", rm_vs_trl.write_data, 32),
    "dpo": ("dpo_vs_trl.py", dpo_vs_trl.write_data, 32),
    "dpo_lora": ("dpo_vs_trl.py", dpo_vs_trl.write_data, 32),
    "grpo": ("grpo_vs_trl.py", grpo_vs_trl.write_data, 64),
}
COLUMNS = ("stage", "model", "align_samples_per_s", "trl_samples_per_s", "ratio",
           "align_peak_rss_mb", "trl_peak_rss_mb")


def markdown_table(lines: list[dict]) -> str:
    rows = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    rows += ["| " + " | ".join(str(line[c]) for c in COLUMNS) + " |" for line in lines]
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--steps", type=int, default=20, help="optimizer steps per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each tool (A B A B)")
    parser.add_argument("--batch", type=int, default=None, help="override every stage's batch")
    parser.add_argument("--bf16", action="store_true", help="bf16 (GPU runs)")
    parser.add_argument("--vllm", action="store_true", help="GRPO: vLLM generation (GPU)")
    parser.add_argument("--ray-address", help="align joins this Ray cluster (RSS leaves it out)")
    add_compile_flags(parser)
    args = parser.parse_args()
    lines = []
    for stage in args.stages.split(","):
        script, write_data, batch = STAGES[stage]
        for model in args.models.split(","):
            line = compare(str(HERE / script), stage, model, write_data, args.steps,
                           args.batch or batch, args.repeats, lora=stage.endswith("_lora"),
                           bf16=args.bf16, vllm=args.vllm and stage == "grpo",
                           ray_address=args.ray_address, compile=args.compile,
                           trl_compile=args.trl_compile)
            print(json.dumps(line), flush=True)
            lines.append(line)
    print("\n" + markdown_table(lines))


if __name__ == "__main__":
    main()
