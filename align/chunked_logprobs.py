"""Per-token log-probs (and entropies) of a causal LM without its (tokens, V) logits.

At a 150k-token vocabulary the logits dominate a step's memory: at 4 x 1,100 tokens each fp32
copy of them is 2.7 GB, and a log-softmax over them keeps several alive for the backward. Here
the model runs to its final hidden states (its LM head applied at one position only, through
`logits_to_keep`), and the head then runs over chunks of the tokens that are scored: at most
(chunk, V) logits exist at a time, in fp32, divided by the temperature as before. A plain
linear head runs through `align.head_logprobs` (one fp32 copy of a chunk's logits at a time,
recomputed in the backward) unless the entropy's gradient is needed; otherwise, with
gradients, each chunk runs under `torch.utils.checkpoint`, so the backward recomputes its
logits instead of keeping every chunk's. Only tokens that have a target are scored (a
rollout's prompt tokens never reach the head).

`logprob_source(model, batch, chunk_size)` runs the forward and returns a `LogprobSource`,
which the batch layouts (`align.data.layout`) ask for the log-probs of (position, target)
pairs. `chunk_size` 0, or a model whose head cannot be separated from its forward (no
`logits_to_keep`, or logits that are not the head of the last hidden state, such as Gemma 2's
soft-capping), give the full logits as before; the latter is logged once per model.

The model is always called as a whole (a DeepSpeed engine's forward must run, or ZeRO-3
overwrites gradients accumulated over micro-batches): `output_hidden_states` returns the
final hidden states, which the check below compares with the head's own output once per model.
"""

from __future__ import annotations

import inspect
import logging
import math
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.checkpoint import checkpoint

from align.data.layout import Entropy
from align.head_logprobs import fused_head_logprobs
from align.losses import IGNORE_INDEX
from align.packed_forward import model_inputs, unwrap

logger = logging.getLogger(__name__)

FULL_LOGITS = 0  # chunk size that keeps the model's full logits

# Per Hugging Face model: its LM head where it can run apart from the forward, else None;
# and the models whose head has been checked against their own logits.
_HEADS: weakref.WeakKeyDictionary[torch.nn.Module, torch.nn.Module | None] = (
    weakref.WeakKeyDictionary())
_CHECKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


@dataclass
class LogprobSource:
    """What a forward left to read log-probs from: the final hidden states (rows, W, H) and
    the LM head, or the full logits (rows, W, V)."""

    hidden: torch.Tensor | None = None
    head: torch.nn.Module | None = None
    logits: torch.Tensor | None = None
    chunk_size: int = FULL_LOGITS

    def logprobs(self, positions: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                 entropy: Entropy = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Log-prob of each target under softmax(logits / temperature) at a flat position.

        Args:
            positions: any shape (e.g. (B, T-1)): flat position (row * W + column) whose
                logits predict the target; -1 where there is none.
            targets: same shape: target ids, IGNORE_INDEX where there is none.
            temperature: the sampling temperature the log-probs are taken at.
            entropy: "value" or "grad" also returns each distribution's entropy (nats),
                detached or with its gradient.

        Returns:
            (log-probs, entropies or None), float32, shaped like `positions`; 0 where the
            position is -1 or the target ignored.
        """
        states = self.hidden if self.logits is None else self.logits
        device = states.device
        positions, targets = positions.to(device), targets.to(device)
        valid = (positions >= 0) & (targets != IGNORE_INDEX)
        where, picked = positions[valid], targets[valid]
        rows = states.reshape(-1, states.shape[-1])[where]
        if self.logits is not None:
            logp, ent = _score(rows, picked, temperature, entropy)
        else:
            logp, ent = _chunked(rows, self.head, picked, temperature, entropy,
                                 self.chunk_size)
        zeros = torch.zeros(positions.shape, dtype=torch.float32, device=device)
        return (zeros.masked_scatter(valid, logp),
                None if ent is None else zeros.masked_scatter(valid, ent))


def logprob_source(model: torch.nn.Module, batch: dict[str, Any],
                   chunk_size: int = FULL_LOGITS) -> LogprobSource:
    """Run `model` (a DeepSpeed engine, peft model or Hugging Face causal LM) on `batch` as
    its layout gives it, keeping what per-token log-probs are read from: the final hidden
    states and the head with `chunk_size` > 0 where the head separates, else the logits."""
    inputs = model_inputs(model, batch)
    head = separable_head(model) if chunk_size > 0 else None
    if head is not None:
        out = model(**inputs, use_cache=False, logits_to_keep=1, output_hidden_states=True)
        hidden = out.hidden_states[-1]
        if _head_matches(model, head, hidden, out.logits):
            return LogprobSource(hidden=hidden, head=head, chunk_size=chunk_size)
    return LogprobSource(logits=model(**inputs, use_cache=False).logits)


def separable_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The output embeddings of the causal LM in `model`, if its forward can skip applying
    them (`logits_to_keep`) and has not been found to do more than apply them; else None."""
    hf = unwrap(model)
    if hf in _HEADS:
        return _HEADS[hf]
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    if head is None:
        _full_logits(hf, "it has no output embeddings")
    elif "logits_to_keep" not in inspect.signature(hf.forward).parameters:
        _full_logits(hf, "its forward takes no logits_to_keep")
        head = None
    else:
        _HEADS[hf] = head
    return head


@torch.no_grad()
def _head_matches(model: torch.nn.Module, head: torch.nn.Module, hidden: torch.Tensor,
                  logits: torch.Tensor) -> bool:
    """Whether the head on the last hidden state gives the model's own last logits (checked
    once per model: the same on every rank, so ZeRO-3 ranks take the same path)."""
    hf = unwrap(model)
    if hf in _CHECKED:
        return True
    ours = head(hidden[:, -1:]).float()
    theirs = logits[:, -1:].float()
    tolerance = 1e-4 * max(1.0, float(theirs.abs().max()))
    difference = float((ours - theirs).abs().max())
    _CHECKED.add(hf)
    if difference > tolerance:
        _full_logits(hf, f"its logits differ from its head on the last hidden state by "
                         f"{difference:.3g} (soft-capped or scaled logits)")
        return False
    return True


def _full_logits(hf: torch.nn.Module, why: str) -> None:
    _HEADS[hf] = None
    logger.warning("log-probs of %s come from its full logits (trainer.logprob_chunk_size "
                   "has no effect): %s", type(hf).__name__, why)


def _chunked(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor,
             temperature: float, entropy: Entropy, chunk_size: int
             ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`_score` of head(hidden) over chunks of `chunk_size` rows of hidden (N, H)."""
    count = _agreed_count(head, max(1, math.ceil(len(hidden) / chunk_size)), hidden.device)
    starts = [i * chunk_size for i in range(count)]  # past the end: empty chunks
    if _fusable(head) and entropy != "grad":
        parts = [fused_head_logprobs(hidden[i:i + chunk_size], head.weight, head.bias,
                                     targets[i:i + chunk_size], temperature, entropy == "value")
                 for i in starts]
    elif count == 1 or not torch.is_grad_enabled():
        # One chunk keeps its logits for the backward either way; no gradient keeps none.
        parts = [_score(head(hidden[i:i + chunk_size]), targets[i:i + chunk_size],
                        temperature, entropy) for i in starts]
    else:
        parts = [checkpoint(_score_head, head, hidden[i:i + chunk_size],
                            targets[i:i + chunk_size], temperature, entropy,
                            use_reentrant=False, preserve_rng_state=False)
                 for i in starts]
    logp = torch.cat([p[0] for p in parts])
    return logp, None if entropy == "none" else torch.cat([p[1] for p in parts])


def _fusable(head: torch.nn.Module) -> bool:
    """A plain linear head whose whole weight is on this rank (not a ZeRO-3 partition, whose
    gathering needs the module's own forward; not a LoRA-wrapped head)."""
    return type(head) is torch.nn.Linear and not hasattr(head.weight, "ds_id")


def _agreed_count(head: torch.nn.Module, count: int, device: torch.device) -> int:
    """The most chunks any rank has, where the head's weights are ZeRO-3 partitions: every
    call of the head gathers them, so every rank must call it as often (its own forward and
    the backward's recomputation alike); elsewhere `count`."""
    partitioned = any(hasattr(p, "ds_id") for p in head.parameters())
    if not (partitioned and dist.is_initialized() and dist.get_world_size() > 1):
        return count
    agreed = torch.tensor([count], device=device)
    dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
    return int(agreed.item())


def _score_head(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
                temperature: float, entropy: Entropy
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    return _score(head(hidden), targets, temperature, entropy)


def _score(logits: torch.Tensor, targets: torch.Tensor, temperature: float, entropy: Entropy
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(N,) log-probs of `targets` and entropies under softmax(logits (N, V) / temperature),
    in float32: bf16 log-probs lose the precision ratios and KL terms need."""
    logits = logits.float() / temperature
    logp = torch.log_softmax(logits, dim=-1)
    picked = torch.gather(logp, -1, targets.unsqueeze(-1)).squeeze(-1)
    if entropy == "none":
        return picked, None
    with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "grad"):
        ent = -(logp.exp() * logp).sum(-1)
    return picked, ent
