"""The local sandbox as a user other than root runs it: a user namespace instead of a uid of
its own. The launcher is started as `nobody` with the system interpreter (the project's may
live in root's home), and the hostile cases that depend on this mode run again."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import uuid

import pytest

from align.sandbox import LocalExecutor, SandboxLimits
from tests.sandbox.conftest import MARK, processes_marked
from tests.sandbox.test_local import BOUNDED_FORK_BOMB, assert_clean

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


def _nobody() -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


NOBODY = _nobody()


class AsNobody(LocalExecutor):
    """A LocalExecutor whose launcher runs as `nobody`, as it would for that user."""

    def __init__(self, **options) -> None:
        super().__init__(python=SYSTEM_PYTHON, **options)
        self.as_root = False

    def launcher_options(self) -> dict:
        return {"user": NOBODY.pw_uid, "group": NOBODY.pw_gid, "extra_groups": []}


def _refused() -> str | None:
    """Why this machine cannot run the mode (None: it can), asked of the kernel directly as
    `nobody`, so that a broken sandbox fails these tests rather than skipping them."""
    if os.geteuid() != 0 or NOBODY is None or SYSTEM_PYTHON is None:
        return "needs root, a `nobody` user and /usr/bin/python3"
    flags = 0x10000000 | 0x20000000 | 0x40000000 | 0x00020000  # user, PID, network, mount
    probe = subprocess.run(
        [SYSTEM_PYTHON, "-I", "-S", "-c", "import ctypes, os; libc = ctypes.CDLL(None, "
         f"use_errno=True); os._exit(0 if libc.unshare({flags}) == 0 else ctypes.get_errno())"],
        user=NOBODY.pw_uid, group=NOBODY.pw_gid, extra_groups=[], cwd="/", timeout=60)
    return None if probe.returncode == 0 else f"unshare failed (errno {probe.returncode})"


_REFUSED = _refused()
pytestmark = pytest.mark.skipif(_REFUSED is not None, reason=f"no user namespace: {_REFUSED}")


@pytest.fixture()
def nobody():
    mark = uuid.uuid4().hex
    return AsNobody(env={MARK: mark}), mark


def test_the_code_holds_no_capabilities(nobody):
    executor, mark = nobody
    result = executor.run("""
import ctypes, os
print(open("/proc/self/status").read().split("CapEff:")[1].split()[0])
libc = ctypes.CDLL(None, use_errno=True)
print(libc.mount(None, b"/", None, 32 | 4096, None), ctypes.get_errno())  # remount / rw
print(os.getuid())
""")
    cap_eff, remount, uid = result.stdout.split("\n")[:3]
    assert int(cap_eff, 16) == 0
    assert remount.split()[0] == "-1"
    assert uid == "0"  # root of its namespace, without its powers
    assert_clean(mark)


def test_a_fork_bomb_gets_the_process_limit(nobody):
    executor, mark = nobody
    limits = SandboxLimits(processes=8)
    result = executor.run(BOUNDED_FORK_BOMB, limits=limits)
    assert int(result.stdout) < limits.processes
    assert result.stopped_by == "processes"
    assert_clean(mark)


def test_no_network_and_no_orphans(nobody):
    executor, mark = nobody
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    result = executor.run(f"""
import socket, subprocess
subprocess.Popen(["sleep", "300"], start_new_session=True)
socket.create_connection(("127.0.0.1", {port}), timeout=2)
""")
    server.settimeout(0.5)
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert "Network is unreachable" in result.stderr
    assert_clean(mark)
    assert processes_marked(mark) == []


def test_writes_outside_the_folder_reach_nothing(nobody, host_folder):
    executor, mark = nobody
    result = executor.run(f"""
try:
    open({str(host_folder / 'planted')!r}, "w").write("x")
except OSError as err:
    print(err.strerror)
""")
    assert result.stdout == "Read-only file system\n"
    assert not (host_folder / "planted").exists()
    assert_clean(mark)
