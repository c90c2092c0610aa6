"""`align serve-rm`: HttpReward against the server on 127.0.0.1 gives the model's own numbers."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request

import pytest

from reward_models import load_reward
from reward_models.reward_model import load_reward_model, score_texts
from reward_models.server import RewardModelServer

PROMPTS = ["Q: 23+58=", "Q: 10+10=", "Q: 99+99="]
COMPLETIONS = [" 81", " 20", " 198!"]


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server(tiny_reward_model_dir):
    srv = RewardModelServer(("127.0.0.1", 0), tiny_reward_model_dir, max_body_bytes=4096)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def expected(folder: str) -> list[float]:
    model, tok = load_reward_model(folder)
    return score_texts(model, tok, PROMPTS, COMPLETIONS)


def post(url: str, data: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def test_http_reward_gets_the_model_scores(server, tiny_reward_model_dir):
    reward = load_reward({"spec": server.url, "kwargs": {"max_tries": 1}})
    got = reward(PROMPTS, COMPLETIONS, answer=["81", "20", "198"])  # columns pass through
    assert got == pytest.approx(expected(tiny_reward_model_dir), abs=1e-6)


def test_http_reward_passes_truncation_to_the_server(server, tiny_reward_model_dir):
    reward = load_reward({"spec": server.url, "kwargs": {"max_tries": 1}})
    truncated = [True, False, True]
    model, tok = load_reward_model(tiny_reward_model_dir)
    want = score_texts(model, tok, PROMPTS, COMPLETIONS, truncated=truncated)
    assert want != pytest.approx(expected(tiny_reward_model_dir), abs=1e-6)
    assert reward(PROMPTS, COMPLETIONS, completion_truncated=truncated) == pytest.approx(
        want, abs=1e-6)


@pytest.mark.parametrize(("body", "needle"), [
    (b"{not json", "Expecting"),
    (b"[1, 2]", "JSON object"),
    (json.dumps({"prompts": PROMPTS}).encode(), "'completions' must be a list"),
    (json.dumps({"prompts": PROMPTS, "completions": COMPLETIONS[:2]}).encode(),
     "3 prompts but 2 completions"),
    (json.dumps({"prompts": [1], "completions": [" 2"]}).encode(), "must both be strings"),
])
def test_invalid_request_is_400_with_a_message(server, body, needle):
    status, answer = post(server.url, body)
    assert status == 400
    assert needle in answer["error"]


def test_oversize_body_is_refused(server):
    body = json.dumps({"prompts": ["x" * 5000], "completions": [" 1"]}).encode()
    status, answer = post(server.url, body)
    assert status == 413
    assert "exceeds the limit of 4096" in answer["error"]
    assert post(server.url, json.dumps({"prompts": PROMPTS[:1],
                                        "completions": COMPLETIONS[:1]}).encode())[0] == 200


def test_health_and_unknown_path(server):
    with urllib.request.urlopen(server.url.replace("/score", "/health"), timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    assert post(server.url.replace("/score", "/other"), b"{}")[0] == 404


def test_cli_serves_on_loopback_and_stops_on_ctrl_c(tiny_reward_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve-rm",
                             tiny_reward_model_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert "http://127.0.0.1:" in line, line + proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        reward = load_reward({"spec": url, "kwargs": {"max_tries": 1}})
        assert reward(PROMPTS, COMPLETIONS) == pytest.approx(expected(tiny_reward_model_dir),
                                                             abs=1e-6)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
        assert "stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
