"""The settings of the rollout engines (`rollout.*`): sampling sizes and budgets, the `hf`
engine's decoding options, the `vllm` engine's placement and weight sync, and asynchronous
rollouts. Part of the run configuration (align.config re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from align.errors import ConfigError


@dataclass
class VLLMSettings:
    """The `vllm` rollout engine (see align.rollout.vllm_engine and docs/decisions.md)."""

    num_engines: int = 1  # data-parallel engines (each a Ray actor)
    tensor_parallel_size: int = 1  # GPUs per engine (GPU only)
    gpu_memory_utilization: float = 0.4  # share of a GPU an engine may take (weights + KV)
    max_model_len: int | None = None  # None: data.max_length + the longest generation budget
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    colocate: bool = True  # share the policy's placement bundles; false: own placement group
    max_logprob_diff: float | None = None  # stop above this mean gap; None: 0.01 fp32, 0.1 bf16
    sync_bucket_mb: float = 256.0  # weight-sync bucket size (whole layers; bounds sync memory)


@dataclass
class RolloutConfig:
    engine: Literal["auto", "hf", "vllm"] = "auto"  # generator of rollouts and held-out eval
    vllm: VLLMSettings = field(default_factory=VLLMSettings)
    prompts_per_step: int = 32  # prompts sampled per iteration
    n_samples_per_prompt: int = 8  # completions per prompt (the group size of GRPO/RLOO)
    max_new_tokens: int = 16  # generation budget per completion
    temperature: float = 1.0  # sampling temperature (log-probs use the same temperature)
    top_p: float = 1.0  # nucleus sampling; 1 samples from the full distribution
    prefix_cache_mb: int = 1024  # hf engine: keys/values kept per worker for episodes' next turns
    draft_tokens: int = 8  # hf engine: guessed tokens a decoding step checks (exact); 0: none
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample
    max_resample_rounds: int = 4  # dynamic sampling: most extra rounds of prompts_per_step
    async_steps: int = 0  # k >= 1: separate engines sample up to k iterations ahead; 0: sync
    timeout_s: float = 600.0  # async rollouts: longest wait for one rollout before the run stops


def check_vllm_settings(v: VLLMSettings, policy_workers: int) -> None:
    """Sizes of `rollout.vllm` that cannot work, named before any actor starts."""
    if v.num_engines < 1 or v.tensor_parallel_size < 1:
        raise ConfigError("rollout.vllm.num_engines and tensor_parallel_size must be >= 1")
    if not 0 < v.gpu_memory_utilization <= 1:
        raise ConfigError("rollout.vllm.gpu_memory_utilization must lie in (0, 1]")
    if v.colocate and v.tensor_parallel_size > 1:
        raise ConfigError("rollout.vllm.colocate=true places one engine in one policy bundle: "
                          "use tensor_parallel_size=1, or colocate=false for TP engines")
    if v.colocate and v.num_engines > policy_workers:
        raise ConfigError(f"rollout.vllm.colocate=true: num_engines={v.num_engines} exceeds the "
                          f"policy's distributed.num_workers={policy_workers}")
    if v.max_logprob_diff is not None and v.max_logprob_diff <= 0:
        raise ConfigError("rollout.vllm.max_logprob_diff must be positive")
    if v.sync_bucket_mb <= 0:
        raise ConfigError("rollout.vllm.sync_bucket_mb must be positive")
