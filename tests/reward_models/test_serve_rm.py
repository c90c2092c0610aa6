"""`align serve-rm`: HttpReward against the server on 127.0.0.1 gives the model's own numbers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from reward_models import load_reward
from reward_models.reward_model import load_reward_model, score_texts
from reward_models.server import RewardModelServer, split_query

PROMPTS = ["Q: 23+58=", "Q: 10+10=", "Q: 99+99="]
COMPLETIONS = [" 81", " 20", " 198!"]
STARTUP_TIMEOUT_S = 120  # imports and model loading; seconds on an idle machine


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for key in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture(scope="module")
def server(tiny_reward_model_dir):
    with serving(RewardModelServer(("127.0.0.1", 0), tiny_reward_model_dir,
                                   max_body_bytes=4096, max_samples=8)) as srv:
        yield srv


@contextlib.contextmanager
def serving(srv: RewardModelServer):
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def expected(folder: str) -> list[float]:
    model, tok = load_reward_model(folder)
    return score_texts(model, tok, PROMPTS, COMPLETIONS)


def post(url: str, data: bytes, **headers: str) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=data, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
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
    (json.dumps({"prompts": [1], "completions": [" 2"]}).encode(),
     "sample 0: the prompt must be a string or a list"),
    (json.dumps({"prompts": [[{"role": "user"}]], "completions": [" 2"]}).encode(),
     "sample 0: the prompt must be a string or a list of"),
    (json.dumps({"prompts": ["a", "b"], "completions": [" 2", {"x": 1}]}).encode(),
     "sample 1: the completion"),
    (b"[" * 2000 + b"]" * 2000, "nested too deeply"),
])
def test_invalid_request_is_400_with_a_message(server, body, needle):
    status, answer = post(server.url, body)
    assert status == 400
    assert needle in answer["error"]


def test_openrlhf_requests_get_the_model_scores(server, tiny_reward_model_dir):
    """/get_reward as an OpenRLHF trainer posts to it: each query the decoded sequence with its
    special tokens (left padding, the closing EOS, right padding), the prompts beside it."""
    tok = server.tokenizer
    queries = [tok.pad_token * 2 + p + c + tok.eos_token + tok.pad_token
               for p, c in zip(PROMPTS, COMPLETIONS)]
    url = server.url.replace("/score", "/get_reward")
    body = {"query": queries, "prompts": PROMPTS, "labels": ["81", "20", "198"]}
    status, answer = post(url, json.dumps(body).encode())
    assert status == 200, answer
    assert answer["rewards"] == pytest.approx(expected(tiny_reward_model_dir), abs=1e-6)
    assert answer["scores"] == answer["rewards"]
    status, alone = post(url, json.dumps({"query": queries}).encode())  # no prompts given
    assert status == 200 and len(alone["rewards"]) == 3


def test_an_openrlhf_query_is_split_into_its_prompt_and_completion(server):
    """Scored as /score scores the pair (prompt ids + completion ids, which for a subword
    tokenizer differ from the ids of the joined text), once the special tokens are dropped."""
    tok = server.tokenizer
    pad, eos = tok.pad_token, tok.eos_token
    assert split_query(tok, f"{pad}{pad}Q: 1+1= 2{eos}{pad}", "Q: 1+1=") == ("Q: 1+1=", " 2")
    assert split_query(tok, f"Q: 1+1= 2{eos}", "Q: 9+9=") == ("", "Q: 1+1= 2")
    assert split_query(tok, "Q: 1+1= 2", "") == ("", "Q: 1+1= 2")


@pytest.mark.parametrize(("body", "needle"), [
    ({"prompts": PROMPTS}, "'query' must be a list of strings"),
    ({"query": ["a", 2]}, "'query' must be a list of strings"),
    ({"query": ["a", "b"], "prompts": ["a"]}, "'prompts' must be a list of 2 strings"),
    ({"query": ["a"] * 9}, "9 samples exceed the limit of 8"),
])
def test_invalid_openrlhf_request_is_refused_with_a_message(server, body, needle):
    status, answer = post(server.url.replace("/score", "/get_reward"), json.dumps(body).encode())
    assert status in (400, 413)
    assert needle in answer["error"]


def test_oversize_body_is_refused(server):
    body = json.dumps({"prompts": ["x" * 5000], "completions": [" 1"]}).encode()
    status, answer = post(server.url, body)
    assert status == 413
    assert "exceeds the limit of 4096" in answer["error"]
    assert post(server.url, json.dumps({"prompts": PROMPTS[:1],
                                        "completions": COMPLETIONS[:1]}).encode())[0] == 200


def test_health_and_unknown_path(server, tiny_reward_model_dir):
    with urllib.request.urlopen(server.url.replace("/score", "/health"), timeout=10) as response:
        text = response.read().decode()
    assert json.loads(text) == {"status": "ok", "model": Path(tiny_reward_model_dir).name}
    assert tiny_reward_model_dir not in text  # no absolute path
    assert post(server.url.replace("/score", "/other"), b"{}")[0] == 404


def first_line(proc: subprocess.Popen, timeout_s: float) -> str:
    """The process's first line of output, or a failure (not a hung test) after `timeout_s`."""
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: lines.put(proc.stdout.readline()), daemon=True).start()
    try:
        return lines.get(timeout=timeout_s)
    except queue.Empty:
        proc.kill()
        pytest.fail(f"serve-rm printed nothing within {timeout_s} s; stderr: "
                    f"{proc.communicate()[1][-2000:]}")


def test_cli_serves_on_loopback_and_stops_on_ctrl_c(tiny_reward_model_dir):
    proc = subprocess.Popen([sys.executable, "-m", "align.cli", "serve-rm",
                             tiny_reward_model_dir, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = first_line(proc, timeout_s=STARTUP_TIMEOUT_S)
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


def raw(server, request: bytes) -> tuple[int, str]:
    """Send `request` as bytes on a fresh connection; (status, body) of the answer."""
    with socket.create_connection(server.server_address[:2], timeout=10) as sock:
        sock.sendall(request)
        response = http.client.HTTPResponse(sock)
        response.begin()
        return response.status, response.read().decode()


def raw_post(server, headers: dict[str, str], body: bytes = b"{}") -> tuple[int, str]:
    host, port = server.server_address[:2]
    lines = ["POST /score HTTP/1.1", *(f"{k}: {v}" for k, v in {
        "Host": f"{host}:{port}", "Content-Type": "application/json",
        "Content-Length": str(len(body)), **headers}.items() if v is not None)]
    return raw(server, ("\r\n".join(lines) + "\r\n\r\n").encode() + body)


SAMPLE = json.dumps({"prompts": PROMPTS[:1], "completions": COMPLETIONS[:1]}).encode()


@pytest.mark.parametrize(("headers", "status", "needle"), [
    ({"Origin": "https://evil.example", "Content-Type": "text/plain"}, 403, "web pages"),
    ({"Host": "evil.example:8000", "Content-Type": "text/plain"}, 403, "evil.example"),
    ({"Host": "rebound.example"}, 403, "not this server's address"),
    ({"Content-Type": "text/plain"}, 415, "application/json"),
    ({"Content-Type": None}, 415, "application/json"),
])
def test_requests_a_web_page_could_send_are_refused(server, headers, status, needle):
    code, body = raw_post(server, headers, SAMPLE)
    assert code == status and needle in body, body


@pytest.mark.parametrize(("length", "status"), [("\u00b2", 400), ("12a", 400), ("-1", 400),
                                                ("9" * 5000, 413)])
def test_a_bad_content_length_gets_an_answer(server, length, status):
    """`\u00b2` (superscript two) passes str.isdigit() but not int(): the handler crashed."""
    host, port = server.server_address[:2]
    code, body = raw(server, (f"POST /score HTTP/1.1\r\nHost: {host}:{port}\r\n"
                              "Content-Type: application/json\r\n"
                              f"Content-Length: {length}\r\n\r\n").encode("latin-1"))
    assert code == status, body


def test_more_samples_than_the_limit_is_413_naming_it(server):
    body = json.dumps({"prompts": ["Q"] * 9, "completions": [" 1"] * 9}).encode()
    status, answer = post(server.url, body)
    assert status == 413 and "9 samples exceed the limit of 8 per request" in answer["error"]


def test_a_500_reveals_nothing(server, monkeypatch):
    import reward_models.server as module

    def broken(*args, **kwargs):
        raise RuntimeError("secret /home/user/model")

    monkeypatch.setattr(module, "score_texts", broken)
    status, answer = post(server.url, SAMPLE)
    assert status == 500 and "secret" not in json.dumps(answer)


def test_a_token_is_required_when_set(tiny_reward_model_dir, monkeypatch):
    with serving(RewardModelServer(("127.0.0.1", 0), tiny_reward_model_dir,
                                   token="s3cret")) as srv:
        assert post(srv.url, SAMPLE)[0] == 401
        assert post(srv.url, SAMPLE, Authorization="Bearer wrong")[0] == 401
        assert post(srv.url, SAMPLE, Authorization="Bearer s3cret")[0] == 200
        reward = load_reward({"spec": srv.url, "kwargs": {
            "max_tries": 1, "headers": {"Authorization": "Bearer s3cret"}}})
        assert len(reward(PROMPTS, COMPLETIONS)) == 3
        monkeypatch.setenv("RM_TOKEN", "s3cret")
        reward = load_reward({"spec": srv.url, "kwargs": {"max_tries": 1,
                                                          "token_env": "RM_TOKEN"}})
        assert len(reward(PROMPTS, COMPLETIONS)) == 3


def test_a_small_request_is_not_stuck_behind_a_large_one(tiny_reward_model_dir):
    """Forward passes take turns a batch at a time: the small one waits for a batch or two."""
    with serving(RewardModelServer(("127.0.0.1", 0), tiny_reward_model_dir,
                                   batch_size=4, max_samples=4000)) as srv:
        big = json.dumps({"prompts": ["Q: 12+34="] * 2000,
                          "completions": [" 46"] * 2000}).encode()
        done = {}

        def send_big():
            post(srv.url, big)
            done["big"] = time.monotonic()

        thread = threading.Thread(target=send_big)
        started = time.monotonic()
        thread.start()
        time.sleep(0.3)  # the big request is being scored
        assert post(srv.url, SAMPLE)[0] == 200
        small = time.monotonic()
        thread.join(120)
        assert small < done["big"], "the small request waited for the whole large one"
        assert small - started < (done["big"] - started) / 2


def test_a_burst_of_connections_is_answered(server):
    """200 concurrent requests: none reset (the listen backlog was 5)."""
    results = []

    def one():
        try:
            results.append(post(server.url, SAMPLE)[0])
        except OSError as err:
            results.append(repr(err))

    threads = [threading.Thread(target=one) for _ in range(200)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert results == [200] * 200, [r for r in results if r != 200][:5]
