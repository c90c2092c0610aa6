"""Generation in this process, without Ray: what `align eval` uses for a saved model folder.

`hf`: the model's own `generate` through `hf_sample` (the same sampler as the rollouts: exactly
the asked-for temperature and top-p, the model's EOS ids, nothing from its generation config).
`vllm`: the rollout engine's `VLLMEngineActor` run in this process, its weights loaded from the
model (a peft adapter merged into its base first).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import torch

from align.config import ModelConfig
from align.model_loading import config_source, load_model
from align.rollout.base import Sampling
from align.rollout.eos import eos_token_ids


def generate_local(model_cfg: ModelConfig, tokenizer: Any, prompts: list[list[int]],
                   sampling: Sampling, engine: str, batch_size: int = 64,
                   max_model_len: int = 1024) -> list[list[int]]:
    """Completion token ids (EOS kept where generation stopped) of every prompt, in order."""
    model, base_cfg = load_for_generation(model_cfg, tokenizer)
    eos = eos_token_ids(base_cfg, tokenizer)
    if engine == "vllm":
        return _vllm(model, prompts, sampling, eos, max_model_len)
    from align.rollout.hf_sampling import hf_sample

    out: list[list[int]] = []
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            chunk = Sampling(**{**sampling.to_dict(), "seed": None if sampling.seed is None
                                else sampling.seed + start})
            if chunk.seed is not None:
                torch.manual_seed(chunk.seed)
            tokens, _ = hf_sample(model, prompts[start:start + batch_size], chunk, eos,
                                  tokenizer.pad_token_id, device)
            out.extend(tokens)
    return out


def load_for_generation(model_cfg: ModelConfig, tokenizer: Any
                        ) -> tuple[torch.nn.Module, ModelConfig]:
    """(the model in eval mode, the config of the folder that defines it). A peft adapter
    folder, even an adapter over another (a chain of LoRA stages), is loaded over its base and
    merged (align.model_loading), so every engine sees plain weights."""
    source = dataclasses.replace(model_cfg, name_or_path=config_source(model_cfg.name_or_path))
    return load_model(model_cfg, tokenizer).eval(), source


def _vllm(model: torch.nn.Module, prompts: list[list[int]], sampling: Sampling,
          eos: list[int], max_model_len: int) -> list[list[int]]:
    from align.rollout.vllm_actor import VLLMEngineActor, engine_env

    on_gpu = torch.cuda.is_available()
    for key, value in engine_env(on_gpu, torch.get_num_threads()).items():
        os.environ.setdefault(key, value)
    limit = getattr(model.config, "max_position_embeddings", None) or max_model_len
    engine = VLLMEngineActor(json.dumps(model.config.to_dict()), "auto" if on_gpu else "float32",
                             eos, {"max_model_len": min(limit, max_model_len),
                                   "enforce_eager": not on_gpu})
    try:
        engine.load_weights([(k, v.detach().cpu()) for k, v in model.state_dict().items()])
        engine.finish_sync()
        tokens, _ = engine.generate(prompts, sampling.to_dict())
        return tokens
    finally:
        engine.close()
