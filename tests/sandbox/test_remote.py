"""The http backend against a service that speaks SandboxFusion's run_code (served here by the
local sandbox), and its retry and failure rules."""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.errors import ConfigError
from align.sandbox import (
    HttpExecutor,
    LocalExecutor,
    Sandbox,
    SandboxConfig,
    SandboxError,
    SandboxLimits,
    take_metrics,
)
from align.sandbox.checks import check_start
from tests.sandbox.conftest import needs_namespaces

pytestmark = needs_namespaces


class FakeSandboxFusion(BaseHTTPRequestHandler):
    """POST /run_code as SandboxFusion answers it; `script` holds canned failures to give
    first (an HTTP status, or "sandbox-error")."""

    script: list = []
    requests: list[dict] = []
    local = LocalExecutor()

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append({**body, "authorization": self.headers["Authorization"]})
        if self.path != "/run_code":
            return self._send(404, {"detail": "Not Found"})
        if self.script:
            canned = self.script.pop(0)
            if canned == "sandbox-error":
                return self._send(200, {"status": "SandboxError", "message": "pod evicted",
                                        "run_result": None})
            return self._send(canned, {"detail": "busy"})
        files = {name: base64.b64decode(data) for name, data in body["files"].items()}
        result = self.local.run(body["code"], files=files, stdin=body["stdin"] or "",
                                limits=SandboxLimits(timeout_s=body["run_timeout"]))
        run = {"status": "TimeLimitExceeded" if result.timed_out else "Finished",
               "return_code": None if result.timed_out else result.exit_code,
               "stdout": result.stdout, "stderr": result.stderr,
               "execution_time": result.seconds}
        status = "Success" if result.ok else "Failed"
        self._send(200, {"status": status, "message": "", "compile_result": None,
                         "run_result": run, "files": {}, "executor_pod_name": None})

    def _send(self, code: int, answer: dict) -> None:
        data = json.dumps(answer).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def service(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    FakeSandboxFusion.script, FakeSandboxFusion.requests = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeSandboxFusion)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_code_files_and_stdin_run_on_the_service(service):
    executor = HttpExecutor(service)
    result = executor.run("import helper, sys\nprint(helper.twice(sys.stdin.read()))\nexit(3)",
                          files={"helper.py": "def twice(x):\n    return x * 2\n"}, stdin="ab")
    assert (result.stdout, result.exit_code, result.stopped_by) == ("abab\n", 3, None)
    sent = FakeSandboxFusion.requests[-1]
    assert sent["language"] == "python" and sent["run_timeout"] == SandboxLimits().timeout_s
    assert sent["memory_limit_MB"] == SandboxLimits().memory_mb
    assert base64.b64decode(sent["files"]["helper.py"]).startswith(b"def twice")


def test_a_time_limit_and_a_memory_error_are_named(service):
    executor = HttpExecutor(service)
    slow = executor.run("import time\ntime.sleep(30)", limits=SandboxLimits(timeout_s=1))
    assert slow.timed_out and slow.exit_code == -9
    hog = executor.run("import mmap\nx = mmap.mmap(-1, 20 * 2**30)")
    assert hog.stopped_by == "memory"


def test_output_is_cut_here(service):
    result = HttpExecutor(service).run("print('x' * 5000)",
                                       limits=SandboxLimits(max_output_bytes=1000))
    assert result.stdout_truncated and len(result.stdout) == 1000


def test_busy_answers_are_retried(service):
    FakeSandboxFusion.script = [503, 429]
    result = HttpExecutor(service, max_tries=3, backoff_s=0.01).run("print(1)")
    assert result.stdout == "1\n"
    assert len(FakeSandboxFusion.requests) == 3


def test_the_services_own_failure_is_a_sandbox_error_and_counted(service):
    FakeSandboxFusion.script = ["sandbox-error"]
    sandbox = Sandbox(SandboxConfig(backend="http", url=service, max_tries=1))
    take_metrics()
    with pytest.raises(SandboxError, match="pod evicted"):
        sandbox.run("print(1)")
    assert take_metrics()["sandbox/infra_failures"] == 1


def test_a_500_fails_at_once(service):
    FakeSandboxFusion.script = [500]
    with pytest.raises(SandboxError, match="HTTP 500"):
        HttpExecutor(service, max_tries=3, backoff_s=0.01).run("print(1)")
    assert len(FakeSandboxFusion.requests) == 1


def test_a_url_that_does_not_answer_names_the_key():
    config = SandboxConfig(backend="http", url="http://127.0.0.1:9", max_tries=1)
    with pytest.raises(ConfigError, match=r"sandbox\.url: .*127\.0\.0\.1:9 does not answer"):
        check_start(config, Sandbox(config).executor)


def test_a_bearer_token_comes_from_the_environment(service, monkeypatch):
    monkeypatch.setenv("SANDBOX_TOKEN", "s3cret")
    HttpExecutor(service, token_env="SANDBOX_TOKEN").run("print(1)")
    assert FakeSandboxFusion.requests[-1]["authorization"] == "Bearer s3cret"
    monkeypatch.delenv("SANDBOX_TOKEN")
    with pytest.raises(SandboxError, match="token_env names SANDBOX_TOKEN, which is not set"):
        HttpExecutor(service, token_env="SANDBOX_TOKEN").run("print(1)")
