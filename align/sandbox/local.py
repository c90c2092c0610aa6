"""The ``local`` backend: model-written Python runs on this machine, contained by Linux
namespaces and rlimits (the set-up itself is in ``launcher.py``; what it protects against, and
what it does not, in docs/sandbox.md).

Each execution gets a fresh launcher process in its own process group. This side feeds it the
spec and the code's stdin, reads stdout and stderr up to their cap, and at the deadline (or
when output overflows) kills the group: the launcher's death kills the namespace's first
process, and with it every process the code started.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from align.config import SandboxLimits
from align.sandbox.launcher import SHARED_TMP, TMP
from align.sandbox.result import ExecutionResult, SandboxError, classify_stop

LAUNCHER = str(Path(__file__).with_name("launcher.py"))
WORKDIR = f"{TMP}/work"  # the code's working folder inside the sandbox (and its HOME)
MAIN = "main.py"  # the file ``code`` is written to
# As root, each execution runs as a uid of its own from this range (no user has one), so the
# kernel's per-uid process count is the execution's alone.
UID_BASE, UID_SPAN = 1_500_000_000, 1 << 24
_READ_CHUNK = 1 << 16
_MiB = 1 << 20
_KILL_GRACE_S = 10.0  # after SIGKILL, the longest wait for the sandbox's pipes to close


@dataclass
class _Stream:
    """One output stream of the code, kept up to its cap."""

    cap: int
    data: bytearray = field(default_factory=bytearray)
    truncated: bool = False

    def add(self, chunk: bytes) -> bool:
        """Keep what fits; True when the stream went over its cap."""
        room = self.cap - len(self.data)
        self.data += chunk[:max(room, 0)]
        if len(chunk) > room:
            self.truncated = True
        return self.truncated

    def text(self) -> str:
        return self.data.decode("utf-8", errors="replace")


class _Writer:
    """A payload going into a pipe that must not block this loop."""

    def __init__(self, payload: bytes, close: Callable[[], None]) -> None:
        self.payload, self.done, self.close = payload, 0, close

    def send(self, fd: int) -> bool:
        """Write what the pipe takes now; True when the payload is all out (or unwanted)."""
        try:
            self.done += os.write(fd, self.payload[self.done:self.done + _READ_CHUNK])
        except BlockingIOError:
            return False
        except BrokenPipeError:  # the reader is gone, or the code exited without reading
            return True
        return self.done >= len(self.payload)


class LocalExecutor:
    """Runs Python code here, one contained process tree per call; safe to call from threads.

    Args:
        python: The interpreter for the code (and the launcher, which needs only its standard
            library); None: the one running this process.
        allow_network: Leave out the network namespace, so the code reaches the network.
        hide_paths: Folders the code sees as empty (``~`` is this user's home); the
            interpreter's own folders inside them stay visible, read-only. As root, folders
            other users may not enter on the way to the interpreter are hidden the same way.
        env: Variables the code sees besides the fixed ones (``base_environment``).
    """

    def __init__(self, python: str | None = None, allow_network: bool = False,
                 hide_paths: tuple[str, ...] | list[str] = ("~",),
                 env: Mapping[str, str] | None = None) -> None:
        self.python = shutil.which(python) or python if python else sys.executable
        self.allow_network = allow_network
        self.as_root = os.geteuid() == 0
        self.keep = interpreter_folders(self.python)
        hide = [str(Path(p).expanduser().resolve()) for p in hide_paths]
        hide = [p for p in hide if not _within(p, [TMP, *SHARED_TMP])]  # private already
        if self.as_root:  # the code's own uid could not pass these to reach its interpreter
            hide += [closed_folder(path) for path in self.keep]
        self.hide = outermost(sorted({p for p in hide if p and os.path.isdir(p)}), self.keep)
        self.env = {**base_environment(self.python), **(env or {})}
        self._uids: set[int] = set()
        self._lock = threading.Lock()

    def run(self, code: str | None = None, *, files: Mapping[str, str | bytes] | None = None,
            stdin: str | bytes = b"", limits: SandboxLimits | None = None,
            entry: str = MAIN) -> ExecutionResult:
        """Run ``code`` (written to main.py) or the ``entry`` file of ``files``.

        Args:
            code: A Python program.
            files: Further files of the working folder, by relative path.
            stdin: What the code reads on its standard input.
            limits: Its limits; None: the defaults of ``SandboxLimits``.
            entry: The file to run when ``code`` is None.

        Raises:
            SandboxError: When the sandbox cannot be set up (the message says why).
        """
        limits = limits or SandboxLimits()
        program = program_files(code, files, entry)
        uid = self._take_uid() if self.as_root else None
        try:
            spec = self._spec(program, entry, limits, uid)
            return _Execution(self.python, spec, stdin, limits, self.launcher_options()).run()
        finally:
            if uid is not None:
                with self._lock:
                    self._uids.discard(uid)

    def launcher_options(self) -> dict:
        """Extra ``subprocess.Popen`` arguments for the launcher (none: it runs as this
        process's user)."""
        return {}

    def _take_uid(self) -> int:
        with self._lock:
            while (uid := UID_BASE + secrets.randbelow(UID_SPAN)) in self._uids:
                pass
            self._uids.add(uid)
            return uid

    def _spec(self, program: dict[str, bytes], entry: str, limits: SandboxLimits,
              uid: int | None) -> dict:
        return {
            "uid": uid, "allow_network": self.allow_network, "hide": self.hide,
            "keep": self.keep, "disk_mb": limits.disk_mb, "workdir": WORKDIR,
            "files": {name: base64.b64encode(data).decode() for name, data in program.items()},
            "rlimits": {"RLIMIT_CPU": int(limits.cpu_time_s),
                        "RLIMIT_AS": limits.memory_mb * _MiB,
                        "RLIMIT_FSIZE": limits.file_size_mb * _MiB,
                        "RLIMIT_NOFILE": limits.open_files,
                        "RLIMIT_NPROC": limits.processes,
                        "RLIMIT_CORE": 1},  # 1, not 0: no core dump, not even to a pipe
            "argv": [self.python, "-s", "-u", "-B", entry], "env": self.env,
        }


def program_files(code: str | None, files: Mapping[str, str | bytes] | None,
                  entry: str) -> dict[str, bytes]:
    """The working folder's files as bytes, ``code`` as ``entry``; relative paths only."""
    program = {name: data.encode() if isinstance(data, str) else bytes(data)
               for name, data in (files or {}).items()}
    if code is not None:
        program[entry] = code.encode()
    for name in program:
        parts = Path(name).parts
        if not parts or Path(name).is_absolute() or ".." in parts:
            raise ValueError(f"file {name!r}: paths must be relative and stay in the folder")
    if entry not in program:
        raise ValueError(f"nothing to run: no code and no file {entry!r}")
    return program


def interpreter_folders(python: str) -> list[str]:
    """The folders an interpreter needs: its prefixes (a venv's and its base's) and the folder
    of every link on the way to its binary."""
    if os.path.realpath(python) == os.path.realpath(sys.executable):
        prefixes = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]
    else:
        probe = subprocess.run(
            [python, "-I", "-S", "-c", "import sys, json; print(json.dumps([sys.prefix, "
             "sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix]))"],
            capture_output=True, text=True, timeout=60, env={})
        if probe.returncode != 0:
            raise SandboxError(f"the interpreter {python} does not run: {probe.stderr[-300:]}")
        prefixes = json.loads(probe.stdout)
    folders = {os.path.realpath(p) for p in prefixes}
    path = python
    for _ in range(40):  # links on the way to the binary, each in its folder
        folders.add(os.path.dirname(os.path.abspath(path)))
        if not os.path.islink(path):
            break
        path = os.path.join(os.path.dirname(path), os.readlink(path))
    return sorted(f for f in folders if os.path.isdir(f))


def outermost(hide: list[str], keep: list[str]) -> list[str]:
    """The hidden folders that no other hides, or that lie in a kept folder (which the
    launcher binds back before it hides them)."""
    return [p for p in hide if not _within(p, hide, strictly=True) or _within(p, keep)]


def _within(path: str, folders: list[str], strictly: bool = False) -> bool:
    """Whether ``path`` is one of ``folders`` (unless ``strictly``) or lies below one."""
    return any(path.startswith(f.rstrip("/") + "/") or (path == f and not strictly)
               for f in folders)


def closed_folder(path: str) -> str:
    """The outermost folder on the way to ``path`` that other users may not enter ("" if
    none): hidden, with ``path`` bound back, it lets another uid reach ``path``."""
    current = "/"
    for part in Path(path).parts[1:]:
        current = os.path.join(current, part)
        if not os.stat(current).st_mode & stat.S_IXOTH:
            return current
    return ""


def base_environment(python: str) -> dict[str, str]:
    """The variables every execution sees: nothing of this process's environment."""
    folders = [os.path.dirname(os.path.abspath(python)), "/usr/local/bin", "/usr/bin", "/bin"]
    return {"PATH": ":".join(dict.fromkeys(folders)), "HOME": WORKDIR, "TMPDIR": "/tmp",
            "LANG": "C.UTF-8", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1"}


class _Execution:
    """One launcher process and the exchange with it."""

    def __init__(self, python: str, spec: dict, stdin: str | bytes, limits: SandboxLimits,
                 options: dict) -> None:
        self.python, self.limits, self.options = python, limits, options
        self.payloads = {"spec": json.dumps(spec).encode(),
                         "stdin": stdin.encode() if isinstance(stdin, str) else bytes(stdin)}
        self.streams = {"stdout": _Stream(limits.max_output_bytes),
                        "stderr": _Stream(limits.max_output_bytes)}
        self.status = bytearray()
        self.killed_for: str | None = None  # the limit the sandbox killed the code for
        self.killed_at: float | None = None

    def run(self) -> ExecutionResult:
        spec_r, spec_w = os.pipe()
        status_r, status_w = os.pipe()
        start = time.monotonic()
        try:
            process = subprocess.Popen(
                [self.python, "-I", "-S", LAUNCHER, str(spec_r), str(status_w)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                pass_fds=(spec_r, status_w), start_new_session=True, env={}, cwd="/",
                **self.options)
        except OSError as err:
            for fd in (spec_r, spec_w, status_r, status_w):
                os.close(fd)
            raise SandboxError(f"cannot start the sandbox's launcher with {self.python}: "
                               f"{err}") from err
        os.close(spec_r)
        os.close(status_w)
        try:
            self._exchange(process, spec_w, status_r, start + self.limits.timeout_s)
        finally:
            _kill_group(process)
            process.wait()
            for stream in (process.stdin, process.stdout, process.stderr):
                stream.close()
            os.close(status_r)
        return self._result(time.monotonic() - start)

    def _exchange(self, process: subprocess.Popen, spec_w: int, status_r: int,
                  deadline: float) -> None:
        """Write the spec and stdin, read everything, until every pipe is at its end."""
        selector = selectors.DefaultSelector()
        writers = {spec_w: _Writer(self.payloads["spec"], lambda: os.close(spec_w)),
                   process.stdin.fileno(): _Writer(self.payloads["stdin"], process.stdin.close)}
        readers = {process.stdout.fileno(): "stdout", process.stderr.fileno(): "stderr",
                   status_r: "status"}
        for fd in writers:
            os.set_blocking(fd, False)
            selector.register(fd, selectors.EVENT_WRITE)
        for fd in readers:
            selector.register(fd, selectors.EVENT_READ)
        try:
            while readers:
                now = time.monotonic()
                if now >= deadline and self.killed_at is None:
                    # an exit already reported is the code's own, whatever holds a pipe open
                    self._kill(process, None if b'"exit"' in self.status else "wall_time")
                if self.killed_at is not None and now - self.killed_at > _KILL_GRACE_S:
                    raise SandboxError("the sandbox's pipes stayed open "
                                       f"{_KILL_GRACE_S:g} s after SIGKILL")
                wait = deadline - now if self.killed_at is None else 0.0
                for key, _ in selector.select(max(wait, 0.05)):
                    if key.fd in writers:
                        if writers[key.fd].send(key.fd):
                            selector.unregister(key.fd)
                            writers.pop(key.fd).close()
                    elif not self._read(key.fd, readers[key.fd], process):
                        selector.unregister(key.fd)
                        del readers[key.fd]
        finally:
            selector.close()
            for writer in writers.values():
                writer.close()

    def _read(self, fd: int, name: str, process: subprocess.Popen) -> bool:
        chunk = os.read(fd, _READ_CHUNK)
        if not chunk:
            return False
        if name == "status":
            self.status += chunk
        elif self.streams[name].add(chunk) and self.killed_at is None:
            self._kill(process, "output")
        return True

    def _kill(self, process: subprocess.Popen, reason: str | None) -> None:
        self.killed_for, self.killed_at = reason, time.monotonic()
        _kill_group(process)

    def _result(self, seconds: float) -> ExecutionResult:
        messages = [json.loads(line) for line in self.status.decode().splitlines() if line]
        errors = [m["error"] for m in messages if "error" in m]
        ended = next((m for m in messages if "exit" in m), None)
        if errors:
            raise SandboxError(f"the local sandbox could not run the code: {errors[0]}")
        out, err = self.streams["stdout"], self.streams["stderr"]
        if ended is None and self.killed_for is None:
            raise SandboxError("the local sandbox's launcher ended without a report: "
                               f"{err.text()[-300:]!r}")
        if ended is not None:
            exit_code = os.waitstatus_to_exitcode(ended["exit"])
        else:
            exit_code = -signal.SIGKILL
        stopped_by = self.killed_for or classify_stop(
            exit_code, err.text(), ended and ended["cpu_s"], self.limits.cpu_time_s)
        return ExecutionResult(out.text(), err.text(), exit_code, stopped_by, seconds,
                               out.truncated, err.truncated)


def _kill_group(process: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group: the launcher, and through its death (the
    namespace's first process has it as its parent-death signal) everything in the sandbox."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass

