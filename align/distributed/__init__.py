"""Distributed runtime: Ray actor groups forming one torch.distributed world per role."""

from align.distributed.group import WorkerGroup, ensure_ray
from align.distributed.worker import PolicyWorker

__all__ = ["PolicyWorker", "WorkerGroup", "ensure_ray"]
