"""Streaming a policy's weights to rollout engines, in buckets of bounded size (worker side).

Every policy rank runs `send_weights` at once: under ZeRO-3 each bucket's parameters are
gathered collectively (only that bucket is ever materialised, never the whole model), and rank
0 sends the bucket to every engine, waits for them to load it, and frees it before the next.
Under ZeRO 0-2 rank 0 holds the full weights already and the other ranks return at once.

Names are the Hugging Face checkpoint names an engine loads (`model.layers.0.mlp.up_proj.weight`).
With LoRA the engine receives merged weights, W + scale * B @ A, computed out of place, so the
trained base weights are never touched (see docs/decisions.md). A bucket holds whole
transformer blocks: vLLM fuses q/k/v and gate/up into one layer, which it re-processes only
once all of its parts have arrived.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

BLOCK_INDEX = re.compile(r"\.(\d+)\.")


@dataclass
class WeightUnit:
    """One tensor the engine loads, and the parameters it is built from."""

    name: str
    params: list[torch.nn.Parameter]
    build: Callable[[], torch.Tensor]  # the full tensor; called with `params` gathered
    nbytes: int


def _numel(param: torch.nn.Parameter) -> int:
    return int(getattr(param, "ds_numel", param.numel()))  # ZeRO-3: the full size


def _plain(name: str, param: torch.nn.Parameter) -> WeightUnit:
    return WeightUnit(name, [param], lambda: param.data,
                      _numel(param) * param.element_size())


def _merged_lora(name: str, layer: Any) -> WeightUnit:
    """The base weight of a peft LoRA layer with its active adapters merged in."""
    base = layer.get_base_layer().weight
    adapters = [a for a in layer.active_adapters if a in layer.lora_A]
    params = [base] + [p for a in adapters
                       for p in (layer.lora_A[a].weight, layer.lora_B[a].weight)]

    def build() -> torch.Tensor:
        weight = base.data
        for adapter in adapters:
            weight = weight + layer.get_delta_weight(adapter).to(weight.dtype)
        return weight

    return WeightUnit(name, params, build, _numel(base) * base.element_size())


def weight_units(model: torch.nn.Module) -> list[WeightUnit]:
    """Every weight of `model` (plain, peft-wrapped, or inside a DeepSpeed engine) under its
    plain Hugging Face name, as in its `state_dict`: a parameter shared by two modules (tied
    embeddings) is sent under both names. vLLM on CPU keeps a processed copy of the LM head,
    refreshed only when `lm_head.weight` itself arrives (measured: without it, log-probs drift
    by ~0.1 after a sync)."""
    from peft.tuners.lora import LoraLayer

    while hasattr(model, "module"):  # DeepSpeed engine
        model = model.module
    if hasattr(model, "get_base_model"):  # peft: the model with the LoRA layers injected
        model = model.get_base_model()
    units: list[WeightUnit] = []
    skip: tuple[str, ...] = ()
    for prefix, module in model.named_modules():
        if skip and prefix.startswith(skip):
            continue
        dot = f"{prefix}." if prefix else ""
        if isinstance(module, LoraLayer):
            base = module.get_base_layer()
            units.append(_merged_lora(f"{dot}weight", module))
            if getattr(base, "bias", None) is not None:
                units.append(_plain(f"{dot}bias", base.bias))
            skip = (f"{dot}",)  # its base layer and adapters are covered
            continue
        skip = ()
        for name, param in module.named_parameters(recurse=False, remove_duplicate=False):
            units.append(_plain(f"{dot}{name}", param))
    return units


def buckets(units: list[WeightUnit], bucket_bytes: int) -> list[list[WeightUnit]]:
    """Consecutive units packed up to `bucket_bytes`, never splitting a transformer block
    (a block larger than the limit is one bucket of its own)."""
    blocks: list[list[WeightUnit]] = []
    key = None
    for unit in units:
        match = BLOCK_INDEX.search(unit.name)
        unit_key = match.group(1) if match else unit.name
        if blocks and unit_key == key:
            blocks[-1].append(unit)
        else:
            blocks.append([unit])
        key = unit_key
    out: list[list[WeightUnit]] = []
    size = 0
    for block in blocks:
        block_bytes = sum(u.nbytes for u in block)
        if out and size + block_bytes <= bucket_bytes:
            out[-1].extend(block)
            size += block_bytes
        else:
            out.append(list(block))
            size = block_bytes
    return out


def gathered_buckets(model: torch.nn.Module, bucket_bytes: int, zero_stage: int,
                     rank: int, device: str | None = "cpu"
                     ) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield each bucket as (name, tensor) pairs, on rank 0 only (an empty list elsewhere).

    Every rank must iterate to the end: under ZeRO-3 each bucket is an all-gather. Tensors are
    copied to `device` (None: left where the gathered parameters live, for an NCCL broadcast).
    """
    import deepspeed

    for bucket in buckets(weight_units(model), bucket_bytes):
        params = [p for unit in bucket for p in unit.params]
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if zero_stage == 3 else contextlib.nullcontext())
        with gather, torch.no_grad():
            if rank != 0:
                yield []
                continue
            yield [(u.name, u.build().detach().to(device, copy=True) if device else
                    u.build().detach()) for u in bucket]


def send_weights(model: torch.nn.Module, engines: list[Any], bucket_bytes: int,
                 zero_stage: int, rank: int, transport: str = "object_store") -> int:
    """Stream the weights to every engine actor; returns the tensors sent (0 off rank 0).

    `object_store`: each bucket goes once into Ray's object store and every engine reloads it
    in place. `nccl`: rank 0 broadcasts each tensor from its GPU to the engines' workers over
    the group set up by `NCCLWeightSender` (separate GPU engines).
    """
    import ray

    if zero_stage != 3 and rank != 0:
        return 0
    sender = None
    if transport == "nccl" and rank == 0:
        from align.rollout.nccl_sync import NCCLWeightSender

        sender = NCCLWeightSender.current()
    sent = 0
    for bucket in gathered_buckets(model, bucket_bytes, zero_stage, rank,
                                   device=None if sender else "cpu"):
        if rank != 0:
            continue
        if sender is not None:
            sender.send(bucket, engines)
        else:
            ref = ray.put(bucket)
            ray.get([engine.load_weights.remote(ref) for engine in engines])
            del ref
        sent += len(bucket)
    if rank == 0:
        ray.get([engine.finish_sync.remote() for engine in engines])
    return sent
