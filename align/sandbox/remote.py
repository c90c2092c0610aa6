"""The ``http`` backend: code runs on a remote service that speaks SandboxFusion's ``run_code``.

Request, ``POST {url}/run_code``::

    {"code": "<main.py>", "language": "python", "stdin": "...",
     "run_timeout": 10, "compile_timeout": 10, "memory_limit_MB": 1024,
     "files": {"solution.py": "<base64>"}, "fetch_files": []}

Answer::

    {"status": "Success" | "Failed" | "SandboxError", "message": "...",
     "run_result": {"status": "Finished" | "TimeLimitExceeded" | "Error",
                    "return_code": 0, "stdout": "...", "stderr": "...",
                    "execution_time": 0.05}, ...}

``SandboxError`` (or a run status ``Error``, which the service reports for its own failures) is
the service's failure, raised as ``align.sandbox.SandboxError``; ``Failed`` is the code's
(a non-zero exit or a time limit). The transport follows align's HTTP rules
(``align.http_json``): each attempt may take ``timeout_s`` plus ``HTTP_SLACK_S`` from connecting
to the last byte; connection failures and 429/502/503/504 are retried.

The limits the service applies are its own: it is sent the wall clock and memory; CPU time,
file size, disk, open files and processes are whatever the service enforces. Output comes back
whole and is cut here to ``max_output_bytes`` (an answer over ``MAX_ANSWER_BYTES`` fails).
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping

from align.config import SandboxLimits
from align.http_json import JsonPost, bearer_header
from align.sandbox.local import MAIN, program_files
from align.sandbox.result import ExecutionResult, SandboxError, classify_stop

HTTP_SLACK_S = 10.0  # an attempt's deadline beyond the code's own: queueing, start-up, transfer
MAX_ANSWER_BYTES = 64 << 20  # the service returns all output; a longer answer is an error


class HttpExecutor:
    """A client of a SandboxFusion-compatible service; safe to call from threads.

    Args:
        url: The service's base URL (``/run_code`` is appended).
        max_tries: Attempts in all for transient failures.
        backoff_s: Wait before the 2nd attempt; doubles for each further one.
        token_env: Environment variable holding a bearer token, if the service wants one.
    """

    def __init__(self, url: str, max_tries: int = 3, backoff_s: float = 0.5,
                 token_env: str | None = None) -> None:
        self.url = url.rstrip("/") + "/run_code"
        self.max_tries, self.backoff_s, self.token_env = max_tries, backoff_s, token_env

    def run(self, code: str | None = None, *, files: Mapping[str, str | bytes] | None = None,
            stdin: str | bytes = b"", limits: SandboxLimits | None = None,
            entry: str = MAIN) -> ExecutionResult:
        """Run ``code`` (or ``files[entry]``) on the service; see ``LocalExecutor.run``.

        Raises:
            SandboxError: When the service cannot be reached after every try, fails itself, or
                answers something that is not SandboxFusion's shape.
        """
        limits = limits or SandboxLimits()
        program = program_files(code, files, entry)
        main = program.pop(entry)
        body = {"code": main.decode("utf-8", errors="replace"), "language": "python",
                "stdin": stdin.decode("utf-8", errors="replace") if isinstance(stdin, bytes)
                else stdin,
                "run_timeout": limits.timeout_s, "compile_timeout": limits.timeout_s,
                "memory_limit_MB": limits.memory_mb, "fetch_files": [],
                "files": {name: base64.b64encode(data).decode() for name, data in program.items()}}
        post = JsonPost(self.url, limits.timeout_s + HTTP_SLACK_S, self.max_tries,
                        self.backoff_s, MAX_ANSWER_BYTES, error=SandboxError)
        start = time.monotonic()
        headers = bearer_header(self.token_env, SandboxError, "sandbox")
        answer = post(json.dumps(body).encode(), headers)
        return self._result(answer, limits, time.monotonic() - start)

    def _result(self, answer: object, limits: SandboxLimits, seconds: float) -> ExecutionResult:
        if not isinstance(answer, dict) or "status" not in answer:
            raise SandboxError(f"POST {self.url}: the answer is not SandboxFusion's "
                               f"(no 'status'): {str(answer)[:200]}")
        run = answer.get("run_result")
        if answer["status"] == "SandboxError" or not isinstance(run, dict) or \
                run.get("status") not in ("Finished", "TimeLimitExceeded"):
            raise SandboxError(f"POST {self.url}: the service failed: "
                               f"{answer.get('message') or str(run)[:200]}")
        out, out_cut = _cut(run.get("stdout") or "", limits.max_output_bytes)
        err, err_cut = _cut(run.get("stderr") or "", limits.max_output_bytes)
        if run["status"] == "TimeLimitExceeded":
            exit_code, stopped_by = -9, "wall_time"
        else:
            exit_code = int(run.get("return_code") or 0)
            stopped_by = classify_stop(exit_code, err, None, limits.cpu_time_s)
        elapsed = run.get("execution_time")
        return ExecutionResult(out, err, exit_code, stopped_by,
                               float(elapsed) if elapsed is not None else seconds,
                               out_cut, err_cut)


def _cut(text: str, limit: int) -> tuple[str, bool]:
    data = text.encode()
    if len(data) <= limit:
        return text, False
    return data[:limit].decode("utf-8", errors="ignore"), True
