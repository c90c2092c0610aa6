"""Peak memory of one GRPO iteration on a 151,936-token vocabulary: align against TRL.

    python benchmarks/logits_memory.py [--seq 1024] [--repeats 2] [--quick] [--bf16]

The shape where the logits dominate: a Qwen2 architecture (hidden 256, 4 layers, 4 heads, 2
key-value heads, untied head) with Qwen2's vocabulary of 151,936 ids, one prompt of `seq / 2`
tokens and 4 completions of `seq / 2` new tokens (micro-batch 4 x `seq` tokens), one GRPO
iteration (generate, score, reference log-probs with a k3 KL of 0.04, one optimizer step).
The tokenizer is a byte-level BPE of exactly that size, built here (`save_model`): nothing is
downloaded. Random weights sample near-uniformly, so completions run to their full length
(EOS is one id in 151,936).

Three runs alternate (A B A B, fresh subprocesses, see `side_by_side.py`): align as shipped
(`trainer.logprob_chunk_size` 1,024), TRL 1.16's GRPOTrainer with its defaults, and align with
`trainer.logprob_chunk_size=0`, the full logits as every log-prob forward took them before the
chunked LM head. The peak is that of align's policy worker process (which generates, holds the
reference and trains) and of TRL's one process: the high-water mark of the resident set
(`VmHWM`) on CPU, torch's most allocated CUDA memory on a GPU. Both include the weights,
gradients and AdamW state of the 82M-parameter model. Prints one JSON line: the peaks, `ratio`
(align / TRL), `ratio_to_full_logits` (align / align with full logits) and each process tree's
peak RSS (align's includes Ray). `--quick`: 128-token sequences, one run each (a smoke test).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path
from typing import Any

from side_by_side import (
    VARIED_REWARD,
    RunSpec,
    add_run_flags,
    alternate,
    run_align_grpo,
    run_as_child,
    run_trl_grpo,
    varied_reward,
    write_prompts,
)

VOCAB = 151_936  # Qwen2's vocabulary
SPECIAL = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # Qwen2's, its EOS first
GROUP = 4  # completions per prompt: one prompt, one micro-batch of 4
LR = 1e-5
TOOLS = ("align", "trl", "align_full_logits")


def save_model(folder: Path) -> Path:
    """A random Qwen2 (hidden 256, 4 layers) and a byte-level BPE tokenizer of VOCAB ids: the
    256 byte symbols, no merges (one token a byte, so a prompt's length is exact), filler
    tokens `x0`, `x1`, ... that only sampling produces, and Qwen's three special tokens last.
    Qwen2's own tokenizer class (which `AutoTokenizer` picks for this model) reads it alike."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    fillers = (f"x{i}" for i in range(VOCAB - len(symbols) - len(SPECIAL)))
    words = [*symbols, *fillers, *SPECIAL]
    backend = Tokenizer(models.BPE({w: i for i, w in enumerate(words)}, []))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token=SPECIAL[0],
                                        pad_token=SPECIAL[0])
    torch.manual_seed(0)
    eos = VOCAB - len(SPECIAL)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, intermediate_size=1024, max_position_embeddings=4096,
        pad_token_id=eos, eos_token_id=eos, bos_token_id=None, tie_word_embeddings=False))
    model_dir = folder / "model-qwen2-v151936"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return model_dir


def process_peak_mb(*_: Any) -> float:
    """This process's peak memory (MB): torch's most allocated CUDA memory where it uses a GPU,
    else the high-water mark of its resident set. Takes (and ignores) `Policy.infer`'s
    arguments, so that align's policy worker can run it."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as status:
        line = next(ln for ln in status if ln.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024  # kB


def memory_kind() -> str:
    import torch

    return "cuda_allocated" if torch.cuda.is_available() else "rss_high_water"


def new_tokens(spec: RunSpec) -> int:
    return spec.max_length - spec.max_length // 2  # the prompt takes the other half


def align_runner(*overrides: str) -> Any:
    """The child run of align with `overrides`: one GRPO iteration, then the policy worker's
    peak, which the iteration logs as `memory/policy_peak_mb`."""

    def run(spec: RunSpec) -> dict[str, Any]:
        from align.tracking import read_metrics
        from align.trainers.ppo import PPOTrainer

        class PeakTrainer(PPOTrainer):
            def train_step(self, step: int) -> dict[str, float]:
                metrics = super().train_step(step)
                [[peak]] = self.group.call("infer", process_peak_mb, [{}])
                return {**metrics, "memory/policy_peak_mb": peak}

        run_align_grpo(spec, LR, GROUP, new_tokens(spec), VARIED_REWARD, *overrides,
                       trainer=PeakTrainer)
        peaks = [m["memory/policy_peak_mb"] for m in read_metrics(Path(spec.out) / "metrics.jsonl")
                 if "memory/policy_peak_mb" in m]
        return {"peak_mb": max(peaks), "memory": memory_kind()}

    return run


def run_trl(spec: RunSpec) -> dict[str, Any]:
    run_trl_grpo(spec, LR, GROUP, new_tokens(spec), varied_reward)
    return {"peak_mb": process_peak_mb(), "memory": memory_kind()}


RUNNERS = {"align": align_runner(), "trl": run_trl,
           "align_full_logits": align_runner("trainer.logprob_chunk_size=0")}


def measure(seq: int, repeats: int, bf16: bool, ray_address: str | None) -> dict[str, Any]:
    """Alternate the three runs `repeats` times; returns the JSON line (largest peaks)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        model_dir = save_model(folder)
        data = write_prompts(folder, 4, seq // 2)

        def spec_of(tool: str, r: int) -> RunSpec:
            return RunSpec(stage="grpo", model_dir=str(model_dir), data=str(data),
                           out=str(folder / f"{tool}-{r}"), steps=1, batch=GROUP,
                           max_length=seq, bf16=bf16, ray_address=ray_address)

        runs = alternate(__file__, TOOLS, repeats, spec_of, timeout_s=1800)
    peak = {t: max(r["peak_mb"] for r in runs[t]) for t in TOOLS}
    tree = {t: max(r["peak_rss_mb"] for r in runs[t]) for t in TOOLS}
    return {"model": "qwen2-h256-l4", "vocab": VOCAB, "micro_batch": GROUP,
            "prompt_tokens": seq // 2, "new_tokens": seq - seq // 2, "repeats": repeats,
            "dtype": "bfloat16" if bf16 else "float32", "memory": runs["align"][0]["memory"],
            **{f"{t}_peak_mb": round(peak[t]) for t in TOOLS},
            "ratio": round(peak["align"] / peak["trl"], 3),
            "ratio_to_full_logits": round(peak["align"] / peak["align_full_logits"], 3),
            **{f"{t}_tree_peak_rss_mb": round(tree[t]) for t in TOOLS}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq", type=int, default=1024, help="tokens per sequence (half new)")
    add_run_flags(parser, TOOLS, repeats=2, quick="128 tokens, one run each")
    args = parser.parse_args()
    if run_as_child(args, RUNNERS):
        return
    if args.quick:
        args.seq, args.repeats = 128, 1
    print(json.dumps(measure(args.seq, args.repeats, args.bf16, args.ray_address)), flush=True)


if __name__ == "__main__":
    main()
