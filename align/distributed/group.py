"""WorkerGroup: N Ray actors that form one torch.distributed world (one role of a run).

The group reserves a placement group (one bundle per rank), starts the actors, has rank 0 host
the rendezvous, and joins them with gloo (CPU) or nccl (GPU). The driver then calls methods on
all ranks at once; a rank that dies ends the call at once with its role and rank named, and a
call that outlasts `distributed.call_timeout_s` ends the run with the role and method named.
However set-up ends (an error, Ctrl-C), a group that did not finish starting frees its actors
and placement group.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from align.config import DistributedConfig
from align.distributed.runtime_env import run_runtime_env
from align.errors import AlignError, TrainingError

# Environment for every worker process. PASSIVE OpenMP waits: spin-waiting threads made
# 2-thread CPU steps 15x slower at times on these machines.
WORKER_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "TOKENIZERS_PARALLELISM": "false",
              "RAY_DEDUP_LOGS": "0"}
PLACEMENT_TIMEOUT_S = 120


def ensure_ray(address: str | None = None) -> None:
    """Connect to the cluster at `address` (or at `RAY_ADDRESS`, which `ray job submit` sets
    for its driver), or start a local Ray when neither is given. Either way the project's code
    is shipped to every worker (align.distributed.runtime_env)."""
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    kwargs: dict[str, Any] = {"runtime_env": run_runtime_env(WORKER_ENV), "log_to_driver": True}
    if address:
        ray.init(address=address, **kwargs)
    else:
        # "local": always a fresh instance, never another process's running cluster.
        ray.init(address="local", include_dashboard=False, **kwargs)


class WorkerGroup:
    """`num_workers` actors of `worker_cls` (a subclass of BaseWorker), one torch.distributed world.

    Args:
        worker_cls: a plain class; it is wrapped with `ray.remote` here.
        dist_cfg: sizes, resources, placement and backend.
        role: name used in error messages (`policy`, `reference`, `critic`, ...).
        num_workers: overrides `dist_cfg.num_workers` (roles may differ in size).
        gpu_share: the part of its bundle's GPUs each actor takes (the rest can host a
            colocated rollout engine).
    """

    def __init__(self, worker_cls: type, dist_cfg: DistributedConfig, role: str = "policy",
                 num_workers: int | None = None, gpu_share: float = 1.0) -> None:
        self.role = role
        self.actors: list[Any] = []
        self._pg = None
        self.call_timeout_s = dist_cfg.call_timeout_s
        ensure_ray(dist_cfg.ray_address)
        try:
            self._start(worker_cls, dist_cfg, num_workers or dist_cfg.num_workers, gpu_share)
        except BaseException:  # Ctrl-C included: leave no actor or placement group behind
            self.shutdown()
            raise

    def _start(self, worker_cls: type, dist_cfg: DistributedConfig, n: int,
               gpu_share: float) -> None:
        role = self.role
        cpus, gpus = _resources(dist_cfg, n)
        threads = dist_cfg.torch_threads or max(1, int(cpus))
        bundles = [{"CPU": cpus, **({"GPU": gpus} if gpus else {})} for _ in range(n)]
        self._pg = placement_group(bundles, strategy=dist_cfg.placement_strategy)
        try:
            ray.get(self._pg.ready(), timeout=PLACEMENT_TIMEOUT_S)
        except GetTimeoutError:
            raise TrainingError(
                f"{role}: the cluster cannot host {n} workers with {cpus} CPU and {gpus} GPU "
                f"each (available: {ray.available_resources()}); lower "
                "distributed.num_workers or distributed.cpus_per_worker") from None
        remote_cls = ray.remote(worker_cls)
        env = {**WORKER_ENV, "OMP_NUM_THREADS": str(threads)}
        for i in range(n):
            self.actors.append(remote_cls.options(
                num_cpus=cpus, num_gpus=gpus * gpu_share, runtime_env={"env_vars": env},
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    self._pg, placement_group_bundle_index=i),
            ).remote(rank=i, world_size=n, torch_threads=threads))
        addr, port = self._get([self.actors[0].master_address.remote()], ranks=[0],
                               method="master_address")[0]
        backend = dist_cfg.backend if dist_cfg.backend != "auto" else (
            "nccl" if gpus else "gloo")
        self.call("init_distributed", addr, port, backend)

    @property
    def placement_group(self) -> Any:
        """The group's placement group (bundle i holds rank i), for actors colocated with it."""
        return self._pg

    @property
    def size(self) -> int:
        return len(self.actors)

    def call(self, method: str, *args: Any, **kwargs: Any) -> list[Any]:
        """Call `method(*args, **kwargs)` on every rank; returns the results in rank order."""
        refs = [getattr(a, method).remote(*args, **kwargs) for a in self.actors]
        return self._get(refs, method=method)

    def call_each(self, method: str, per_rank: Sequence[Sequence[Any]],
                  **kwargs: Any) -> list[Any]:
        """Call `method(*per_rank[i], **kwargs)` on rank i (e.g. each rank's data shard)."""
        if len(per_rank) != self.size:
            raise ValueError(f"{len(per_rank)} argument lists for {self.size} workers")
        refs = [getattr(a, method).remote(*args, **kwargs)
                for a, args in zip(self.actors, per_rank)]
        return self._get(refs, method=method)

    def _get(self, refs: list[ray.ObjectRef], ranks: list[int] | None = None,
             method: str = "call") -> list[Any]:
        """Wait for all refs, failing as soon as any rank fails (no waiting on its peers,
        which may be blocked forever in a collective with the dead rank), or when the call
        outlasts `call_timeout_s`."""
        ranks = ranks or list(range(len(refs)))
        index = {ref: i for i, ref in enumerate(refs)}
        pending = list(refs)
        results: list[Any] = [None] * len(refs)
        deadline = (None if self.call_timeout_s is None
                    else time.monotonic() + self.call_timeout_s)
        while pending:
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            done, pending = ray.wait(pending, num_returns=1, timeout=wait)
            if not done:
                late = sorted(ranks[index[ref]] for ref in pending)
                self.shutdown()
                raise TrainingError(
                    f"{self.role}: {method} did not finish within distributed.call_timeout_s="
                    f"{self.call_timeout_s} s (ranks {late} still running); the workers were "
                    "stopped. Raise distributed.call_timeout_s if the call is this slow")
            for ref in done:
                results[index[ref]] = self._result(ref, ranks[index[ref]])
        return results

    def _result(self, ref: ray.ObjectRef, rank: int) -> Any:
        try:
            return ray.get(ref)
        except RayTaskError as exc:
            cause = exc.cause if isinstance(exc.cause, BaseException) else None
            self.shutdown()
            if isinstance(cause, AlignError):
                raise cause from None
            raise TrainingError(f"{self.role} worker rank {rank} failed: "
                                f"{_last_line(exc)}") from None
        except RayActorError as exc:
            self.shutdown()
            raise TrainingError(f"{self.role} worker rank {rank} died: "
                                f"{_last_line(exc)}") from None

    def shutdown(self) -> None:
        """Kill every actor and free the placement group (safe to call twice)."""
        for actor in getattr(self, "actors", []):
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - already dead is fine
                pass
        self.actors = []
        if getattr(self, "_pg", None) is not None:
            try:
                remove_placement_group(self._pg)
            except Exception:  # noqa: BLE001
                pass
            self._pg = None


def _resources(cfg: DistributedConfig, n: int) -> tuple[float, float]:
    """CPUs and GPUs per worker: explicit values, or an even share of what the cluster has."""
    total = ray.cluster_resources()
    gpus = cfg.gpus_per_worker
    if gpus is None:
        gpus = 1.0 if total.get("GPU", 0) >= 1 else 0.0
    cpus = cfg.cpus_per_worker
    if cpus is None:
        per_node = max(node_cpus(), 1.0)
        cpus = max(1.0, math.floor(per_node / n)) if gpus == 0 else 1.0
    return cpus, gpus


def node_cpus() -> float:
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return max((n["Resources"].get("CPU", 0.0) for n in nodes), default=1.0)


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    tail = [line for line in text if line.strip()]
    return tail[-1] if tail else type(exc).__name__
