"""PPO's trained roles (policy, critic): their actor groups, and the resources each gets.

Roles run one after another (generate, score, train), never at the same time, so unless a
config sets them, they share the free CPUs evenly in Ray's accounting while each keeps
threads for a whole node.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import ray

from align.config import DistributedConfig, PPOConfig
from align.distributed import WorkerGroup, ensure_ray
from align.distributed.group import node_cpus
from align.packed_forward import Packing


@dataclass
class Role:
    """A role's actor group and how its forward packs rows (None: padded)."""

    group: WorkerGroup
    packing: Packing | None


def role_resources(cfg: PPOConfig, use_critic: bool
                   ) -> tuple[DistributedConfig, DistributedConfig]:
    """(policy, critic) DistributedConfigs: workers, CPUs, threads and ZeRO stage of each.

    Reward-model groups, started with the rewards, already hold their CPUs; separate rollout
    engines reserve theirs before this is called.
    """
    ensure_ray(cfg.distributed.ray_address)
    policy_n = cfg.distributed.num_workers
    critic_n = (cfg.critic.num_workers or policy_n) if use_critic else 0
    cpus = node_cpus()
    free = min(ray.available_resources().get("CPU", cpus), cpus * len(ray.nodes()))
    share = free / (policy_n + critic_n)

    def role(n: int, cpus_per_worker: float | None, zero: int) -> DistributedConfig:
        per = cpus_per_worker or cfg.distributed.cpus_per_worker or share
        threads = cfg.distributed.torch_threads or max(1, int(cpus // n))
        return dataclasses.replace(cfg.distributed, num_workers=n, cpus_per_worker=per,
                                   torch_threads=threads, zero_stage=zero)

    zero = cfg.distributed.zero_stage
    critic_zero = cfg.critic.zero_stage if cfg.critic.zero_stage is not None else zero
    return (role(policy_n, None, zero),
            role(critic_n or 1, cfg.critic.cpus_per_worker, critic_zero))
