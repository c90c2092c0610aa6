"""Weight sync to separate GPU engines over NCCL: rank 0 of the policy broadcasts each tensor
of a bucket straight from its GPU to every engine worker (no host copy, no object store).

Both sides use vLLM's stateless process group and its NCCL communicator, so the group lives
beside (not inside) the trainer's and the engines' own torch.distributed worlds. Ranks: 0 is
the policy's rank 0; engine e's tensor-parallel worker w is 1 + e * tp + w.
Written for GPUs and marked so in its tests (`gpu`); the CPU path is align.rollout.weight_sync's
object-store transport.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch


class NCCLWeightReceiver:
    """vLLM worker extension (`worker_extension_cls`): the receiving side, in each engine
    worker process (`self` is vLLM's GPU worker)."""

    def init_weight_group(self, host: str, port: int, rank_offset: int,
                          world_size: int) -> None:
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = rank_offset + get_world_group().rank
        group = StatelessProcessGroup.create(host=host, port=port, rank=rank,
                                             world_size=world_size)
        self._align_comm = PyNcclCommunicator(group, device=self.device)

    def receive_bucket(self, meta: list[tuple[str, str, list[int]]]) -> None:
        bucket = []
        for name, dtype, shape in meta:
            tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=self.device)
            self._align_comm.broadcast(tensor, src=0, stream=torch.cuda.current_stream())
            bucket.append((name, tensor))
        torch.cuda.current_stream().synchronize()
        self.model_runner.reload_weights(weights_iterator=iter(bucket))


class NCCLWeightSender:
    """The sending side, on the policy's rank 0 (one per process, set up once)."""

    _current: ClassVar[NCCLWeightSender | None] = None

    def __init__(self, comm: Any) -> None:
        self.comm = comm

    @classmethod
    def current(cls) -> NCCLWeightSender:
        if cls._current is None:
            raise RuntimeError("NCCL weight group not set up: call setup_weight_group first")
        return cls._current

    @classmethod
    def setup(cls, engines: list[Any], tensor_parallel_size: int) -> None:
        import ray
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.utils import StatelessProcessGroup

        from align.distributed.rendezvous import host_store

        host = ray.util.get_node_ip_address()
        world = 1 + len(engines) * tensor_parallel_size
        # Rank 0's store is listening before any engine is told its port.
        store = host_store(host, world)
        refs = [engine.init_weight_group.remote(host, store.port, 1 + i * tensor_parallel_size,
                                                world)
                for i, engine in enumerate(engines)]
        group = StatelessProcessGroup(rank=0, world_size=world, store=store)
        comm = PyNcclCommunicator(group, device=torch.cuda.current_device())
        ray.get(refs)
        cls._current = cls(comm)

    def send(self, bucket: list[tuple[str, torch.Tensor]], engines: list[Any]) -> None:
        import ray

        meta = [(name, str(t.dtype).removeprefix("torch."), list(t.shape)) for name, t in bucket]
        refs = [engine.receive_bucket.remote(meta) for engine in engines]
        stream = torch.cuda.current_stream()
        for _, tensor in bucket:
            self.comm.broadcast(tensor.contiguous(), src=0, stream=stream)
        stream.synchronize()
        ray.get(refs)
