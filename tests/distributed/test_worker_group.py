"""WorkerGroup: one torch.distributed world over Ray actors, on one node and on two."""

from __future__ import annotations

import math
import socket
import sys
import time

import pytest
import ray
import torch
import torch.distributed as dist
from ray import cloudpickle
from ray.cluster_utils import Cluster

from align.config import DistributedConfig
from align.distributed import WorkerGroup
from align.distributed.group import node_cpus
from align.distributed.worker import BaseWorker
from align.errors import TrainingError

pytestmark = pytest.mark.slow
# Ray workers cannot import test modules by name; ship this module's classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])


class EchoWorker(BaseWorker):
    def world(self) -> tuple[int, int, int]:
        """(rank, world size, sum of all ranks via all_reduce): proves one world."""
        total = torch.tensor([float(self.rank)])
        dist.all_reduce(total)
        return dist.get_rank(), dist.get_world_size(), int(total.item())

    def threads(self) -> int:
        return torch.get_num_threads()

    def code_origin(self) -> list[str]:
        """Where this worker imported the project's packages from."""
        import align
        import reward_models

        return [align.__file__, reward_models.__file__]

    def echo(self, value: int) -> int:
        return value * 10 + self.rank

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def rendezvous_port_is_held(self) -> bool:
        """Whether the port master_address hands out is still bound when it is returned."""
        _, port = self.master_address()
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("", port))
            except OSError:
                return True
        return False


def test_two_workers_form_one_world(ray_local):
    group = WorkerGroup(EchoWorker, DistributedConfig(num_workers=2, gpus_per_worker=0))
    try:
        assert group.call("world") == [(0, 2, 1), (1, 2, 1)]
        # Each worker's threads are its share of the node's CPUs.
        assert group.call("threads") == [max(1, math.floor(node_cpus() / 2))] * 2
        assert group.call_each("echo", [(1,), (2,)]) == [10, 21]
        # No other process can take the rendezvous port between rank 0 choosing it and the
        # other ranks joining: it is bound from the moment it is handed out.
        assert ray.get(group.actors[0].rendezvous_port_is_held.remote())
    finally:
        group.shutdown()


def test_fractional_workers_share_a_cpu(ray_local):
    cfg = DistributedConfig(num_workers=2, cpus_per_worker=0.5, gpus_per_worker=0)
    group = WorkerGroup(EchoWorker, cfg, role="reference")
    try:
        assert [w[1] for w in group.call("world")] == [2, 2]
    finally:
        group.shutdown()


def test_dead_worker_fails_fast_with_role_and_rank(ray_local):
    cfg = DistributedConfig(num_workers=2, gpus_per_worker=0)
    group = WorkerGroup(EchoWorker, cfg, role="critic")
    refs = [a.sleep.remote(120) for a in group.actors]
    started = time.monotonic()
    ray.kill(group.actors[1])
    with pytest.raises(TrainingError, match="critic worker rank 1 died"):
        group._get(refs)
    assert time.monotonic() - started < 60
    assert group.actors == []  # the rest of the group was torn down


def test_call_outlasting_its_timeout_ends_with_role_and_method(ray_local):
    group = WorkerGroup(EchoWorker, DistributedConfig(num_workers=2), role="critic")
    group.call_timeout_s = 2.0
    started = time.monotonic()
    with pytest.raises(TrainingError, match=r"critic: sleep did not finish within "
                                            r"distributed.call_timeout_s=2.0 s \(ranks \[0, 1\]"):
        group.call("sleep", 120)
    assert time.monotonic() - started < 30
    assert group.actors == []


def live_actors_and_groups() -> tuple[set, set]:
    """Ids of the actors and placement groups Ray holds alive."""
    from ray._private.state import actors

    return ({k for k, v in actors().items() if v["State"] != "DEAD"},
            {k for k, v in ray.util.placement_group_table().items() if v["state"] != "REMOVED"})


def wait_until_released(before: tuple[set, set], seconds: float = 60) -> tuple[set, set]:
    """What the run left alive beyond `before` (ray.kill is asynchronous: poll a while)."""
    deadline = time.monotonic() + seconds
    while True:
        actors, groups = live_actors_and_groups()
        left = (actors - before[0], groups - before[1])
        if left == (set(), set()) or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def test_ctrl_c_while_starting_leaves_nothing(ray_local, monkeypatch):
    """A KeyboardInterrupt while the group joins its world frees its actors and its group."""
    original = WorkerGroup.call

    def interrupted(self, method, *args, **kwargs):
        if method == "init_distributed":
            raise KeyboardInterrupt
        return original(self, method, *args, **kwargs)

    before = live_actors_and_groups()
    monkeypatch.setattr(WorkerGroup, "call", interrupted)
    with pytest.raises(KeyboardInterrupt):
        WorkerGroup(EchoWorker, DistributedConfig(num_workers=2))
    assert wait_until_released(before) == (set(), set())


def test_simulated_two_node_cluster(tmp_path, monkeypatch):
    """Joining an existing cluster by address; SPREAD puts one rank on each node. The nodes
    have 4 CPUs whatever this machine has, so the threads' share is checked at a size other
    than 1. As on a real second node, neither the driver's directory nor a PYTHONPATH leads
    the workers to the code: they import the packages the run shipped to the cluster."""
    ray.shutdown()
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PYTHONPATH", raising=False)  # the nodes' processes inherit none
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4})
    cluster.add_node(num_cpus=4)
    cluster.wait_for_nodes()
    try:
        cfg = DistributedConfig(num_workers=2, ray_address=cluster.address,
                                placement_strategy="SPREAD")
        group = WorkerGroup(EchoWorker, cfg)
        try:
            assert len(set(group.call("node_id"))) == 2
            assert group.call("world") == [(0, 2, 1), (1, 2, 1)]
            assert group.call("threads") == [2, 2]  # half of a 4-CPU node each
            for origin in group.call("code_origin"):
                assert all("runtime_resources/py_modules_files" in path for path in origin)
        finally:
            group.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
