"""Per-rank memory of parameters, gradients and optimizer state under ZeRO 0, 2 and 3.

    python benchmarks/zero_memory.py [--model h256] [--stages 0,2,3] [--workers 1,2]

For each ZeRO stage and world size, starts align's policy workers (Ray actors, gloo on CPU,
fp32 AdamW), takes two optimizer steps of a causal-LM loss on random tokens, and asks every
rank what its DeepSpeed engine holds (`PolicyWorker.held_tensor_bytes`, counted from the
tensors, see `align.engine_memory`): parameters (with ZeRO-3's partition), gradients, optimizer
state (Adam moments and ZeRO's fp32 master partitions) and ZeRO's other buffers (gradient
partitions, communication buckets, reported apart). Figures are per rank, the largest over
ranks, measured between steps (gradient buffers a stage frees after its step are not in them).
`ratio` is parameters plus optimizer state divided by the same stage's figure with one worker.
Prints JSON lines, then a table.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

COLUMNS = ("zero_stage", "workers", "parameters_mb", "gradients_mb", "optimizer_mb",
           "params_plus_optimizer_mb", "ratio", "buffers_mb")


def lm_objective(model: Any, batch: dict, **_: Any) -> tuple[Any, dict[str, float]]:
    """Next-token loss on the batch's tokens (the figures do not depend on the data)."""
    return model(input_ids=batch["input_ids"], labels=batch["input_ids"]).loss, {}


def measure(model_dir: Path, zero_stage: int, workers: int, seq: int) -> dict[str, Any]:
    """Largest per-rank held bytes after two steps with `workers` ranks at `zero_stage`."""
    import torch

    from align.config import DistributedConfig, ModelConfig, TrainerConfig
    from align.distributed import PolicyWorker, WorkerGroup

    dist_cfg = DistributedConfig(num_workers=workers, zero_stage=zero_stage)
    trainer = TrainerConfig(global_batch_size=2 * workers, micro_batch_size=2,
                            scheduler="constant")
    group = WorkerGroup(PolicyWorker, dist_cfg, role="policy")
    try:
        group.call("setup", model_cfg=ModelConfig(name_or_path=str(model_dir)),
                   trainer_cfg=trainer, dist_cfg=dist_cfg, total_steps=2)
        batch = {"input_ids": torch.randint(3, 200, (2, seq))}
        for _ in range(2):  # the first step creates the optimizer state
            group.call_each("train_step", [[lm_objective, [batch]]] * workers)
        held = group.call("held_tensor_bytes")
    finally:
        group.shutdown()
    worst = max(held, key=lambda h: h["parameters"] + h["optimizer"])
    mb = {k: round(v / 2**20, 2) for k, v in worst.items()}
    return {"zero_stage": zero_stage, "workers": workers, "parameters_mb": mb["parameters"],
            "gradients_mb": mb["gradients"], "optimizer_mb": mb["optimizer"],
            "buffers_mb": mb["buffers"],
            "params_plus_optimizer_mb": round(mb["parameters"] + mb["optimizer"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="h256", choices=("embedded", "h256"))
    parser.add_argument("--stages", default="0,2,3", help="comma-separated ZeRO stages")
    parser.add_argument("--workers", default="1,2", help="comma-separated world sizes")
    parser.add_argument("--seq", type=int, default=16, help="tokens per row")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    args = parser.parse_args()
    from side_by_side import save_model

    from align.distributed import ensure_ray

    ensure_ray(args.ray_address)
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = save_model(args.model, Path(tmp))
        for stage in (int(s) for s in args.stages.split(",")):
            single = None
            for workers in (int(w) for w in args.workers.split(",")):
                line = measure(model_dir, stage, workers, args.seq)
                single = single or (line["params_plus_optimizer_mb"] if workers == 1 else None)
                line["ratio"] = round(line["params_plus_optimizer_mb"] / single, 3) if single \
                    else None
                print(json.dumps({"model": args.model, **line}), flush=True)
                lines.append(line)
    print("\n| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS))
    for line in lines:
        print("| " + " | ".join(str(line[c]) for c in COLUMNS) + " |")


if __name__ == "__main__":
    main()
