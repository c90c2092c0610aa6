"""Log-probs of targets through a linear LM head, holding one (N, V) copy of the logits.

`log_softmax` over head(hidden) / temperature keeps three (N, V) fp32 tensors alive at once
(the head's output, its division by the temperature, the log-softmax) and the backward adds a
fourth. Here the forward turns one fp32 copy into the log-sum-exp in place and keeps only
the hidden states and (N,) log-sum-exps for the backward, which recomputes the logits once
and turns them into their own gradient in place: one (N, V) tensor at a time either way (two
when the detached entropy is asked for). The maths is TRL's and Liger's fused linear
cross-entropy, in plain PyTorch, so it runs on any device.
"""

from __future__ import annotations

import torch


def fused_head_logprobs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                        targets: torch.Tensor, temperature: float, with_entropy: bool
                        ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-probs of `targets` under softmax((hidden @ weight.T + bias) / temperature).

    Args:
        hidden: (N, H) final hidden states.
        weight: (V, H) the head's weight; bias: (V,) or None.
        targets: (N,) token ids.
        temperature: the sampling temperature.
        with_entropy: also return each distribution's entropy, detached.

    Returns:
        (N,) float32 log-probs, differentiable in hidden, weight and bias; (N,) float32
        entropies (no gradient) or None.
    """
    logp, entropy = _HeadLogprobs.apply(hidden, weight, bias, targets, temperature,
                                        with_entropy)
    return logp, entropy if with_entropy else None


def _scaled_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   temperature: float) -> torch.Tensor:
    """A fresh fp32 (N, V) tensor of logits / temperature, free to be changed in place."""
    logits = torch.nn.functional.linear(hidden, weight, bias)
    logits = logits.float() if logits.dtype != torch.float32 else logits
    return logits.div_(temperature) if temperature != 1.0 else logits


class _HeadLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, with_entropy):
        z = _scaled_logits(hidden, weight, bias, temperature)
        picked = z.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
        top = z.amax(-1, keepdim=True)
        z.sub_(top)  # z - max: exp below cannot overflow
        if with_entropy:
            # H = log s1 - s2 / s1, s1 = sum exp(z - max), s2 = sum exp(z - max) (z - max)
            e = z.exp()
            s1 = e.sum(-1)
            s2 = (e.unsqueeze(-2) @ z.unsqueeze(-1)).reshape(-1)  # a row-wise dot, no (N, V)
            del e
            entropy = s1.log() - s2 / s1
        else:
            s1 = z.exp_().sum(-1)
            entropy = torch.zeros_like(s1)
        lse = top.squeeze(-1) + s1.log()
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return picked - lse, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        # d logp / d z = onehot(target) - softmax(z); z = logits / temperature
        grad = _scaled_logits(hidden, weight, bias, ctx.temperature)
        grad.sub_(lse.unsqueeze(-1)).exp_().mul_(-grad_logp.unsqueeze(-1))
        grad.scatter_add_(-1, targets.unsqueeze(-1), grad_logp.unsqueeze(-1))
        if ctx.temperature != 1.0:
            grad.div_(ctx.temperature)
        grad = grad.to(weight.dtype)
        grad_hidden = grad @ weight if ctx.needs_input_grad[0] else None
        grad_weight = grad.t() @ hidden if ctx.needs_input_grad[1] else None
        grad_bias = grad.sum(0) if bias is not None and ctx.needs_input_grad[2] else None
        return grad_hidden, grad_weight, grad_bias, None, None, None
