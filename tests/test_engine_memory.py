"""held_tensor_bytes counts parameters, gradients and optimizer state once each."""

from types import SimpleNamespace

import torch

from align.engine_memory import held_tensor_bytes


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def test_counts_parameters_gradients_and_adam_moments():
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    held = held_tensor_bytes(SimpleNamespace(module=model, optimizer=optimizer))
    params = list(model.parameters())
    moments = [t for state in optimizer.state.values() for t in state.values()]
    assert held["parameters"] == _nbytes(params) == 4 * (12 + 3)
    assert held["gradients"] == _nbytes(p.grad for p in params)
    assert held["optimizer"] == _nbytes(moments)  # exp_avg, exp_avg_sq, step of each
    assert held["buffers"] == 0
    assert held["total"] == held["parameters"] + held["gradients"] + held["optimizer"]


def test_shared_storage_and_partitions_are_counted_once():
    flat = torch.zeros(10)
    model = torch.nn.Linear(2, 2, bias=False)
    model.weight.data = flat[:4].view(2, 2)  # a view into a flat buffer, as ZeRO makes them
    model.weight.ds_tensor = torch.zeros(3)  # a ZeRO-3 partition held beside the data
    master = torch.zeros(3)  # the fp32 partition the torch optimizer steps
    inner = torch.optim.AdamW([master])
    wrapper = SimpleNamespace(optimizer=inner, flat_groups=[flat],
                              partitions={"p": model.weight.ds_tensor}, bucket=[torch.zeros(5)])
    held = held_tensor_bytes(SimpleNamespace(module=model, optimizer=wrapper))
    assert held["parameters"] == 4 * (10 + 3)  # the whole flat buffer, once, and the partition
    assert held["gradients"] == 0
    assert held["optimizer"] == 4 * 3  # the master partition (no moments before a step)
    assert held["buffers"] == 4 * 5  # only the tensor not already counted
