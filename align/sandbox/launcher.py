"""The local sandbox's launcher: one process per execution, started by align.sandbox.local as
``python -I -S launcher.py SPEC_FD STATUS_FD``.

It reads the execution's spec (JSON) from SPEC_FD and builds, in this order:

1. a PID namespace (with a user namespace first when not root), whose first process, `init`,
   stays outside the code's reach: when init ends, the kernel kills every process left in the
   namespace, so nothing the code started can outlive the execution;
2. in init: mount, network (unless the spec allows the network), IPC and UTS namespaces;
   every mount of the host read-only; a tmpfs of ``disk_mb`` on /tmp (also seen at /var/tmp,
   /dev/shm and /run/lock) holding the working folder and the spec's files; a fresh /proc;
   each hidden folder replaced by an empty tmpfs with only the interpreter's own folders bound
   back, read-only;
3. the code's process: rlimits, then an unprivileged identity (as root: a uid of its own, so
   RLIMIT_NPROC counts only this execution's processes; in a user namespace: no capabilities),
   no new privileges, death with init, then ``execve`` of the interpreter.

It reports on STATUS_FD, one JSON object a line: ``{"error": TEXT}`` when any step of the
set-up fails (the sandbox's failure, never the code's), and ``{"exit": STATUS, "cpu_s": S}``
when the code's process ends.

It imports only the standard library: it runs under the code's interpreter, which need not
have align installed.
"""

from __future__ import annotations

import base64
import ctypes
import json
import os
import resource
import signal
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
MS_NOATIME, MS_NODIRATIME, MS_RELATIME, MS_STRICTATIME = 1024, 2048, 1 << 21, 1 << 24
_PER_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC,
                    "noatime": MS_NOATIME, "nodiratime": MS_NODIRATIME,
                    "relatime": MS_RELATIME, "strictatime": MS_STRICTATIME}
PR_SET_PDEATHSIG, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 28, 38
# SECBIT_NOROOT and NO_CAP_AMBIENT_RAISE, each with its lock: uid 0 of a user namespace gains
# no capabilities at execve, and the code can never take them back.
_SECUREBITS = 0b11 | 0b11000000
TMP = "/tmp"
SHARED_TMP = ("/var/tmp", "/dev/shm", "/run/lock")  # world-writable places, all the one tmpfs
INODES_PER_MB = 256  # files the tmpfs may hold per MiB (empty files cost kernel memory)

_libc = ctypes.CDLL(None, use_errno=True)


def _check(result: int, what: str) -> None:
    if result != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"{what}: {os.strerror(code)}")


def _unshare(flags: int) -> None:
    _check(_libc.unshare(flags), "unshare")


def _mount(source: str | None, target: str, fstype: str | None, flags: int,
           data: str | None = None) -> None:
    _check(_libc.mount(_bytes(source), target.encode(), _bytes(fstype), ctypes.c_ulong(flags),
                       _bytes(data)), f"mount {target}")


def _bytes(text: str | None) -> bytes | None:
    return text.encode() if text is not None else None


def _prctl(option: int, value: int) -> None:
    _check(_libc.prctl(option, ctypes.c_ulong(value), 0, 0, 0), f"prctl {option}")


def _report(fd: int, **message: object) -> None:
    os.write(fd, (json.dumps(message) + "\n").encode())


def _read_spec(fd: int) -> dict:
    chunks = []
    while chunk := os.read(fd, 1 << 16):
        chunks.append(chunk)
    os.close(fd)
    return json.loads(b"".join(chunks))


def main() -> None:
    spec_fd, status_fd = int(sys.argv[1]), int(sys.argv[2])
    os.set_inheritable(status_fd, False)  # the code must not write on it
    try:
        spec = _read_spec(spec_fd)
        _enter_user_and_pid_namespaces(spec)
        init = os.fork()
    except Exception as err:  # reported as the sandbox's failure, never the code's
        _report(status_fd, error=f"{type(err).__name__}: {err}")
        sys.exit(1)
    if init == 0:
        _run_init(spec, status_fd)
    os.waitpid(init, 0)


def _enter_user_and_pid_namespaces(spec: dict) -> None:
    if spec["uid"] is not None:  # root: its own uid below instead of a user namespace
        _unshare(CLONE_NEWPID)
        return
    uid, gid = os.getuid(), os.getgid()
    _unshare(CLONE_NEWUSER | CLONE_NEWPID)
    for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"),
                       ("gid_map", f"0 {gid} 1")):
        with open(f"/proc/self/{name}", "w") as file:
            file.write(text)


def _run_init(spec: dict, status_fd: int) -> None:
    """PID 1 of the namespace: builds the file system view, starts the code, reaps.

    It dies with the launcher (its parent-death signal), and, being in the launcher's process
    group, with the group's kill, which covers a launcher killed before the signal was set.
    """
    try:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        _unshare(CLONE_NEWNS | CLONE_NEWIPC | CLONE_NEWUTS)
        if not spec["allow_network"]:
            try:
                _unshare(CLONE_NEWNET)
            except OSError as err:
                raise OSError(err.errno, f"network namespace: {err.strerror}") from None
        _build_file_system(spec)
        init = os.getpid()
        code = os.fork()
    except Exception as err:
        _report(status_fd, error=f"{type(err).__name__}: {err}")
        os._exit(1)
    if code == 0:
        _exec_code(spec, status_fd, init)
    while True:  # reap orphans too, until the code's own process ends
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == code:
            _report(status_fd, exit=status, cpu_s=usage.ru_utime + usage.ru_stime)
            os._exit(0)  # the kernel now kills whatever the code left behind


def _build_file_system(spec: dict) -> None:
    _mount(None, "/", None, MS_REC | MS_PRIVATE)  # nothing below propagates to the host
    keep = {path: os.open(path, os.O_PATH) for path in spec["keep"]}  # before hiding covers it
    for target, options in _mounts():  # the host's mounts, each still reachable by its path
        _read_only(target, options)
    inodes = INODES_PER_MB * spec["disk_mb"]
    _mount("tmpfs", TMP, "tmpfs", MS_NOSUID | MS_NODEV,
           f"size={spec['disk_mb']}m,nr_inodes={inodes},mode=1777")
    _write_files(spec)
    for folder in SHARED_TMP:
        if os.path.isdir(folder):
            _mount(TMP, folder, None, MS_BIND)
    for path, fd in keep.items():  # an interpreter that lives in /tmp (a venv there) stays
        if any(path == t or path.startswith(t + "/") for t in (TMP, *SHARED_TMP)):
            os.makedirs(path, mode=0o755, exist_ok=True)
            _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            _read_only(path, "")
    _mount("proc", "/proc", "proc", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC)
    for folder in spec["hide"]:
        _hide(folder, {path: fd for path, fd in keep.items()
                       if path == folder or path.startswith(folder.rstrip("/") + "/")})
    for fd in keep.values():
        os.close(fd)
    _libc.sethostname(b"sandbox", 7)


def _write_files(spec: dict) -> None:
    owner = spec["uid"] if spec["uid"] is not None else 0
    workdir = spec["workdir"]
    os.mkdir(workdir, 0o700)
    os.chown(workdir, owner, owner)
    for name, content in spec["files"].items():
        path = os.path.join(workdir, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as file:
            file.write(base64.b64decode(content))
    for folder, _, names in os.walk(workdir):
        for path in (folder, *(os.path.join(folder, n) for n in names)):
            os.chown(path, owner, owner)


def _hide(folder: str, keep: dict[str, int]) -> None:
    """An empty read-only tmpfs over `folder`, the kept paths below it bound back read-only."""
    _mount("tmpfs", folder, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=755")
    for path, fd in sorted(keep.items()):
        if path != folder:
            os.makedirs(path, mode=0o755, exist_ok=True)
        _mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
        _read_only(path, "")
    _read_only(folder, "")


def _mounts() -> list[tuple[str, str]]:
    """(mount point, per-mount options) of every mount, as /proc/self/mountinfo lists them."""
    found = []
    with open("/proc/self/mountinfo") as file:
        for line in file:
            fields = line.split()
            target = fields[4].encode().decode("unicode_escape")  # \040 is a space
            found.append((target, fields[5]))
    return found


def _read_only(target: str, options: str) -> None:
    """Remount `target` read-only, keeping its nosuid/noexec/atime options (a user namespace
    may not drop them), and nosuid and nodev in any case."""
    flags = MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV
    for option in options.split(","):
        flags |= _PER_MOUNT_FLAGS.get(option, 0)
    _mount(None, target, None, flags)


def _exec_code(spec: dict, status_fd: int, init: int) -> None:
    try:
        for name, value in spec["rlimits"].items():
            # RLIMIT_CPU: SIGXCPU at the soft limit, SIGKILL a second later
            hard = value + 1 if name == "RLIMIT_CPU" else value
            resource.setrlimit(getattr(resource, name), (value, hard))
        if spec["uid"] is not None:
            os.setgroups([])
            os.setgid(spec["uid"])
            os.setuid(spec["uid"])
        else:
            _prctl(PR_SET_SECUREBITS, _SECUREBITS)
        _prctl(PR_SET_NO_NEW_PRIVS, 1)
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
        if os.getppid() != init:  # init died before the line above: so must this
            os._exit(1)
        os.chdir(spec["workdir"])
        os.execve(spec["argv"][0], spec["argv"], spec["env"])
    except Exception as err:
        _report(status_fd, error=f"{type(err).__name__}: {err}")
    os._exit(127)


if __name__ == "__main__":
    main()
