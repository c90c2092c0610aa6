"""Hub names that cannot be fetched stop at once, naming the key and how to run offline."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from align.cli import main
from align.errors import DataError, ModelError
from align.hub import require_hub


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.fixture
def unreachable(online, monkeypatch):
    """A hub endpoint nothing listens on: connections are refused at once."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


@pytest.fixture
def empty_hub(online, monkeypatch):
    """A hub that knows no repository (HTTP 404 for everything)."""
    from huggingface_hub import constants

    class NotFound(BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - the http.server interface
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield
    server.shutdown()
    server.server_close()


def test_an_unreachable_hub_names_the_key_and_how_to_run_offline(unreachable):
    with pytest.raises(ModelError, match=r"model.name_or_path: 'some-org/no-such-model' is "
                                         r"neither a local folder nor reachable.*HF_HUB_OFFLINE=1"):
        require_hub("some-org/no-such-model", "model.name_or_path")
    with pytest.raises(DataError, match="'some-org/no-such-data' is neither a local folder"):
        require_hub("some-org/no-such-data", "dataset", "dataset")


def test_a_name_the_hub_does_not_have_is_refused(empty_hub):
    with pytest.raises(ModelError, match="Hub has no model of that name.*HTTP 404"):
        require_hub("some-org/no-such-model", "model.tokenizer")


def test_offline_refuses_what_the_cache_lacks_without_the_network(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "ENDPOINT", "http://192.0.2.1:9")  # would hang if asked
    with pytest.raises(ModelError, match="not in the Hugging Face cache, and HF_HUB_OFFLINE"):
        require_hub("some-org/no-such-model", "model.name_or_path")


def test_the_cli_exits_2_on_an_unreachable_hub_model(unreachable, tmp_path, capsys):
    config = Path(__file__).resolve().parents[1] / "configs" / "arithmetic" / "sft.yaml"
    code = main(["sft", str(config), "--quiet", "model.name_or_path=some-org/no-such-model",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "neither a local folder nor reachable" in err and "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "run").exists()
