"""Episode tools that run the model's code: ``environment.tools: [align.sandbox.tools:python]``.

A tool is a plain function with type hints and a Google-style docstring, which give its JSON
schema (transformers' ``get_json_schema``, as TRL and align's episodes read it). ``python``
runs in the process's default sandbox (``align.sandbox.default_sandbox``: the run's
``sandbox`` settings, or the ``ALIGN_SANDBOX`` environment variable in a process the trainer
did not configure). What the code printed goes back to the model as text, and so do its errors
and its stops (a traceback, a time limit): they are the model's to read. A failure of the
sandbox itself raises ``SandboxError``, which episodes count as an infrastructure failure.
"""

from __future__ import annotations

from align.config import SandboxLimits
from align.sandbox.result import ExecutionResult
from align.sandbox.sandbox import default_sandbox

_LIMIT_NAMES = {"cpu_time": "CPU time", "memory": "memory", "file_size": "file size",
                "disk": "disk space", "open_files": "open files", "processes": "processes"}


def python(code: str) -> str:
    """Run a Python program in a sandbox and return what it printed.

    The program runs in a fresh, empty folder, without network access, under time and memory
    limits. Print whatever you need to see.

    Args:
        code: The complete Python program to run.

    Returns:
        Its standard output then standard error, and how it ended if not normally.
    """
    sandbox = default_sandbox()
    return describe(sandbox.run(code), sandbox.config.limits)


def describe(result: ExecutionResult, limits: SandboxLimits) -> str:
    """An execution as the model reads it: stdout, stderr, then a bracketed note on a cut
    output, a stop or a non-zero exit (``[no output]`` when there is nothing else)."""
    text = result.stdout
    if result.stderr:
        text += ("" if not text or text.endswith("\n") else "\n") + result.stderr
    notes = []
    if result.stdout_truncated or result.stderr_truncated:
        notes.append(f"[output cut at {limits.max_output_bytes} bytes]")
    if result.timed_out:
        notes.append(f"[stopped: still running after {limits.timeout_s:g} s]")
    elif result.stopped_by in _LIMIT_NAMES:
        notes.append(f"[stopped: the {_LIMIT_NAMES[result.stopped_by]} limit]")
    elif result.exit_code != 0 and result.stopped_by is None:  # "output": the cut note says it
        notes.append(f"[exit status {result.exit_code}]")
    if not text and not notes:
        return "[no output]"
    return text + ("" if not text or text.endswith("\n") or not notes else "\n") + \
        "\n".join(notes)
