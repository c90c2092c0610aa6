"""Packed forward passes: how a model is told where packed sequences begin, and a start-up check
that a packed forward equals separate forwards on the model actually loaded.

Two ways to keep attention inside each sequence of a packed row (`STRATEGIES`):
  - `position_ids`: position ids restart at 0 and no attention mask is passed. Hugging Face
    models that build their mask from position ids then attend block-diagonally: sdpa and
    eager from a (rows, 1, W, W) mask, flash attention 2/3 through its varlen kernel (no mask).
  - `block_mask`: the same position ids plus a (rows, 1, W, W) block-diagonal causal mask we
    build, for models whose mask ignores position ids (OPT); sdpa and eager only.
`check_packing` tries them in that order on a tiny packed batch and keeps the first whose
outputs equal separate forwards; when none does, packing would let samples attend to each
other, and `resolve_packing` turns it off (or stops, when `data.packing: true` asked for it).
It also checks shared-prefix packing (`align.data.prefix_sharing`), whose mask lets sequences
that begin alike share their prefix: sdpa and eager only, where the model takes a 4D mask.

Worker-side functions take the model as the objectives get it: a DeepSpeed engine, a peft
model or a plain Hugging Face module.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from align.config import DataConfig
from align.data.layout import batch_layout
from align.data.packing import ONE_ROW, pack_sequences
from align.data.prefix_sharing import SharePrefix, pack_shared
from align.errors import ConfigError

logger = logging.getLogger(__name__)

STRATEGIES = ("position_ids", "block_mask")
MASKED = ("sdpa", "eager")  # implementations that take the 4D mask `block_mask` builds
CHECK_LENGTHS = (9, 6, 4)  # the check packs these into rows of CHECK_ROW: [9 + pad], [6 + 4]
CHECK_ROW = 10
CHECK_SHARED = (5, 3, 2)  # the shared check: a 5-token prefix, branches of 3 and 2 tokens
SHARED_CHECK = "shared_prefix"  # the shared check's entry in a verdict's `differences`


@dataclass(frozen=True)
class Packing:
    """How a stage packs: the boundary strategy and the row length (None: the longest
    sequence of each micro-batch; `ONE_ROW`: a micro-batch in one row); `share_prefix`: lay out
    common prefixes once (`align.data.prefix_sharing`), None: never."""

    attention: str
    row_length: int | None
    share_prefix: SharePrefix | None = None


# ------------------------------------------------------------------------- model access


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The Hugging Face model inside a DeepSpeed engine and/or peft wrapper (LoRA layers stay
    active inside it)."""
    hf = model.module if hasattr(model, "module") else model
    if hasattr(hf, "get_base_model"):
        hf = hf.get_base_model()
    return hf


def classifier_parts(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(backbone, head) of a sequence classifier, so the head can be applied at chosen tokens
    (every position for a critic, each packed sequence's last token for a reward model)."""
    hf = unwrap(model)
    head = getattr(hf, "score", None) or hf.classifier
    return getattr(hf, hf.base_model_prefix), head


def attn_implementation(model: torch.nn.Module) -> str:
    return str(getattr(unwrap(model).config, "_attn_implementation", None) or "eager")


def model_inputs(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The keyword inputs of a forward pass over `batch`, on the model's device, as the
    batch's layout gives them (`align.data.layout`), with any 4D mask in the form the model's
    attention takes."""
    device = next(model.parameters()).device
    return batch_layout(batch).model_inputs(batch, device,
                                            lambda allowed: _mask_for(model, allowed))


def _mask_for(model: torch.nn.Module, allowed: torch.Tensor) -> torch.Tensor:
    """A boolean 4D mask as the model's attention takes it: eager adds it to the scores."""
    if attn_implementation(model) != "eager":
        return allowed
    dtype = unwrap(model).dtype
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def head_outputs(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(rows, W) outputs of a one-label classifier's head at every position of `batch`.

    The head's full output is read with a forward hook while `model` itself runs (Hugging
    Face's classifier keeps only the last token's): a DeepSpeed engine's forward must run, or
    ZeRO-3 overwrites gradients accumulated over micro-batches.
    """
    _, head = classifier_parts(model)
    captured: list[torch.Tensor] = []
    handle = head.register_forward_hook(lambda _module, _args, out: captured.append(out))
    try:
        model(**model_inputs(model, batch), use_cache=False)
    finally:
        handle.remove()
    return captured[-1].squeeze(-1)


def hidden_states(model: torch.nn.Module, batch: dict[str, Any]) -> torch.Tensor:
    """(rows, W, H) last hidden states of a sequence classifier's backbone."""
    backbone, _ = classifier_parts(model)
    return backbone(**model_inputs(model, batch), use_cache=False).last_hidden_state


# ------------------------------------------------------------------------- the check


@torch.no_grad()
def check_packing(model: torch.nn.Module, kind: str) -> dict[str, Any]:
    """Whether a packed forward of this model equals separate forwards, and by which strategy.

    Packs three random sequences into two rows (one padded) and compares, token by token, the
    logits (causal LM) or backbone hidden states (sequence classifier) with one forward per
    sequence. Then the same for shared-prefix packing: two sequences with a common prefix in
    one unit, beside a third. Must run on every rank at once under ZeRO-3 (the forward gathers
    weights).

    Returns:
        `architecture`, `attn_implementation`, `attention` (the first strategy that matched, or
        None), `shared_prefix` (whether shared-prefix packing matched), `differences` (max
        absolute difference per layout tried), `tolerance` and `hidden_size`.
    """
    hf = unwrap(model)
    generator = torch.Generator().manual_seed(0)
    text_config = hf.config.get_text_config()
    sequences = [torch.randint(1, text_config.vocab_size, (n,), generator=generator).tolist()
                 for n in CHECK_LENGTHS]
    prefix, *branches = CHECK_SHARED
    shared = [sequences[0][:prefix + n] for n in branches] + [sequences[2]]
    shared[1][prefix:] = sequences[1][:branches[1]]  # a branch of its own, same prefix
    impl = attn_implementation(model)
    was_training = model.training
    model.eval()
    try:
        alone = {tuple(s): _alone(model, kind, s) for s in sequences + shared}
        scale = max(1.0, max(float(a.abs().max()) for a in alone.values()))
        tolerance = (1e-4 if hf.dtype == torch.float32 else 5e-2) * scale
        differences: dict[str, float] = {}
        chosen = None
        for strategy in STRATEGIES:
            if strategy == "block_mask" and impl not in MASKED:
                continue
            batch = pack_sequences(sequences, CHECK_ROW, 0, strategy, unpackable=True)
            differences[strategy] = _difference(model, kind, batch, sequences, alone)
            if differences[strategy] <= tolerance:
                chosen = strategy
                break
        if impl in MASKED:
            batch = pack_shared(shared, [[0, 1], [2]], CHECK_ROW, 0)
            differences[SHARED_CHECK] = _difference(model, kind, batch, shared, alone)
    finally:
        model.train(was_training)
    architectures = getattr(hf.config, "architectures", None) or [type(hf).__name__]
    return {"architecture": architectures[0], "attn_implementation": impl, "attention": chosen,
            "shared_prefix": differences.get(SHARED_CHECK, float("inf")) <= tolerance,
            "differences": differences, "tolerance": tolerance,
            "hidden_size": int(text_config.hidden_size)}


def _alone(model: torch.nn.Module, kind: str, sequence: list[int]) -> torch.Tensor:
    """Outputs of one sequence's own forward, (L, ...)."""
    return _outputs(model, kind, {"input_ids": torch.tensor([sequence]),
                                  "attention_mask": torch.ones(1, len(sequence),
                                                               dtype=torch.long)})[0]


def _difference(model: torch.nn.Module, kind: str, batch: dict[str, Any],
                sequences: list[list[int]], alone: dict[tuple[int, ...], torch.Tensor]
                ) -> float:
    """Largest absolute difference between a packed forward's outputs and separate ones."""
    packed = batch_layout(batch).to_padded(_outputs(model, kind, batch))
    return max(float((packed[i, :len(s)] - alone[tuple(s)]).abs().max())
               for i, s in enumerate(sequences))


def _outputs(model: torch.nn.Module, kind: str, batch: dict[str, Any]) -> torch.Tensor:
    if kind == "causal_lm":
        return model(**model_inputs(model, batch), use_cache=False).logits.float()
    return hidden_states(model, batch).float()


# ------------------------------------------------------------------------- driver side


def resolve_packing(data: DataConfig, verdict: dict[str, Any] | None,
                    role: str = "policy") -> Packing | None:
    """Decide how a role packs from `data.packing` and its workers' `check_packing` verdict.

    Raises:
        ConfigError: `data.packing: true` was set and packing would leak on this model.
    """
    if data.packing is False or verdict is None:
        return None
    if verdict["attention"] is None:
        worst = max(verdict["differences"].values(), default=float("nan"))
        message = (f"the {role} model ({verdict['architecture']}, "
                   f"{verdict['attn_implementation']} attention) lets packed samples attend to "
                   f"each other: a packed forward differs from separate forwards by {worst:.3g} "
                   f"(tolerance {verdict['tolerance']:.3g})")
        if data.packing:
            raise ConfigError(f"data.packing=true: {message}; set data.packing=false, or leave "
                              "it unset to pad such models automatically")
        logger.warning("%s; packing is off and batches are padded (set data.packing=false "
                       "to silence this)", message)
        return None
    return Packing(verdict["attention"], packing_length(data, verdict["attn_implementation"]),
                   share_prefix(data, verdict, role))


def share_prefix(data: DataConfig, verdict: dict[str, Any], role: str) -> SharePrefix | None:
    """Shared-prefix packing from `data.shared_prefix` and the check's verdict: unset, where
    the check passed and the estimate says it pays (per micro-batch); true, wherever the check
    passed.

    Raises:
        ConfigError: `data.shared_prefix: true` was set and the check failed.
    """
    if data.shared_prefix is False:
        return None
    if not verdict.get("shared_prefix"):
        if data.shared_prefix:
            worst = verdict["differences"].get(SHARED_CHECK)
            found = ("needs sdpa or eager attention" if worst is None else
                     f"differs from separate forwards by {worst:.3g}")
            raise ConfigError(
                f"data.shared_prefix=true: shared-prefix packing on the {role} model "
                f"({verdict['architecture']}, {verdict['attn_implementation']} attention) "
                f"{found}; set data.shared_prefix=false, or leave it unset")
        return None
    return SharePrefix(verdict["hidden_size"], always=bool(data.shared_prefix))


def packing_length(data: DataConfig, attn_impl: str) -> int | None:
    """`data.packing_length`, else: a micro-batch in one row for flash attention (its varlen
    kernel never computes across sequences, so nothing is padded at all); otherwise None, rows
    as wide as the micro-batch's longest sequence (sdpa and eager compute the whole W x W
    square of a row, so wider rows cost more per token: docs/performance.md)."""
    if data.packing_length is not None:
        return data.packing_length
    if "flash" in attn_impl:
        return ONE_ROW
    return None
