"""HttpReward against a tiny JSON server on 127.0.0.1 (port 0, a thread inside the test)."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from align.errors import ConfigError, RewardError
from reward_models import load_reward

PROMPTS = ["Q: 1+1=", "Q: 2+2="]
COMPLETIONS = [" 2", " 5"]
FAST = {"backoff_s": 0.01}  # keep retry tests quick


class Handler(BaseHTTPRequestHandler):
    """Routes by path: each path is one behaviour of a reward endpoint."""

    hits: Counter = Counter()
    bodies: dict = {}
    release = threading.Event()

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        Handler.hits[self.path] += 1
        try:
            self.route()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timeout, size limit): expected in these tests

    def route(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        Handler.bodies[self.path] = body
        if self.path == "/get_reward":  # OpenRLHF's protocol: query = prompt + completion
            rewards = [float(q.endswith(" " + str(a))) for q, a in zip(body["query"],
                                                                       body["labels"])]
            self.reply(200, {"rewards": rewards, "scores": rewards})
        elif self.path == "/score":
            rewards = [
                float(c.strip() == a) + (0.5 if p.startswith("Q:") else 0.0)
                for p, c, a in zip(body["prompts"], body["completions"], body["answer"])
            ]
            self.reply(200, {"rewards": rewards, "model": "test"})
        elif self.path == "/flaky":
            if Handler.hits[self.path] < 3:
                self.reply(503, {"error": "warming up"})
            else:
                self.reply(200, {"rewards": [None, 1.0]})
        elif self.path == "/slow":
            Handler.release.wait(timeout=3)
            self.reply(200, {"rewards": [0.0, 0.0]})
        elif self.path == "/big":
            self.reply(200, {"rewards": [0.0, 0.0], "padding": "x" * 5000})
        elif self.path == "/big-undeclared":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the client must stop reading by itself
            self.wfile.write(b'{"rewards": [0, 0], "padding": "' + b"x" * 5000 + b'"}')
        elif self.path == "/bad-request":
            self.reply(400, {"error": "completions missing"})
        elif self.path == "/not-json":
            self.send_response(200)
            self.send_header("Content-Length", "9")
            self.end_headers()
            self.wfile.write(b"<html>hi!")
        elif self.path == "/nan":
            self.reply(200, {"rewards": [1.0, float("nan")]})
        elif self.path.startswith("/redirect-"):  # /redirect-307-<port>
            _, code, port = self.path.split("-")
            self.send_response(int(code))
            self.send_header("Location", f"http://127.0.0.1:{port}/score")
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path == "/trickle":  # a byte at a time, each well within the socket timeout
            self.send_response(200)
            self.send_header("Content-Length", "200")
            self.end_headers()
            self.trickle([b" "] * 200)
        elif self.path == "/trickle-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\n")
            self.trickle([f"X-Pad-{i}: x\r\n".encode() for i in range(90)])
        elif self.path == "/slow-error-body":
            self.send_response(503)
            self.send_header("Content-Length", "100")
            self.end_headers()
            Handler.release.wait(timeout=3)
        elif self.path == "/fail":
            self.reply(500, {"error": "internal error"})
        elif self.path == "/bool":
            self.reply(200, {"rewards": [True, 1.0]})
        elif self.path == "/huge-int":
            data = b'{"rewards": [1' + b"0" * 400 + b', 1.0]}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif self.path == "/near-max":
            self.reply(200, {"rewards": [1.7e308, 1.0]})

    def trickle(self, pieces: list[bytes]) -> None:
        for piece in pieces:
            if Handler.release.is_set():
                return
            self.wfile.write(piece)
            time.sleep(0.1)

    def reply(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def server():
    Handler.hits.clear()
    Handler.release.clear()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    Handler.release.set()
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


def test_scores_batch_and_sends_columns(server):
    reward = load_reward(f"{server}/score")
    assert reward(PROMPTS, COMPLETIONS, answer=["2", "4"]) == [1.5, 0.5]
    assert Handler.hits["/score"] == 1


def test_the_openrlhf_protocol_sends_queries_prompts_and_labels(server):
    """OpenRLHF's remote reward-model request: the prompt + completion texts as `query`, the
    prompts, and the labels (here from the `answer` column); nothing else."""
    reward = load_reward(f"openrlhf:{server}/get_reward")
    assert reward(PROMPTS, COMPLETIONS, answer=["2", "4"]) == [1.0, 0.0]
    assert Handler.bodies["/get_reward"] == {
        "query": ["Q: 1+1= 2", "Q: 2+2= 5"], "prompts": PROMPTS, "labels": ["2", "4"]}
    same = load_reward({"spec": f"{server}/get_reward", "kwargs": {"protocol": "openrlhf"}})
    assert same(PROMPTS, COMPLETIONS, label=["5", "5"]) == [0.0, 1.0]


def test_the_openrlhf_protocol_refuses_what_it_cannot_send(server):
    reward = load_reward(f"openrlhf:{server}/get_reward")
    chat = [[{"role": "user", "content": p}] for p in PROMPTS]
    with pytest.raises(RewardError, match="sample 0: the OpenRLHF protocol sends each query "
                                          "as text.*prompt is a list"):
        reward(chat, COMPLETIONS)
    with pytest.raises(ConfigError, match="protocol must be one of align, openrlhf"):
        load_reward({"spec": f"{server}/x", "kwargs": {"protocol": "grpc"}})
    with pytest.raises(ConfigError, match="kwargs.protocol is 'align'"):
        load_reward({"spec": f"{server}/x", "style": "openrlhf", "kwargs": {"protocol": "align"}})
    with pytest.raises(ConfigError, match="style 'verl' applies to functions"):
        load_reward(f"verl:{server}/x")


def test_retries_5xx_with_backoff(server):
    reward = load_reward({"spec": f"{server}/flaky", "kwargs": FAST})
    assert reward(PROMPTS, COMPLETIONS) == [None, 1.0]
    assert Handler.hits["/flaky"] == 3


def test_5xx_gives_up_after_max_tries(server):
    spec = f"{server}/flaky"
    reward = load_reward({"spec": spec, "kwargs": {**FAST, "max_tries": 2}})
    with pytest.raises(RewardError, match=rf"'{spec}'.*failed after 2 tries: HTTP 503"):
        reward(PROMPTS, COMPLETIONS)
    assert Handler.hits["/flaky"] == 2


def test_unreachable_url():
    # The socket stays bound, without listening, for the whole test: connections to its port
    # are refused, and no other process can start listening there meanwhile.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        spec = f"http://127.0.0.1:{sock.getsockname()[1]}/score"
        reward = load_reward({"spec": spec, "kwargs": FAST})
        with pytest.raises(RewardError,
                           match=rf"'{spec}'.*after 3 tries: cannot reach the endpoint"):
            reward(PROMPTS, COMPLETIONS)


def test_timeout(server):
    spec = f"{server}/slow"
    reward = load_reward({"spec": spec, "kwargs": {**FAST, "timeout_s": 0.2, "max_tries": 2}})
    start = time.monotonic()
    with pytest.raises(RewardError, match=rf"'{spec}'.*after 2 tries: no answer within timeout"):
        reward(PROMPTS, COMPLETIONS)
    assert time.monotonic() - start < 2.0
    assert Handler.hits["/slow"] == 2


@pytest.mark.parametrize("path", ["/big", "/big-undeclared"])
def test_oversize_response(server, path):
    spec = f"{server}{path}"
    reward = load_reward({"spec": spec, "kwargs": {**FAST, "max_response_bytes": 1000}})
    with pytest.raises(RewardError, match=rf"'{spec}'.*exceeds max_response_bytes=1000"):
        reward(PROMPTS, COMPLETIONS)
    assert Handler.hits[path] == 1  # not retried


def test_4xx_is_not_retried(server):
    spec = f"{server}/bad-request"
    with pytest.raises(RewardError, match=rf"'{spec}'.*HTTP 400.*completions missing"):
        load_reward({"spec": spec, "kwargs": FAST})(PROMPTS, COMPLETIONS)
    assert Handler.hits["/bad-request"] == 1


def test_not_json_and_nan_answers(server):
    with pytest.raises(RewardError, match=r"/not-json'.*not JSON.*<html>hi!"):
        load_reward(f"{server}/not-json")(PROMPTS, COMPLETIONS)
    with pytest.raises(RewardError, match=r"/nan' returned nan for sample 1"):
        load_reward(f"{server}/nan")(PROMPTS, COMPLETIONS)


def test_unserialisable_column_and_bad_option():
    reward = load_reward("http://127.0.0.1:9/score")
    with pytest.raises(RewardError, match=r"'http://127.0.0.1:9/score'.*column 'extra'"):
        reward(PROMPTS, COMPLETIONS, extra=[object(), object()])
    with pytest.raises(ConfigError, match=r"URL option 'timeout'; did you mean 'timeout_s'"):
        load_reward({"spec": "http://127.0.0.1:9/score", "kwargs": {"timeout": 1}})
    with pytest.raises(ConfigError, match=r"timeout_s must be a number > 0.0, got '5'"):
        load_reward({"spec": "http://127.0.0.1:9/score", "kwargs": {"timeout_s": "5"}})


class Recorder(BaseHTTPRequestHandler):
    """Where a redirect points: records every request it gets."""

    seen: list = []

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:  # noqa: N802
        Recorder.seen.append((self.command, dict(self.headers)))
        self.send_response(200)
        self.send_header("Content-Length", "16")
        self.end_headers()
        self.wfile.write(b'{"rewards": [1]}')

    do_POST = do_GET  # noqa: N815


@pytest.fixture
def elsewhere():
    Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05})
    thread.start()
    yield httpd.server_address[1]
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.mark.parametrize("code", [302, 307])
def test_redirects_are_refused_and_credentials_stay_home(server, elsewhere, code):
    spec = f"{server}/redirect-{code}-{elsewhere}"
    reward = load_reward({"spec": spec, "kwargs": {**FAST, "headers": {
        "Authorization": "Bearer s3cret"}}})
    with pytest.raises(RewardError, match=rf"answered HTTP {code}, a redirect to "
                                          rf"http://127.0.0.1:{elsewhere}/score"):
        reward(PROMPTS, COMPLETIONS)
    assert Recorder.seen == []
    assert Handler.hits[f"/redirect-{code}-{elsewhere}"] == 1


@pytest.mark.parametrize("path", ["/trickle", "/trickle-headers"])
def test_a_trickling_server_cannot_hold_a_call_past_timeout_s(server, path):
    spec = f"{server}{path}"
    reward = load_reward({"spec": spec, "kwargs": {**FAST, "timeout_s": 1.0, "max_tries": 2}})
    start = time.monotonic()
    with pytest.raises(RewardError, match=r"after 2 tries: no answer within "
                                          r"timeout_s=1.0"):
        reward(PROMPTS, COMPLETIONS)
    assert time.monotonic() - start < 4.0  # 2 x 1 s, the backoff, and some slack


def test_a_timeout_while_reading_an_error_body_is_retried_not_raised(server):
    spec = f"{server}/slow-error-body"
    reward = load_reward({"spec": spec, "kwargs": {**FAST, "timeout_s": 0.3, "max_tries": 2}})
    with pytest.raises(RewardError, match=r"after 2 tries"):
        reward(PROMPTS, COMPLETIONS)
    assert Handler.hits["/slow-error-body"] == 2


def test_a_500_is_not_retried(server):
    spec = f"{server}/fail"
    with pytest.raises(RewardError, match=r"HTTP 500 .*internal error"):
        load_reward({"spec": spec, "kwargs": FAST})(PROMPTS, COMPLETIONS)
    assert Handler.hits["/fail"] == 1


@pytest.mark.parametrize(("path", "needle"), [
    ("/bool", r"rewards\[0\] is true; the API takes a number or null"),
    ("/huge-int", r"returned 1000000000.* for sample 0 .*must be finite"),
    ("/near-max", r"returned 1.7e\+308 for sample 0 .*within \+-1e\+15"),
])
def test_bools_huge_ints_and_near_overflow_values_are_refused(server, path, needle):
    with pytest.raises(RewardError, match=rf"'{server}{path}'.*{needle}"):
        load_reward(f"{server}{path}")(PROMPTS, COMPLETIONS)
