"""The `vllm` rollout engine: vLLM engines as Ray actors, fed the policy's weights after every
update.

Placement (`rollout.vllm.colocate`):
  - colocated: engine i lives in bundle i of the policy's placement group (on a GPU it takes
    the part of the bundle's GPU the policy leaves, and sleeps while the trainer runs: see
    `sleep` and `wake` for the order memory is freed and taken back in);
  - separate: the engines get a placement group of their own (one bundle per GPU of an
    engine), the shape an asynchronous trainer needs.
Prompts are split over engines (data parallel); on GPUs an engine may be tensor parallel.
Weights move by Ray's object store (CPU, colocated GPU) or an NCCL broadcast from the policy's
rank 0 (separate GPU engines); see align.rollout.weight_sync.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from align.config import ModelConfig, VLLMSettings
from align.distributed import WorkerGroup, ensure_ray
from align.distributed.group import PLACEMENT_TIMEOUT_S, node_cpus
from align.errors import TrainingError
from align.model_loading import config_source, embedded_config, is_embedded
from align.rollout.base import Generation, Sampling
from align.rollout.vllm_actor import VLLMEngineActor, engine_env

# With colocated GPU engines, the policy actor takes this share of its bundle's GPU.
COLOCATED_POLICY_GPU_SHARE = 0.5
# vLLM's sleep level for colocated engines: 2 discards the weights as well as the KV cache,
# since every wake is followed by a full sync that overwrites them (docs/decisions.md).
SLEEP_LEVEL = 2


def engine_model_config(model_cfg: ModelConfig, tokenizer: Any) -> tuple[str, int | None]:
    """(config.json text an engine starts from, the model's max positions or None)."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if is_embedded(model_cfg.name_or_path):
        config = embedded_config(model_cfg, tokenizer)
    else:
        config = AutoConfig.from_pretrained(config_source(model_cfg.name_or_path),
                                            trust_remote_code=model_cfg.trust_remote_code)
    if not getattr(config, "architectures", None):
        config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[config.model_type]]
    return config.to_json_string(), getattr(config, "max_position_embeddings", None)


class VLLMEngine:
    """`rollout.vllm.num_engines` vLLM engines serving one policy.

    Args:
        model_cfg: the policy's model (its architecture; weights come from `bind`'s policy).
        settings: `rollout.vllm`.
        max_model_len: longest prompt + completion an engine must hold.
        eos_ids: ids generation stops at.
        colocate_with: the policy group whose bundles colocated engines share (None: separate).
        concurrent: engines generate while the policy trains (async rollouts), so on CPU each
            uses only its own bundle's core.
    """

    name = "vllm"

    def __init__(self, model_cfg: ModelConfig, settings: VLLMSettings, max_model_len: int,
                 eos_ids: list[int], tokenizer: Any, seed: int,
                 colocate_with: WorkerGroup | None = None, concurrent: bool = False) -> None:
        ensure_ray(None)
        self.settings = settings
        self.concurrent = concurrent
        self.on_gpu = ray.cluster_resources().get("GPU", 0) >= 1
        self.colocated = colocate_with is not None
        self.transport = "nccl" if self.on_gpu and not self.colocated else "object_store"
        self.policy: WorkerGroup | None = None
        self._pg = None
        # Colocated GPU engines: "awake", "asleep" (after `sleep`), or "weights" (after `wake`,
        # until the sync in `update_weights` has filled them and the KV cache is back).
        self._memory = "awake"
        self.actors: list[Any] = []
        config_json, max_positions = engine_model_config(model_cfg, tokenizer)
        if max_positions:
            max_model_len = min(max_model_len, max_positions)
        args = self._engine_args(max_model_len)
        remote = ray.remote(VLLMEngineActor)
        placements = self._placements(colocate_with)
        self.actors = [remote.options(**options).remote(
            config_json, model_cfg.dtype, eos_ids, {**args, **extra, "seed": seed + i})
            for i, (options, extra) in enumerate(placements)]
        self._get([a.__ray_ready__.remote() for a in self.actors], "start")

    def _engine_args(self, max_model_len: int) -> dict[str, Any]:
        s = self.settings
        eager = s.enforce_eager if s.enforce_eager is not None else not self.on_gpu
        args: dict[str, Any] = {"max_model_len": max_model_len, "enforce_eager": eager}
        if self.on_gpu:
            args.update(gpu_memory_utilization=s.gpu_memory_utilization,
                        tensor_parallel_size=s.tensor_parallel_size,
                        enable_sleep_mode=self.colocated)
            if self.transport == "nccl":
                args["worker_extension_cls"] = "align.rollout.nccl_sync.NCCLWeightReceiver"
        return args

    def _placements(self, policy: WorkerGroup | None) -> list[tuple[dict, dict]]:
        """Ray options and extra engine args of each engine actor."""
        s, tp = self.settings, self.settings.tensor_parallel_size
        # Rollouts and training take turns on the cores, unless they run at once (async):
        # then each engine keeps to its bundle's one CPU.
        threads = 1 if self.concurrent else max(1, int(node_cpus()))
        env_vars = engine_env(self.on_gpu, threads)
        if policy is not None:
            share = (1 - COLOCATED_POLICY_GPU_SHARE) if self.on_gpu else 0
            return [({"runtime_env": {"env_vars": dict(env_vars)}, "num_cpus": 0,
                      "num_gpus": share,
                      "scheduling_strategy": PlacementGroupSchedulingStrategy(
                          policy.placement_group, placement_group_bundle_index=i)}, {})
                    for i in range(s.num_engines)]
        bundle = {"CPU": 1, "GPU": 1} if self.on_gpu else {"CPU": 1}
        self._pg = placement_group([dict(bundle) for _ in range(s.num_engines * tp)],
                                   strategy="PACK")
        try:
            ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except ray.exceptions.GetTimeoutError:
            self.shutdown()
            raise TrainingError(
                f"rollout.vllm: the cluster cannot host {s.num_engines} engine(s) of "
                f"{tp} x {bundle} (available: {ray.available_resources()}); lower "
                "rollout.vllm.num_engines or set rollout.vllm.colocate=true") from None
        out = []
        for i in range(s.num_engines):
            first = i * tp
            # Each engine its own environment: a shared dict would hand every engine the
            # bundle indices written last.
            engine_vars = dict(env_vars)
            options = {"runtime_env": {"env_vars": engine_vars}, "num_cpus": 1,
                       "num_gpus": 1 if self.on_gpu else 0,
                       "scheduling_strategy": PlacementGroupSchedulingStrategy(
                           self._pg, placement_group_bundle_index=first)}
            extra: dict[str, Any] = {}
            if tp > 1:  # vLLM starts one Ray worker per GPU in this engine's bundles
                options.update(num_gpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_capture_child_tasks=True))
                engine_vars["VLLM_RAY_BUNDLE_INDICES"] = ",".join(
                    str(first + k) for k in range(tp))
                extra["distributed_executor_backend"] = "ray"
            out.append((options, extra))
        return out

    # ---------------------------------------------------------------- the interface

    def bind(self, policy: WorkerGroup) -> None:
        """The policy group whose weights this engine serves (sync source)."""
        self.policy = policy
        if self.transport == "nccl":
            policy.call("setup_weight_group", self.actors, self.settings.tensor_parallel_size)

    def generate(self, prompts: list[list[int]], sampling: Sampling) -> Generation:
        return self.collect(self.submit(prompts, sampling))

    def submit(self, prompts: list[list[int]], sampling: Sampling) -> list[Any]:
        """Start generating on the engines and return at once (a handle for `collect`).

        Prompts are split evenly across the engines. A call's seed reseeds each engine's
        stream (offset by engine index) for that call alone, so the same call gives the same
        completions whenever it runs, e.g. after a resume.
        """
        if self._memory != "awake":
            raise RuntimeError(f"vllm engine: generate while {self._memory}; call wake() "
                               "and update_weights() first")
        parts = np.array_split(np.arange(len(prompts)), len(self.actors))
        refs = []
        for i, (actor, part) in enumerate(zip(self.actors, parts)):
            if len(part):
                call = sampling.to_dict()
                if sampling.seed is not None:
                    call["seed"] = sampling.seed + 7919 * i
                refs.append(actor.generate_timed.remote([prompts[j] for j in part], call))
        return refs

    def collect(self, handle: list[Any], timeout_s: float | None = None) -> Generation:
        """Wait for a `submit`'s completions (a TrainingError past `timeout_s`)."""
        tokens: list[list[int]] = []
        logprobs: list[list[float]] | None = []
        starts, ends = [], []
        for part_tokens, part_logprobs, (start, end) in self._get(handle, "generate",
                                                                  timeout_s):
            tokens.extend(part_tokens)
            if part_logprobs is None:  # not asked for: every part returns None
                logprobs = None
            elif logprobs is not None:
                logprobs.extend(part_logprobs)
            starts.append(start)
            ends.append(end)
        span = (min(starts), max(ends)) if starts else None
        return Generation(tokens, logprobs, span)

    def update_weights(self) -> float:
        if self.policy is None:
            raise TrainingError("vllm engine: no policy bound to sync weights from")
        start = time.perf_counter()
        self.policy.call("send_weights", self.actors, int(self.settings.sync_bucket_mb * 2**20),
                         self.transport)
        if self._memory == "weights":  # `wake` brought back the weights alone: now the KV cache
            self._get([a.wake.remote(["kv_cache"]) for a in self.actors], "wake")
            self._memory = "awake"
        return time.perf_counter() - start

    def sleep(self) -> None:
        """Colocated GPU engines free their weights and KV cache for the trainer."""
        if self.on_gpu and self.colocated and self._memory == "awake":
            self._get([a.sleep.remote(SLEEP_LEVEL) for a in self.actors], "sleep")
            self._memory = "asleep"

    def wake(self) -> None:
        """The first half of waking, before `update_weights`: the trainer's cached GPU blocks
        are given back, then the engines reallocate their weights alone, for the sync to fill.
        The KV cache comes back after the sync, once the sync's temporary tensors are freed."""
        if self._memory == "asleep":
            if self.policy is not None:
                self.policy.call("empty_cache")
            self._get([a.wake.remote(["weights"]) for a in self.actors], "wake")
            self._memory = "weights"

    def shutdown(self) -> None:
        for actor in self.actors:
            try:
                ray.get(actor.close.remote(), timeout=10)
            except Exception:  # noqa: BLE001 - a dead engine has nothing to clean
                pass
            ray.kill(actor)
        self.actors = []
        if self._pg is not None:
            remove_placement_group(self._pg)
            self._pg = None

    def _get(self, refs: list[Any], what: str, timeout_s: float | None = None) -> list[Any]:
        try:
            return ray.get(refs, timeout=timeout_s)
        except GetTimeoutError:
            self.shutdown()
            raise TrainingError(f"vllm engine: generate did not finish within rollout.timeout_s="
                                f"{timeout_s:g} s; raise it, or check the engines' logs") from None
        except (RayTaskError, RayActorError) as exc:
            lines = [line for line in str(exc).strip().splitlines() if line.strip()]
            self.shutdown()
            raise TrainingError(f"vllm engine failed to {what}: {lines[-1] if lines else exc}"
                                "; check rollout.vllm.*, or use rollout.engine=hf") from None
