"""PolicyWorker: the Ray actor holding one DeepSpeed rank of a Policy.

The actor joins a torch.distributed world (gloo on CPU, nccl on GPU) and then forwards calls to
its Policy. It stays generic: stage-specific maths arrives as an objective function.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.deepspeed_setup import skip_cpu_shm_comm_op
from align.distributed.rendezvous import host_store
from align.model_loading import ModelKind
from align.policy import Objective, Policy
from align.rollout import Generation, Sampling


class BaseWorker:
    """One rank of a WorkerGroup: sets threads and environment, joins the process group."""

    def __init__(self, rank: int, world_size: int, torch_threads: int) -> None:
        self.rank, self.world_size = rank, world_size
        # Oversubscribed cores are catastrophic on CPU: each rank uses only its share.
        torch.set_num_threads(torch_threads)
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

    def master_address(self) -> tuple[str, int]:
        """This node's IP and the port of the rendezvous store that rank 0 now hosts (on a
        port it keeps: align.distributed.rendezvous)."""
        ip = _node_ip()
        self._store = host_store(ip, self.world_size)
        return ip, self._store.port

    def init_distributed(self, master_addr: str, master_port: int, backend: str) -> None:
        import deepspeed

        skip_cpu_shm_comm_op()
        os.environ.update({
            "MASTER_ADDR": master_addr, "MASTER_PORT": str(master_port),
            "RANK": str(self.rank), "WORLD_SIZE": str(self.world_size),
            # Ray gives each GPU actor only its own device(s), so the local device is 0.
            "LOCAL_RANK": "0",
        })
        store = getattr(self, "_store", None) or dist.TCPStore(
            master_addr, master_port, self.world_size, is_master=False,
            timeout=default_pg_timeout)
        dist.init_process_group(backend, store=store, rank=self.rank,
                                world_size=self.world_size, timeout=default_pg_timeout)
        # DeepSpeed adopts the initialised process group.
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False,
                                   rank=self.rank, world_size=self.world_size)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def seed(self, seed: int) -> None:
        """Seed every RNG on this rank (offset by rank so sampling differs across ranks)."""
        value = seed + self.rank
        random.seed(value)
        np.random.seed(value % 2**32)
        torch.manual_seed(value)

    def rng_state(self) -> dict[str, Any]:
        """RNG states as tensors and plain values, loadable with `weights_only=True`."""
        version, internal, gauss = random.getstate()
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        return {"python": (version, list(internal), gauss),
                "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
                "torch": torch.random.get_rng_state()}

    def set_rng_state(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
        torch.random.set_rng_state(state["torch"])


class PolicyWorker(BaseWorker):
    """A rank holding a trainable (or frozen) Policy."""

    def setup(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
              dist_cfg: DistributedConfig, total_steps: int, kind: ModelKind = "causal_lm",
              trainable: bool = True, reference: bool = False) -> int:
        """Build this rank's Policy; returns its trainable parameter count."""
        self.seed(trainer_cfg.seed)
        self.policy = Policy(model_cfg, trainer_cfg, dist_cfg, total_steps, kind, trainable,
                             reference)
        # Under ZeRO-3 numel() is the local shard (often 0); ds_numel is the full size.
        return sum(getattr(p, "ds_numel", p.numel())
                   for p in self.policy.model.parameters() if p.requires_grad)

    def train_step(self, objective: Objective, micro_batches: list[dict[str, torch.Tensor]],
                   **kwargs: Any) -> dict[str, dict[str, float]]:
        return self.policy.train_step(objective, micro_batches, **kwargs)

    def evaluate(self, objective: Objective, micro_batches: list[dict[str, torch.Tensor]],
                 **kwargs: Any) -> dict[str, float]:
        return self.policy.evaluate(objective, micro_batches, **kwargs)

    def advance_schedule(self, steps: int) -> None:
        self.policy.advance_schedule(steps)

    def infer(self, fn: Any, micro_batches: list[dict[str, torch.Tensor]],
              reference: bool = False, **kwargs: Any) -> list[Any]:
        return self.policy.infer(fn, micro_batches, reference, **kwargs)

    def check_packing(self) -> dict[str, Any]:
        return self.policy.check_packing()

    def held_tensor_bytes(self) -> dict[str, int]:
        return self.policy.held_tensor_bytes()

    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 prefix_cache_bytes: int = 0, draft_tokens: int = 0) -> Generation:
        return self.policy.generate(prompts, sampling, prefix_cache_bytes, draft_tokens)

    def send_weights(self, engines: list[Any], bucket_bytes: int,
                     transport: str = "object_store") -> int:
        """Stream this policy's weights to rollout engine actors (all ranks call it)."""
        from align.rollout.weight_sync import send_weights

        return send_weights(self.policy.model, engines, bucket_bytes, self.policy.zero_stage,
                            self.rank, transport)

    def empty_cache(self) -> None:
        """Give this rank's cached GPU blocks back before a colocated engine wakes into them."""
        from align.rollout.vllm_actor import empty_gpu_cache

        empty_gpu_cache()

    def setup_weight_group(self, engines: list[Any], tensor_parallel_size: int) -> None:
        """Rank 0 joins the NCCL group it broadcasts weights to separate GPU engines over."""
        if self.rank == 0:
            from align.rollout.nccl_sync import NCCLWeightSender

            NCCLWeightSender.setup(engines, tensor_parallel_size)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return self.policy.full_state_dict()

    def save(self, path: str, merged: bool | None = None) -> None:
        self.policy.save(path, merged)

    def save_checkpoint(self, path: str) -> None:
        self.policy.save_checkpoint(path)
        torch.save(self.rng_state(), Path(path) / f"rng_rank{self.rank}.pt")

    def load_checkpoint(self, path: str) -> None:
        self.policy.load_checkpoint(path)
        self.set_rng_state(torch.load(Path(path) / f"rng_rank{self.rank}.pt",
                                      weights_only=True))


def _node_ip() -> str:
    import ray

    return ray.util.get_node_ip_address()
