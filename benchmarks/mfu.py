"""Model FLOPs utilisation of an align SFT run against the machine's measured fp32 matmul peak.

    python benchmarks/mfu.py [--hidden 512] [--layers 8] [--seq 512] [--batch 4] [--steps 4]

First the peak: the best rate of large square fp32 matmuls (`--matmul-size`, default 2048)
over several rounds, with torch using every core (on a GPU: its matmuls, bf16 with `--bf16`).
Then one align SFT run (one worker, ZeRO 0, fp32) of a Llama on the embedded byte-level
tokenizer, large enough to be matmul-bound, on plain-text rows of exactly `--seq` tokens
(arithmetic lines from `align.tasks.arithmetic`, joined). MFU = 6 x parameters x tokens per
step / step seconds / peak, with the step seconds align logs in metrics.jsonl
(`step_seconds`), step 1 (warm-up) left out, median over the rest. 6 x parameters x tokens
counts the matmuls of forward and backward, not attention's sequence-squared terms.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def matmul_peak_flops(size: int, bf16: bool = False, rounds: int = 5,
                      per_round: int = 4) -> float:
    """Best FLOP/s of `size`^3 matmuls over `rounds` (each `per_round` products): fp32 on the
    CPU, or on the GPU when there is one (bf16 with `bf16`)."""
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if bf16 else torch.float32
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    torch.matmul(a, b)  # warm-up
    sync()
    best = 0.0
    for _ in range(rounds):
        tick = time.perf_counter()
        for _ in range(per_round):
            torch.matmul(a, b)
        sync()
        best = max(best, 2 * size**3 * per_round / (time.perf_counter() - tick))
    return best


def save_model(folder: Path, hidden: int, layers: int, seq: int) -> tuple[Path, int]:
    """A Llama (heads of 64 dims, MLP 4x hidden) on the embedded tokenizer; returns its folder
    and parameter count."""
    from align.config import EmbeddedModelConfig, ModelConfig
    from align.model_loading import load_model, load_tokenizer

    cfg = ModelConfig(embedded=EmbeddedModelConfig(
        hidden_size=hidden, num_layers=layers, num_heads=max(1, hidden // 64),
        intermediate_size=4 * hidden, max_position_embeddings=seq))
    tokenizer = load_tokenizer(cfg)
    model = load_model(cfg, tokenizer)
    model_dir = folder / "model"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir, sum(p.numel() for p in model.parameters())


def write_text_rows(path: Path, num_rows: int, seq: int) -> Path:
    """`{text}` rows of exactly `seq` tokens: seq - 1 bytes plus the tokenizer's EOS."""
    from align.config import TaskConfig
    from align.tasks import arithmetic

    lines = [r["prompt"] + r["completion"] for r in
             arithmetic.sft_rows(TaskConfig(num_train=max(64, num_rows * seq // 8)))]
    text, rows = " ".join(lines), []
    for i in range(num_rows):
        start = (i * (seq - 1)) % max(1, len(text) - seq)
        rows.append({"text": text[start:start + seq - 1]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq", type=int, default=512, help="tokens per row")
    parser.add_argument("--batch", type=int, default=4, help="rows per optimizer step")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (>= 2)")
    parser.add_argument("--matmul-size", type=int, default=2048)
    parser.add_argument("--bf16", action="store_true",
                        help="GPU runs: train in bf16, against the bf16 matmul peak")
    parser.add_argument("--ray-address", help="join this Ray cluster instead of starting one")
    args = parser.parse_args()
    peak = matmul_peak_flops(args.matmul_size, args.bf16)
    from side_by_side import align_step_seconds

    from align.config import SFTConfig, load_config
    from align.trainers.sft import SFTTrainer

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir, params = save_model(folder, args.hidden, args.layers, args.seq)
        data = write_text_rows(folder / "text.jsonl", args.steps * args.batch, args.seq)
        cfg = load_config(SFTConfig, None, [
            f"output_dir={folder / 'run'}", f"model.name_or_path={model_dir}",
            f"data.train={data}", f"data.max_length={args.seq}",
            f"model.dtype={'bfloat16' if args.bf16 else 'float32'}",
            f"trainer.max_steps={args.steps}", f"trainer.global_batch_size={args.batch}",
            f"trainer.micro_batch_size={args.batch}", "trainer.scheduler=constant",
            "trainer.log_every=1", "eval.exact_match=false", "distributed.num_workers=1",
            "trainer.fused_adam=true",
            *([f"distributed.ray_address={args.ray_address}"] if args.ray_address else [])])
        SFTTrainer(cfg, show_progress=False).fit()
        seconds = statistics.median(align_step_seconds(folder / "run"))
    tokens = args.batch * args.seq
    achieved = 6 * params * tokens / seconds
    print(json.dumps({
        "matmul_size": args.matmul_size, "dtype": "bfloat16" if args.bf16 else "float32",
        "peak_gflops": round(peak / 1e9, 1),
        "hidden": args.hidden, "layers": args.layers, "seq": args.seq, "batch": args.batch,
        "parameters": params, "tokens_per_step": tokens, "step_seconds": round(seconds, 3),
        "achieved_gflops": round(achieved / 1e9, 1), "mfu": round(achieved / peak, 3)}))


if __name__ == "__main__":
    main()
