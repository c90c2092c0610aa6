"""DeepSpeed's CPU comm backend starts without compiling its shared-memory op."""

import deepspeed.ops
from deepspeed.comm.torch import build_shm_op

from align.deepspeed_setup import SHM_COMM_OP, skip_cpu_shm_comm_op


def test_cpu_comm_backend_builds_no_shm_op():
    skip_cpu_shm_comm_op()
    assert deepspeed.ops.__compatible_ops__[SHM_COMM_OP] is False
    assert build_shm_op() is None  # would otherwise JIT-compile the op behind a lock file
