"""A rollout engine in this process, without Ray: what `align eval` and mining generate with.

`LocalEngine` loads a saved model folder once and then answers `generate(prompts, sampling)`
like the training engines (align.rollout.base), so single-turn evaluation and multi-turn
episodes (align.episodes.runner, one call per turn) share it.

`hf`: the model's own `generate` through `hf_sample` (the same sampler as the rollouts: exactly
the asked-for temperature and top-p, the model's EOS ids, nothing from its generation config).
`vllm`: the rollout engine's `VLLMEngineActor` run in this process, started once, its weights
loaded from the model (a peft adapter merged into its base first).
"""

from __future__ import annotations

import dataclasses
import json
import os
from types import TracebackType
from typing import Any

import torch

from align.config import ModelConfig, RolloutConfig
from align.model_loading import config_source, load_model
from align.rollout.base import Generation, Sampling
from align.rollout.drafts import NgramDrafts
from align.rollout.eos import eos_token_ids
from align.rollout.kv_cache import PrefixCache


class LocalEngine:
    """A saved model generating in this process; use it as a context manager (or `close`).

    Args:
        model_cfg: the folder (or hub name) and dtype.
        tokenizer: its tokenizer (pad id; EOS ids with the model's config).
        engine: `hf` or `vllm`.
        batch_size: prompts per `hf` generate call (vLLM schedules its own batches).
        max_model_len: the longest prompt + completion the `vllm` engine must hold.
        prefix_cache_mb: `hf`: keys and values kept of the rows a call ran, for later calls'
            prompts that extend them (an episode's next turn); 0 keeps none.
        draft_tokens: `hf`: tokens guessed from earlier text that a decoding step checks
            (exact sampling); 0 guesses none.
    """

    def __init__(self, model_cfg: ModelConfig, tokenizer: Any, engine: str = "hf",
                 batch_size: int = 64, max_model_len: int = 1024,
                 prefix_cache_mb: int = RolloutConfig.prefix_cache_mb,
                 draft_tokens: int = RolloutConfig.draft_tokens) -> None:
        self.name, self.batch_size, self.pad_id = engine, batch_size, tokenizer.pad_token_id
        self.prefix = PrefixCache(prefix_cache_mb << 20) if prefix_cache_mb else None
        self.drafts = NgramDrafts(draft_tokens) if draft_tokens else None
        model, base_cfg = load_for_generation(model_cfg, tokenizer)
        self.eos_ids = eos_token_ids(base_cfg, tokenizer)
        self.model: torch.nn.Module | None = model
        self.vllm: Any = None
        if engine == "vllm":
            self.vllm = _start_vllm(model, self.eos_ids, max_model_len)
            self.model = None  # vLLM holds its own copy of the weights

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Generation:
        """Completions (EOS kept where generation stopped) of every prompt, in order; with
        `sampling.logprobs`, the log-prob of each sampled token."""
        if self.vllm is not None:
            tokens, logprobs = self.vllm.generate(prompts, sampling.to_dict())
            return Generation(tokens, logprobs)
        from align.rollout.hf_sampling import hf_sample

        tokens: list[list[int]] = []
        logprobs: list[list[float]] = []
        device = next(self.model.parameters()).device
        with torch.no_grad():
            for start in range(0, len(prompts), self.batch_size):
                chunk = dataclasses.replace(
                    sampling, seed=None if sampling.seed is None else sampling.seed + start)
                if chunk.seed is not None:
                    torch.manual_seed(chunk.seed)
                out, lps = hf_sample(self.model, prompts[start:start + self.batch_size], chunk,
                                     self.eos_ids, self.pad_id, device, prefix=self.prefix,
                                     drafts=self.drafts)
                tokens.extend(out)
                logprobs.extend(lps or [])
        return Generation(tokens, logprobs if sampling.logprobs else None)

    def close(self) -> None:
        """Release the model (and the vLLM engine); safe to call twice."""
        if self.vllm is not None:
            self.vllm.close()
            self.vllm = None
        self.model = None
        if self.prefix is not None:
            self.prefix.clear()

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()


def load_for_generation(model_cfg: ModelConfig, tokenizer: Any
                        ) -> tuple[torch.nn.Module, ModelConfig]:
    """(the model in eval mode, the config of the folder that defines it). A peft adapter
    folder, even an adapter over another (a chain of LoRA stages), is loaded over its base and
    merged (align.model_loading), so every engine sees plain weights."""
    source = dataclasses.replace(model_cfg, name_or_path=config_source(model_cfg.name_or_path))
    return load_model(model_cfg, tokenizer).eval(), source


def _start_vllm(model: torch.nn.Module, eos: list[int], max_model_len: int) -> Any:
    """A `VLLMEngineActor` in this process holding `model`'s weights."""
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
    except BaseException:
        engine.close()
        raise
    return engine
