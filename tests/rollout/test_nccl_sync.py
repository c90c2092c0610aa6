"""The NCCL weight group's rendezvous, on the CPU: rank 0's store already holds its port when
the engines are told it, and an engine worker joins through it.

Engines are local fakes whose worker joins with vLLM's real `StatelessProcessGroup` (in a
thread); only the NCCL communicator is replaced, by one that exchanges its id over the group
the way vLLM's does.
"""

from __future__ import annotations

import socket
import threading
from types import SimpleNamespace
from typing import Any

import pytest
import ray
import torch

pytest.importorskip("vllm")

from vllm.distributed.device_communicators import pynccl  # noqa: E402
from vllm.distributed.utils import StatelessProcessGroup  # noqa: E402

from align.rollout.nccl_sync import NCCLWeightSender  # noqa: E402

HOST = "127.0.0.1"


def port_is_held(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return True
    return False


class FakeCommunicator:
    """Rank 0's side of PyNcclCommunicator's set-up: the unique id goes out over the group."""

    def __init__(self, group: StatelessProcessGroup, device: Any) -> None:
        self.group = group
        group.broadcast_obj("nccl-unique-id", src=0)


class FakeEngine:
    """An engine actor handle with one tensor-parallel worker, joining in a thread."""

    def __init__(self) -> None:
        self.port_held: bool | None = None
        self.received: Any = None
        self.init_weight_group = SimpleNamespace(remote=self._init_weight_group)

    def _init_weight_group(self, host: str, port: int, rank: int, world: int) -> threading.Thread:
        self.port_held = port_is_held(port)

        def join() -> None:
            group = StatelessProcessGroup.create(host=host, port=port, rank=rank,
                                                 world_size=world, store_timeout=30)
            self.received = group.broadcast_obj(None, src=0)

        thread = threading.Thread(target=join, daemon=True)
        thread.start()
        return thread


def join_all(threads: list[threading.Thread], **kwargs: Any) -> None:
    for thread in threads:
        thread.join(timeout=60)


def test_engines_join_a_store_that_already_holds_its_port(monkeypatch):
    monkeypatch.setattr(pynccl, "PyNcclCommunicator", FakeCommunicator)
    monkeypatch.setattr(ray.util, "get_node_ip_address", lambda: HOST)
    monkeypatch.setattr(ray, "get", join_all)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(NCCLWeightSender, "_current", None)
    engines = [FakeEngine(), FakeEngine()]
    NCCLWeightSender.setup(engines, tensor_parallel_size=1)
    # No other process could take the port between rank 0 choosing it and the engines joining.
    assert [engine.port_held for engine in engines] == [True, True]
    assert [engine.received for engine in engines] == ["nccl-unique-id"] * 2
    assert isinstance(NCCLWeightSender.current().comm, FakeCommunicator)
