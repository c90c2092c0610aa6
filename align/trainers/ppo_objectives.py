"""Worker-side functions of PPO-family training: log-probs, values, policy and value losses.

They run inside the role actors (see `Policy.infer` / `Policy.train_step`). Every tensor is in
the shifted layout: position t holds what concerns token t+1 (its log-prob, the value of the
state before it), so a (B, T) batch gives (B, T-1) per-token tensors; `response_mask` marks
the generated tokens. Whatever the batch's layout (padded, packed or shared-prefix, see
`align.data.layout`), the forward runs on it as laid out and per-token results come back in
that padded layout.
"""

from __future__ import annotations

import torch

from align.advantages import kl_penalty
from align.chunked_logprobs import FULL_LOGITS, Entropy, logprob_source
from align.data.layout import batch_layout
from align.losses import (
    IGNORE_INDEX,
    aggregate,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_level_logprobs,
    truncated_importance_weights,
)
from align.packed_forward import head_outputs


def response_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) float mask of generated tokens in the shifted layout."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).float()


def _logprobs_and_entropy(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                          temperature: float, entropy: Entropy, chunk_size: int
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, T-1) log-probs of the generated tokens and (`entropy` "value" or "grad") the
    entropy of each next-token distribution, 0 off completions, whatever the batch's layout;
    through the LM head in chunks of `chunk_size` tokens (0: full logits)."""
    source = logprob_source(model, batch, chunk_size)
    # Log-probs must come from the distribution that was sampled: logits / temperature.
    logp, ent = batch_layout(batch).next_token_logprobs(source, batch, temperature, entropy)
    mask = response_mask(batch).to(logp.device)
    return logp * mask, None if ent is None else ent * mask


def token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   temperature: float, logprob_chunk_size: int = FULL_LOGITS) -> torch.Tensor:
    """(B, T-1) log-probs of the generated tokens (0 elsewhere); `logprob_chunk_size` as
    `trainer.logprob_chunk_size` (align.chunked_logprobs)."""
    return _logprobs_and_entropy(model, batch, temperature, "none", logprob_chunk_size)[0]


def token_values(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) critic values of the state before each next token.

    The critic is a sequence-classification model (one score); its head runs at every
    position and the model keeps only the last, so the head's full output is read with a
    hook, as OpenRLHF's critic reads every position. The call goes through `model` itself:
    a DeepSpeed engine's forward must run, or ZeRO-3 overwrites accumulated gradients.
    """
    values = head_outputs(model, batch).float()
    return batch_layout(batch).to_padded(values)[:, :-1]


def ppo_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                  temperature: float, clip_eps: float, clip_eps_high: float | None,
                  dual_clip: float | None, aggregation: str, normalizer: float,
                  kl_coef: float, kl_estimator: str, entropy_coef: float,
                  tis_cap: float | None = None, importance_sampling_level: str = "token",
                  logprob_chunk_size: int = FULL_LOGITS) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss (+ KL-to-reference loss term, - entropy bonus) of one micro-batch.

    `normalizer` is `aggregation_normalizer` of the global minibatch (its token count, its
    count of sequences with a generated token, or sequences x max_new_tokens for "constant"),
    so micro-batch losses add up to the minibatch loss whatever the split.
    `kl_coef` > 0 adds the KL as a loss term (the GRPO way); 0 when KL is in the reward.
    `tis_cap` weights each token by the truncated importance ratio trainer/engine
    (`batch["engine_logprobs"]`); None: off. `importance_sampling_level` "sequence" clips
    GSPO's sequence-level ratio instead of each token's (`sequence_level_logprobs`); the KL and
    entropy terms stay per token.

    A batch without `old_logprobs` is trained on by the weights that computed the rollout's
    experience, before any update from it (one update per rollout): its old log-probs are this
    forward's own, detached, so no separate forward computes them. The gap to the engine's
    sampling log-probs (`align.rollout.verify`) then comes back as `logprob_gap_sum` and
    `max_logprob_gap`. The entropy is logged always and differentiated only with
    `entropy_coef`; `logprob_chunk_size` as `token_logprobs`.
    """
    logp, entropy = _logprobs_and_entropy(model, batch, temperature,
                                          "grad" if entropy_coef else "value",
                                          logprob_chunk_size)
    mask = response_mask(batch).to(logp.device)
    old = batch.get("old_logprobs")
    gap_stats = {}
    if old is None:
        old = logp.detach()
        if "engine_logprobs" in batch:
            gap = (batch["engine_logprobs"].to(old.device) - old).abs() * mask
            gap_stats = {"logprob_gap_sum": float(gap.sum()),
                         "max_logprob_gap": float(gap.max()) if gap.numel() else 0.0}
    weights = (truncated_importance_weights(old, batch["engine_logprobs"], tis_cap)
               if tis_cap is not None else None)
    ratio_logp = (sequence_level_logprobs(logp, old, mask)
                  if importance_sampling_level == "sequence" else logp)
    policy_loss, clip_ratio = ppo_policy_loss(
        ratio_logp, old, batch["advantages"], mask, clip_eps, clip_eps_high,
        dual_clip, aggregation, normalizer, token_weights=weights)
    loss = policy_loss
    kl = kl_penalty(logp, batch["ref_logprobs"], kl_estimator)
    if kl_coef:
        loss = loss + kl_coef * aggregate(kl, mask, aggregation, normalizer)
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(entropy, mask, aggregation, normalizer)
    tokens = float(mask.sum())
    ratio = torch.exp(logp.detach() - old)  # 1 on policy, before any update
    return loss, {**gap_stats,
        "policy_loss": policy_loss.item(), "clip_ratio_sum": clip_ratio.item() * tokens,
        "ratio_sum": float((ratio * mask).sum()),
        "entropy_sum": float((entropy.detach() * mask).sum()),
        "kl_sum": float((kl.detach() * mask).sum()), "tokens": tokens,
    }


def value_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                    clip_eps: float | None, aggregation: str, normalizer: float
                    ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss of one micro-batch, normalised like `ppo_objective`."""
    values = token_values(model, batch)
    mask = response_mask(batch)
    loss, clip_ratio = ppo_value_loss(values, batch["old_values"], batch["returns"], mask,
                                      clip_eps, aggregation, normalizer)
    tokens = float(mask.sum())
    return loss, {"value_loss": loss.item(), "value_clip_ratio_sum": clip_ratio.item() * tokens,
                  "value_tokens": tokens}
