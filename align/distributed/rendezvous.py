"""The rendezvous store a group's first rank hosts for the others to find it.

The store listens on a port the OS picks (port 0) and keeps it for as long as the store lives:
a port probed free and closed before use could be taken by another process in between (see
docs/decisions.md). Used by every WorkerGroup's torch.distributed world and by the NCCL group
that streams weights to separate vLLM engines.
"""

from __future__ import annotations

import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout


def host_store(host: str, world_size: int) -> dist.TCPStore:
    """A TCPStore server on `host` for `world_size` members (this one included); its port is
    `store.port`. The others connect as clients; nothing waits for them here."""
    return dist.TCPStore(host, 0, world_size, is_master=True, timeout=default_pg_timeout,
                         wait_for_workers=False)
