"""One vLLM engine inside a Ray actor (the `vllm` rollout engine's worker side).

The engine starts from the model's config alone (`load_format="dummy"`): its first weights
come through the same sync as every later update, so a sync that never reaches it fails the
log-prob check at the first iteration instead of passing on the initial weights. It never
reads the folder's `generation_config.json` (`generation_config="vllm"`) and returns the
log-probs of the distribution it sampled from (`logprobs_mode="processed_logprobs"`).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from align.rollout.base import Sampling, cut_at_eos

# Reloading a bucket that holds only some layers is expected; vLLM warns for every other one.
QUIET_LOGGERS = ("vllm.model_executor.model_loader.reload.layerwise",
                 "vllm.model_executor.model_loader.reload.inplace")


def _reload(worker: Any, bucket: list[tuple[str, torch.Tensor]]) -> None:
    worker.model_runner.reload_weights(weights_iterator=iter(bucket))


class VLLMEngineActor:
    """A `vllm.LLM` fed token ids (no tokenizer), with in-place weight reloads.

    Args:
        config_json: the model's `config.json` text (architecture and sizes, no weights).
        dtype: model.dtype (`auto`: bf16 on a GPU that has it, else fp32; resolved here, on
            the engine's own device).
        eos_ids: every id generation stops at (included in the completion).
        engine_args: further `vllm.LLM` arguments (max_model_len, enforce_eager, ...).
    """

    def __init__(self, config_json: str, dtype: str, eos_ids: list[int],
                 engine_args: dict[str, Any]) -> None:
        from align.model_loading import resolve_dtype
        self.folder = Path(tempfile.mkdtemp(prefix="align-vllm-"))
        (self.folder / "config.json").write_text(config_json)
        self.eos_ids = list(eos_ids)
        self.version = 0
        torch_dtype = resolve_dtype(dtype)
        from vllm import LLM

        self.llm = LLM(model=str(self.folder), dtype=str(torch_dtype).removeprefix("torch."),
                       load_format="dummy", skip_tokenizer_init=True,
                       generation_config="vllm", logprobs_mode="processed_logprobs",
                       **engine_args)
        for name in QUIET_LOGGERS:  # once vLLM has configured its loggers
            logging.getLogger(name).setLevel(logging.ERROR)
        # Fails here, not mid-run, if this model cannot run on vLLM (e.g. head_dim < 32 on CPU).
        self.generate([[self.eos_ids[0]]], Sampling(max_new_tokens=1, greedy=True).to_dict())

    def generate(self, prompts: list[list[int]], sampling: dict[str, Any]
                 ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Complete each prompt once (see `generate_timed`)."""
        tokens, logprobs, _ = self.generate_timed(prompts, sampling)
        return tokens, logprobs

    def generate_timed(self, prompts: list[list[int]], sampling: dict[str, Any]
                       ) -> tuple[list[list[int]], list[list[float]] | None, tuple[float, float]]:
        """Complete each prompt once; also returns the call's wall-clock (start, end).

        With `sampling["seed"]`, the engine's random stream is reseeded for this call: requests
        carry no seeds of their own (vLLM's CPU runner fails on seeded requests whose prefill
        is chunked), so the call as a whole is what is reproducible, e.g. after a resume.
        """
        from vllm import SamplingParams

        start = time.time()
        s = Sampling(**sampling)
        if s.seed is not None:
            torch.manual_seed(s.seed)
        params = [SamplingParams(
            max_tokens=s.max_new_tokens, temperature=0.0 if s.greedy else s.temperature,
            top_p=1.0 if s.greedy else s.top_p, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, stop_token_ids=self.eos_ids,
            logprobs=0 if s.logprobs else None, detokenize=False, skip_special_tokens=False)
            for _ in prompts]
        outputs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params,
                                    use_tqdm=False)
        eos = set(self.eos_ids)
        tokens, logprobs = [], []
        for out in outputs:
            completion = out.outputs[0]
            ids = cut_at_eos(list(completion.token_ids), eos)
            tokens.append(ids)
            if s.logprobs:
                logprobs.append([completion.logprobs[i][t].logprob for i, t in enumerate(ids)])
        return tokens, (logprobs if s.logprobs else None), (start, time.time())

    def load_weights(self, bucket: list[tuple[str, torch.Tensor]]) -> int:
        """Reload the named tensors in place (whole layers; others keep their weights)."""
        self.llm.collective_rpc(_reload, args=(bucket,))
        return len(bucket)

    def finish_sync(self) -> int:
        """After a full sync: drop KV blocks cached under the old weights; new version."""
        self.llm.reset_prefix_cache()
        self.version += 1
        return self.version

    # ---------------------------------------------------------------- GPU only

    def init_weight_group(self, host: str, port: int, rank_offset: int,
                          world_size: int) -> None:
        """Join the NCCL group rank 0 of the policy broadcasts weights over (separate GPU
        engines; see align.rollout.nccl_sync)."""
        self.llm.collective_rpc("init_weight_group",
                                args=(host, port, rank_offset, world_size))

    def receive_bucket(self, meta: list[tuple[str, str, list[int]]]) -> int:
        self.llm.collective_rpc("receive_bucket", args=(meta,))
        return len(meta)

    def sleep(self, level: int) -> None:
        """Free this engine's GPU memory (vLLM's levels: 1 keeps the weights in host memory,
        2 discards them; the KV cache is discarded either way)."""
        self.llm.sleep(level=level)

    def wake(self, tags: list[str] | None = None) -> None:
        """Reallocate what `sleep` freed: `tags` "weights" and/or "kv_cache" (None: both),
        after this process's cached blocks (a sync's temporaries) go back to the GPU."""
        empty_gpu_cache()
        self.llm.wake_up(tags=tags)

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def empty_gpu_cache() -> None:
    """Return the blocks torch's caching allocator holds to the GPU, where there is one: a
    colocated engine allocates outside that cache, so blocks cached here are lost to it."""
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def engine_env(on_gpu: bool, threads: int) -> dict[str, str]:
    """Environment of an engine actor: vLLM in-process (so `collective_rpc` takes plain
    functions), a fixed CPU KV cache, and quiet logs."""
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "WARNING",
           "TOKENIZERS_PARALLELISM": "false", "OMP_WAIT_POLICY": "PASSIVE"}
    if not on_gpu:
        env.update(VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
                   OMP_NUM_THREADS=str(threads))
    return env
