"""What a DeepSpeed engine holds on this rank, in bytes: parameters, gradients, optimizer state.

Counted from the tensors themselves, not from the process's memory, in four groups: the
module's parameters (under ZeRO-3 also the rank's partition, `ds_tensor`), their `.grad`, the
optimizer state (what the torch optimizer's `state` and `param_groups` reach: Adam moments and,
under ZeRO, the fp32 master partitions it steps), and the ZeRO optimizer's other buffers
(gradient partitions, communication buckets). Each storage is counted once, in the first group
that reaches it, so a parameter that is a view into a flat buffer is not counted twice.
"""

from __future__ import annotations

from typing import Any

import torch

# How deep to follow an optimizer's attributes and containers (ZeRO wraps a torch optimizer
# whose `state` maps parameters to dicts of tensors: four levels reach every moment).
_MAX_DEPTH = 5


def held_tensor_bytes(engine: Any) -> dict[str, int]:
    """Bytes this rank holds: `{"parameters", "gradients", "optimizer", "buffers", "total"}`.

    Args:
        engine: a DeepSpeed engine (or anything with `.module` and `.optimizer`).
    """
    seen: set[int] = set()
    params = grads = 0
    for p in engine.module.parameters():
        params += _count(p.data, seen)
        if hasattr(p, "ds_tensor"):  # ZeRO-3: the rank's partition lives apart from p.data
            params += _count(p.ds_tensor, seen)
        if p.grad is not None:
            grads += _count(p.grad, seen)
    wrapper = getattr(engine, "optimizer", None)
    inner = getattr(wrapper, "optimizer", wrapper)  # ZeRO wraps the torch optimizer
    visited: set[int] = set()
    optimizer = _walk([getattr(inner, "state", None), getattr(inner, "param_groups", None)],
                      seen, visited, 0)
    buffers = _walk(wrapper, seen, visited, 0)
    return {"parameters": params, "gradients": grads, "optimizer": optimizer,
            "buffers": buffers, "total": params + grads + optimizer + buffers}


def _count(tensor: torch.Tensor, seen: set[int]) -> int:
    storage = tensor.untyped_storage()
    key = storage.data_ptr()
    if storage.nbytes() == 0 or key in seen:
        return 0
    seen.add(key)
    return storage.nbytes()


def _walk(obj: Any, seen: set[int], visited: set[int], depth: int) -> int:
    if obj is None or depth > _MAX_DEPTH or isinstance(obj, (str, bytes, int, float, bool)):
        return 0
    if isinstance(obj, torch.Tensor):
        return _count(obj, seen)
    if id(obj) in visited or isinstance(obj, torch.nn.Module):  # modules: counted above
        return 0
    visited.add(id(obj))
    if isinstance(obj, dict):
        children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set)):
        children = list(obj)
    elif hasattr(obj, "__dict__"):
        children = list(vars(obj).values())
    else:
        return 0
    return sum(_walk(child, seen, visited, depth + 1) for child in children)
