"""Worker-side functions of PPO-family training: log-probs, values, policy and value losses.

They run inside the role actors (see `Policy.infer` / `Policy.train_step`). Every tensor is in
the shifted layout: position t holds what concerns token t+1 (its log-prob, the value of the
state before it), so a (B, T) batch gives (B, T-1) per-token tensors; `response_mask` marks
the generated tokens.
"""

from __future__ import annotations

import torch

from align.advantages import kl_penalty
from align.losses import (
    IGNORE_INDEX,
    aggregate,
    entropy_from_logits,
    gather_logprobs,
    ppo_policy_loss,
    ppo_value_loss,
    sequence_level_logprobs,
)


def response_mask(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) float mask of generated tokens in the shifted layout."""
    return (batch["labels"][:, 1:] != IGNORE_INDEX).float()


def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor],
            temperature: float) -> torch.Tensor:
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                use_cache=False)
    # Log-probs must come from the distribution that was sampled: logits / temperature.
    return out.logits[:, :-1].float() / temperature


def token_logprobs(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                   temperature: float) -> torch.Tensor:
    """(B, T-1) log-probs of the generated tokens (0 elsewhere)."""
    return gather_logprobs(_logits(model, batch, temperature), batch["labels"][:, 1:])


def token_values(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, T-1) critic values of the state before each next token.

    The critic is a sequence-classification model (one score); its head is applied at every
    position instead of only the last, as OpenRLHF's critic does.
    """
    hf = model.module if hasattr(model, "module") else model  # DeepSpeed engine
    if hasattr(hf, "get_base_model"):  # peft: LoRA layers stay active inside
        hf = hf.get_base_model()
    backbone = getattr(hf, hf.base_model_prefix)
    hidden = backbone(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                      use_cache=False).last_hidden_state
    head = getattr(hf, "score", None) or hf.classifier
    return head(hidden).squeeze(-1)[:, :-1].float()


def ppo_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor], *,
                  temperature: float, clip_eps: float, clip_eps_high: float | None,
                  dual_clip: float | None, aggregation: str, normalizer: float,
                  kl_coef: float, kl_estimator: str, entropy_coef: float,
                  importance_sampling_level: str = "token"
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped policy loss (+ KL-to-reference loss term, - entropy bonus) of one micro-batch.

    `normalizer` is the global minibatch's token count ("token"), sequence count
    ("sequence") or sequence count x max_new_tokens ("constant"), so micro-batch losses add up
    to the minibatch loss whatever the split. `kl_coef` > 0 adds the KL as a loss term (the
    GRPO way); 0 when KL is in the reward. `importance_sampling_level` "sequence" clips GSPO's
    sequence-level ratio instead of each token's (`sequence_level_logprobs`); the KL and
    entropy terms stay per token.
    """
    logits = _logits(model, batch, temperature)
    mask = response_mask(batch)
    logp = gather_logprobs(logits, batch["labels"][:, 1:])
    ratio_logp = (sequence_level_logprobs(logp, batch["old_logprobs"], mask)
                  if importance_sampling_level == "sequence" else logp)
    policy_loss, clip_ratio = ppo_policy_loss(
        ratio_logp, batch["old_logprobs"], batch["advantages"], mask, clip_eps, clip_eps_high,
        dual_clip, aggregation, normalizer)
    loss = policy_loss
    kl = kl_penalty(logp, batch["ref_logprobs"], kl_estimator)
    if kl_coef:
        loss = loss + kl_coef * aggregate(kl, mask, aggregation, normalizer)
    entropy = entropy_from_logits(logits)
    if entropy_coef:
        loss = loss - entropy_coef * aggregate(entropy, mask, aggregation, normalizer)
    tokens = float(mask.sum())
    return loss, {
        "policy_loss": policy_loss.item(), "clip_ratio_sum": clip_ratio.item() * tokens,
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
