"""Many executions at once: each in its own folder, no cross-talk, nothing left behind."""

from __future__ import annotations

import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from align.sandbox import Job, LocalExecutor, Sandbox, SandboxConfig
from align.sandbox.local import interpreter_folders
from tests.conftest import full_only
from tests.sandbox.conftest import MARK, needs_namespaces, processes_marked

pytestmark = needs_namespaces

# Each execution writes its own number to a file of one shared name, reads it back after a
# pause (so that executions overlap), and lists its folder.
PROGRAM = """
import os, time
with open("mine.txt", "w") as file:
    file.write("{n}")
time.sleep(0.05)
print(open("mine.txt").read(), sorted(os.listdir(".")), sorted(os.listdir("/tmp")))
"""


# What the code's private /tmp holds: its working folder, and the top folder of an interpreter
# that lives under the host's /tmp (bound back, read-only), as a venv of a checkout there does.
PRIVATE_TMP = sorted({"work", *(Path(p).relative_to("/tmp").parts[0]
                                for p in interpreter_folders(sys.executable)
                                if p.startswith("/tmp/"))})


@pytest.mark.parametrize("count", [pytest.param(32, id="32"),
                                   pytest.param(200, id="200", marks=full_only)])
def test_concurrent_executions_stay_apart(count, capsys):
    mark = uuid.uuid4().hex
    sandbox = Sandbox(SandboxConfig(max_concurrent=8),
                      executor=LocalExecutor(env={MARK: mark}))
    tmp_before = set(os.listdir("/tmp"))
    start = time.perf_counter()
    results = sandbox.run_many([Job(code=PROGRAM.format(n=n)) for n in range(count)])
    seconds = time.perf_counter() - start
    for n, result in enumerate(results):
        assert result.ok, result.stderr
        assert result.stdout == f"{n} ['main.py', 'mine.txt'] {PRIVATE_TMP}\n"
    assert processes_marked(mark) == []
    assert not {f for f in set(os.listdir("/tmp")) - tmp_before if "sandbox" in f}
    with capsys.disabled():
        print(f"\n{count} executions, 8 at once: {seconds:.1f} s, "
              f"{count / seconds:.1f} executions/s")
