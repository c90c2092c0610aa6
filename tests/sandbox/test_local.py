"""Hostile code through the real local sandbox: each run ends within its deadline plus a
margin, names what stopped it, and leaves the machine as it was (no process, no file outside
its folder, nothing sent over the network, memory back)."""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from align.sandbox import SandboxLimits
from tests.sandbox.conftest import mem_available_mb, needs_namespaces, processes_marked

pytestmark = needs_namespaces
MARGIN_S = 1.5  # start-up and teardown beyond a deadline, on two busy cores
# Forks until refused (at most 300, so that a sandbox without its limit stays harmless) and
# prints how many children it got.
BOUNDED_FORK_BOMB = """
import os, time
forks = 0
try:
    while forks < 300:
        if os.fork() == 0:
            time.sleep(60)
            os._exit(0)
        forks += 1
finally:
    print(forks, flush=True)
"""


def assert_clean(mark: str) -> None:
    """No process of the execution is left (the kernel may take a moment to reap them)."""
    for _ in range(20):
        if not processes_marked(mark):
            return
        time.sleep(0.05)
    assert processes_marked(mark) == []


def test_a_fork_bomb_gets_the_process_limit(marked):
    executor, mark = marked()
    limits = SandboxLimits(processes=8, timeout_s=10)
    result = executor.run(BOUNDED_FORK_BOMB, limits=limits)
    assert int(result.stdout) < limits.processes
    assert result.stopped_by == "processes"
    assert result.seconds < limits.timeout_s
    assert_clean(mark)


def test_an_exponential_fork_bomb_ends_at_the_deadline(marked):
    executor, mark = marked()
    limits = SandboxLimits(processes=16, timeout_s=1)
    result = executor.run("""
import os
while True:
    try:
        os.fork()
    except OSError:
        pass
""", limits=limits)
    assert result.stopped_by == "wall_time" and result.timed_out
    assert result.seconds < limits.timeout_s + MARGIN_S
    assert_clean(mark)


def test_an_infinite_loop_gets_the_cpu_limit(marked):
    executor, mark = marked()
    limits = SandboxLimits(cpu_time_s=1, timeout_s=8)
    result = executor.run("while True:\n    pass\n", limits=limits)
    assert result.stopped_by == "cpu_time"
    assert result.seconds < limits.timeout_s
    assert_clean(mark)


def test_a_sleeper_gets_the_wall_clock(marked):
    executor, mark = marked()
    limits = SandboxLimits(timeout_s=1)
    result = executor.run("import time\nprint('started', flush=True)\ntime.sleep(30)\n",
                          limits=limits)
    assert result.stopped_by == "wall_time" and result.exit_code == -9
    assert result.stdout == "started\n"  # what it printed before is kept
    assert result.seconds < limits.timeout_s + MARGIN_S
    assert_clean(mark)


def test_a_20_gb_allocation_is_refused_and_memory_comes_back(marked):
    executor, mark = marked()
    before = mem_available_mb()
    # mmap reserves the 20 GB without touching it: refused under the limit, and harmless
    # where a broken sandbox grants it (bytearray would write all 20 GB).
    result = executor.run("import mmap\nx = mmap.mmap(-1, 20 * 2**30)\nprint('allocated')\n",
                          limits=SandboxLimits(memory_mb=512))
    assert result.stopped_by == "memory"
    assert "allocated" not in result.stdout
    assert mem_available_mb() > before - 1024  # nothing near 20 GB is held
    assert_clean(mark)


def test_a_large_file_gets_the_file_size_limit(marked):
    executor, mark = marked()
    name = f"/tmp/align-hostile-{uuid.uuid4().hex}.bin"
    result = executor.run(f"""
with open({name!r}, "wb") as file:
    for _ in range(1024):
        file.write(b"x" * 2**20)
""", limits=SandboxLimits(file_size_mb=4, disk_mb=32))
    assert result.stopped_by == "file_size"
    assert not Path(name).exists()  # written in the sandbox's own /tmp, gone with it
    assert_clean(mark)


def test_many_small_files_get_the_disk_limit(marked):
    executor, mark = marked()
    before = mem_available_mb()
    result = executor.run("""
for i in range(256):
    with open(f"part-{i}", "wb") as file:
        file.write(b"x" * 2**20)
""", limits=SandboxLimits(file_size_mb=4, disk_mb=16))
    assert result.stopped_by == "disk"
    assert mem_available_mb() > before - 512  # the tmpfs went with the execution
    assert_clean(mark)


def test_writes_outside_the_folder_reach_nothing(marked, host_folder, tmp_path):
    executor, mark = marked()
    refused = [host_folder / "planted", tmp_path / "planted",
               Path(__file__).with_name("planted.py")]
    private = [Path("/var/tmp/align-planted"), Path("/dev/shm/align-planted")]  # its own /tmp
    result = executor.run(f"""
for path in {[str(t) for t in refused + private]!r}:
    try:
        open(path, "w").write("planted")
        print("wrote", path)
    except OSError as err:
        print("refused", path)
""")
    assert result.stdout.splitlines() == [f"refused {t}" for t in refused] + \
        [f"wrote {t}" for t in private]
    assert not any(t.exists() for t in refused + private)
    assert_clean(mark)


def test_the_parent_environment_does_not_reach_the_code(marked, monkeypatch):
    secret = f"hf_{uuid.uuid4().hex}"
    monkeypatch.setenv("HF_TOKEN", secret)
    executor, mark = marked()
    result = executor.run("""
import glob, os
print(os.environ)
for path in glob.glob("/proc/*/environ"):
    try:
        print(open(path, "rb").read())
    except OSError:
        pass
print(open("/proc/1/cmdline", "rb").read() if os.access("/proc/1/cmdline", os.R_OK) else "")
""")
    assert result.ok, result.stderr
    assert secret not in result.stdout
    assert "HF_TOKEN" not in result.stdout
    assert_clean(mark)


def test_hidden_folders_are_empty(marked, host_folder):
    (host_folder / "token").write_text("secret")
    (host_folder / "token").chmod(0o644)
    executor, mark = marked(hide_paths=[str(host_folder)])
    result = executor.run(f"""
import os
print(os.listdir({str(host_folder)!r}))
print(open({str(host_folder / 'token')!r}).read())
""")
    assert result.stdout.startswith("[]")
    assert "secret" not in result.stdout
    assert_clean(mark)


def test_no_connection_reaches_a_server_on_localhost(marked):
    server = socket.create_server(("127.0.0.1", 0))
    executor, mark = marked()
    result = executor.run(f"""
import socket
socket.create_connection(("127.0.0.1", {server.getsockname()[1]}), timeout=2).sendall(b"x")
""")
    server.settimeout(0.2)  # a connection made would wait here, accepted or not
    with pytest.raises(TimeoutError):
        server.accept()
    server.close()
    assert "Network is unreachable" in result.stderr
    assert_clean(mark)


def test_a_background_child_does_not_outlive_the_call(marked):
    executor, mark = marked()
    result = executor.run("""
import os, subprocess, time
subprocess.Popen(["sleep", "300"], start_new_session=True)
if os.fork() == 0:  # a daemon: its own session, its parent gone
    os.setsid()
    if os.fork() == 0:
        time.sleep(300)
    os._exit(0)
print("left them behind")
""", limits=SandboxLimits(timeout_s=5))
    assert result.ok and result.stdout == "left them behind\n"
    assert result.seconds < 5
    assert_clean(mark)


def test_100_mb_of_output_is_cut_and_stops_the_code(marked):
    executor, mark = marked()
    limits = SandboxLimits(max_output_bytes=64 * 1024, timeout_s=10)
    result = executor.run("""
import sys
for _ in range(100):
    sys.stdout.write("x" * 2**20)
""", limits=limits)
    assert result.stopped_by == "output"
    assert result.stdout_truncated and len(result.stdout) == limits.max_output_bytes
    assert result.seconds < 3
    assert_clean(mark)


def test_files_and_stdin_reach_the_code(marked):
    executor, _ = marked()
    main = "import sys\nsys.path.insert(0, 'lib')\nimport helper\n" \
        "print(helper.twice(sys.stdin.read()))\n"
    result = executor.run(main, files={"lib/helper.py": "def twice(text):\n    return 2 * text\n"},
                          stdin="ab")
    assert result.ok and result.stdout == "abab\n"
    assert result.exit_code == 0 and result.stopped_by is None


def test_paths_that_leave_the_folder_are_refused(marked):
    executor, _ = marked()
    with pytest.raises(ValueError, match="relative"):
        executor.run("pass", files={"../escape.py": "x"})
    assert os.path.exists("/tmp")


def test_an_interpreter_that_lives_in_tmp_still_runs(tmp_path_factory):
    """/tmp is private to the code; a venv under the host's /tmp is bound back into it."""
    import subprocess
    import sys
    import tempfile

    from align.sandbox import Sandbox
    from align.sandbox.local import LocalExecutor

    folder = Path(tempfile.mkdtemp(dir="/tmp", prefix="sandbox-venv-"))
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True)
    result = Sandbox(executor=LocalExecutor(python=str(folder / "bin" / "python"))).run(
        "print(6 * 7)")
    assert result.ok and result.stdout.strip() == "42", result
