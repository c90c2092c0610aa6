"""The end-of-sequence ids a model stops at: its generation config's list, its config's, and
the tokenizer's. Passing only `tokenizer.eos_token_id` would drop the others (chat models often
list several), so every engine stops at this whole set."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.config import ModelConfig
from align.model_loading import config_source, is_embedded


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def eos_token_ids(model_cfg: ModelConfig, tokenizer: Any) -> list[int]:
    """Sorted EOS ids of the model in `model_cfg` with `tokenizer` (never empty)."""
    ids = set(_as_list(tokenizer.eos_token_id))
    # An adapter folder (a LoRA run's final/) stops where the model under it does.
    path = Path(config_source(model_cfg.name_or_path)).expanduser()
    if not is_embedded(model_cfg.name_or_path) and path.is_dir():
        from transformers import AutoConfig, GenerationConfig

        config = AutoConfig.from_pretrained(path, trust_remote_code=model_cfg.trust_remote_code)
        ids.update(_as_list(getattr(config, "eos_token_id", None)))
        if (path / "generation_config.json").is_file():
            ids.update(_as_list(GenerationConfig.from_pretrained(path).eos_token_id))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token")
    return sorted(ids)
