"""The end-of-sequence ids a model stops at: its generation config's list, its config's, and
the tokenizer's. Passing only `tokenizer.eos_token_id` would drop the others (chat models often
list several), so every engine stops at this whole set.

A hub id is resolved as transformers resolves it (the local cache, else the hub): Llama-3.2's
`generation_config.json` lists 128001 and 128008 beside the tokenizer's 128009. A file that
cannot be had (not in the repository, or offline and not cached) leaves the other sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from align.config import ModelConfig
from align.model_loading import config_source, is_embedded


def _as_list(value: Any) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple)) else [int(value)]


def _config_eos_ids(name_or_path: str, trust_remote_code: bool) -> list[int]:
    """EOS ids of the model's `config.json` and `generation_config.json` (a folder or hub id),
    each skipped where it cannot be found or fetched.

    The Hugging Face cache is read first: loading the model has put both files there, and a
    hub that cannot be reached costs transformers' retries (about 20 s a file) otherwise.
    """
    from transformers import AutoConfig, GenerationConfig

    def config(local_files_only: bool) -> Any:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code,
                                          local_files_only=local_files_only)

    def generation_config(local_files_only: bool) -> Any:
        return GenerationConfig.from_pretrained(name_or_path, local_files_only=local_files_only)

    ids: list[int] = []
    for load in (config, generation_config):
        for local_files_only in (True, False):
            try:
                ids.extend(_as_list(getattr(load(local_files_only), "eos_token_id", None)))
                break
            except OSError:  # transformers' "no such file" (or not cached, or offline)
                continue
    return ids


def eos_token_ids(model_cfg: ModelConfig, tokenizer: Any) -> list[int]:
    """Sorted EOS ids of the model in `model_cfg` with `tokenizer` (never empty)."""
    ids = set(_as_list(tokenizer.eos_token_id))
    # An adapter folder (a LoRA run's final/) stops where the model under it does.
    name = config_source(model_cfg.name_or_path)
    if not is_embedded(name):
        folder = Path(name).expanduser()
        ids.update(_config_eos_ids(str(folder) if folder.is_dir() else name,
                                   model_cfg.trust_remote_code))
    if not ids:
        raise ValueError("the tokenizer and model define no EOS token")
    return sorted(ids)
