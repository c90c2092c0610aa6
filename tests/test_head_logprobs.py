"""`align.head_logprobs`: log-probs and entropies through a linear head equal a log-softmax
over the full logits, in values and in the gradients of the hidden states, weight and bias."""

from __future__ import annotations

import pytest
import torch

from align.head_logprobs import fused_head_logprobs


def reference(hidden, weight, bias, targets, temperature):
    logp = torch.log_softmax(torch.nn.functional.linear(hidden, weight, bias) / temperature, -1)
    return logp.gather(-1, targets[:, None])[:, 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("with_bias", [False, True])
def test_values_and_gradients_equal_a_log_softmax(temperature, with_bias):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = (torch.randn(50, 8, generator=g) * 2).requires_grad_()
    bias = torch.randn(50, generator=g, requires_grad=True) if with_bias else None
    targets = torch.tensor([0, 3, 49, 7, 7, 12])
    upstream = torch.randn(6, generator=g)
    inputs = [hidden, weight] + ([bias] if with_bias else [])

    want_logp, want_ent = reference(hidden, weight, bias, targets, temperature)
    want_grads = torch.autograd.grad((want_logp * upstream).sum(), inputs)
    logp, ent = fused_head_logprobs(hidden, weight, bias, targets, temperature, True)
    grads = torch.autograd.grad((logp * upstream).sum(), inputs)

    torch.testing.assert_close(logp, want_logp, atol=1e-5, rtol=0)
    torch.testing.assert_close(ent, want_ent.detach(), atol=1e-5, rtol=0)
    assert not ent.requires_grad
    for got, want in zip(grads, want_grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_without_entropy_and_without_gradient():
    hidden, weight = torch.randn(3, 4), torch.randn(10, 4)
    targets = torch.tensor([1, 2, 9])
    with torch.no_grad():
        logp, ent = fused_head_logprobs(hidden, weight, None, targets, 1.0, False)
    assert ent is None
    torch.testing.assert_close(logp, reference(hidden, weight, None, targets, 1.0)[0])
