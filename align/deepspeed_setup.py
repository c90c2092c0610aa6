"""DeepSpeed settings applied in every process before its comm backend starts."""

from __future__ import annotations

SHM_COMM_OP = "deepspeed_shm_comm"


def skip_cpu_shm_comm_op() -> None:
    """Keep DeepSpeed from compiling its shared-memory all-reduce op on CPU.

    On the CPU accelerator, DeepSpeed's comm backend JIT-compiles `deepspeed_shm_comm` with g++
    the first time it starts on a machine (about a minute on two cores), behind a lock file
    that waits forever if a build is killed midway. Only the inference-time tensor-parallel
    all-reduce uses that op; training collectives go through torch.distributed (gloo), so the
    op is marked unavailable and nothing is compiled.
    """
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    # DeepSpeed caches the probe in the module, so this edit is what build_shm_op reads.
    deepspeed.ops.__compatible_ops__[SHM_COMM_OP] = False
