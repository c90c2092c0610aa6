"""Writing a trained model in Hugging Face format: a full model, a peft adapter, or LoRA merged.

Weights are written as safetensors. The tokenizer goes beside them so the folder loads with
plain `from_pretrained` (or `PeftModel.from_pretrained` for an adapter).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align.errors import ModelError


def save_pretrained(model: torch.nn.Module, state: dict[str, torch.Tensor], tokenizer,
                    path: Path, merge_lora: bool = False) -> None:
    """Save `model`'s architecture with weights `state` (a full state dict) to `path`.

    Args:
        model: the live module (plain or peft-wrapped); only its structure and config are used.
        state: full (gathered) state dict matching `model.state_dict()` keys.
        tokenizer: written beside the weights.
        path: destination folder (created).
        merge_lora: for a peft model, write base + merged adapter as one plain model.

    Raises:
        ModelError: `state` lacks a tensor of the model or holds one it does not have (a
            model saved from it would be incomplete or silently different).
    """
    check_keys(model.state_dict().keys(), state, path)
    path.mkdir(parents=True, exist_ok=True)
    is_peft = hasattr(model, "peft_config")
    if is_peft and merge_lora:
        merged = _merged_copy(model, state)
        merged.save_pretrained(path, safe_serialization=True)
    elif is_peft:
        # peft picks the adapter weights (and the trained score head) out of the full state.
        model.save_pretrained(path, state_dict=state, safe_serialization=True)
    else:
        model.save_pretrained(path, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _merged_copy(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A CPU copy of the peft model with `state` loaded and the adapter merged into the base.

    Built fresh from the config (not deep-copied) because under ZeRO-3 the live parameters are
    partitioned placeholders.
    """
    from peft import get_peft_model

    base = model.get_base_model()
    is_classifier = base.__class__.__name__.endswith("ForSequenceClassification")
    auto = AutoModelForSequenceClassification if is_classifier else AutoModelForCausalLM
    fresh = auto.from_config(copy.deepcopy(base.config), dtype=next(iter(state.values())).dtype)
    adapter = model.active_adapter
    fresh = get_peft_model(fresh, copy.deepcopy(model.peft_config[adapter]))
    fresh.load_state_dict(state, strict=True)  # keys were checked by check_keys
    return fresh.merge_and_unload()


def check_keys(expected: Iterable[str], state: dict[str, torch.Tensor], path: Path) -> None:
    """Fail unless `state` has exactly the tensors named in `expected`."""
    expected = set(expected)
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelError(f"cannot save {path}: the weights do not fit the model "
                         f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
