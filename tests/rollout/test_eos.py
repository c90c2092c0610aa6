"""EOS ids from a model's generation config, config and tokenizer: for a local folder and for a
hub id (from the Hugging Face cache, from a mocked hub download, and offline without either),
never touching the network."""

from __future__ import annotations

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
from huggingface_hub import constants
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
from transformers import GenerationConfig, LlamaConfig
from transformers.utils import hub as transformers_hub

from align.config import ModelConfig
from align.rollout.eos import eos_token_ids

REPO = "example-org/tiny-chat"
COMMIT = "0" * 40
TOKENIZER = SimpleNamespace(eos_token_id=9)  # the only attribute eos_token_ids reads


def model_files(generation: bool = True) -> dict[str, str]:
    """config.json (EOS 1) and, optionally, generation_config.json (EOS 1, 5 and 7)."""
    files = {"config.json": LlamaConfig(vocab_size=16, hidden_size=8, num_hidden_layers=1,
                                        num_attention_heads=1, intermediate_size=8,
                                        eos_token_id=1).to_json_string()}
    if generation:
        files["generation_config.json"] = GenerationConfig(eos_token_id=[1, 5, 7]).to_json_string()
    return files


def write_snapshot(cache: Path, repo: str, name: str, text: str) -> Path:
    """One file of `repo` laid out as huggingface_hub caches it."""
    root = cache / f"models--{repo.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(COMMIT)
    path = root / "snapshots" / COMMIT / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[tuple]:
    """Every connection (or name lookup) is refused, and recorded."""
    attempts: list[tuple] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("tests do not use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    return attempts


@pytest.fixture()
def hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def set_offline(monkeypatch: pytest.MonkeyPatch, offline: bool) -> None:
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)


@pytest.mark.parametrize("generation", [True, False])
def test_local_folder(tmp_path, no_network, generation):
    for name, text in model_files(generation).items():
        (tmp_path / name).write_text(text)
    expected = [1, 5, 7, 9] if generation else [1, 9]
    assert eos_token_ids(ModelConfig(name_or_path=str(tmp_path)), TOKENIZER) == expected


def test_hub_id_from_the_cache_offline(hub_cache, monkeypatch, no_network):
    set_offline(monkeypatch, True)
    for name, text in model_files().items():
        write_snapshot(hub_cache, REPO, name, text)
    assert eos_token_ids(ModelConfig(name_or_path=REPO), TOKENIZER) == [1, 5, 7, 9]


def test_hub_id_downloaded_from_the_hub(hub_cache, monkeypatch, no_network):
    """transformers' own resolution, with only the download replaced by a fake hub."""
    set_offline(monkeypatch, False)
    # A repository without generation_config.json: its config's and the tokenizer's EOS.
    remote = {REPO: model_files(), "example-org/no-generation-config": model_files(False)}
    asked = []

    def download(repo_id: str, filename: str, cache_dir: str | None = None,
                 local_files_only: bool = False, **kwargs) -> str:
        if local_files_only:  # what the cache holds, as huggingface_hub does
            raise LocalEntryNotFoundError(f"{filename} of {repo_id} is not cached")
        asked.append((repo_id, filename))
        if filename not in remote.get(repo_id, {}):
            raise EntryNotFoundError(f"{repo_id} has no {filename}")
        return str(write_snapshot(Path(cache_dir or hub_cache), repo_id, filename,
                                  remote[repo_id][filename]))

    monkeypatch.setattr(transformers_hub, "hf_hub_download", download)
    assert eos_token_ids(ModelConfig(name_or_path=REPO), TOKENIZER) == [1, 5, 7, 9]
    assert (REPO, "generation_config.json") in asked
    other = ModelConfig(name_or_path="example-org/no-generation-config")
    assert eos_token_ids(other, TOKENIZER) == [1, 9]


def test_hub_id_offline_and_not_cached_falls_back_to_the_tokenizer(hub_cache, monkeypatch,
                                                                   no_network):
    set_offline(monkeypatch, True)
    assert eos_token_ids(ModelConfig(name_or_path=REPO), TOKENIZER) == [9]


def test_hub_id_unreachable_and_not_cached_falls_back_to_the_tokenizer(hub_cache, monkeypatch,
                                                                       no_network):
    """As huggingface_hub reports a hub it cannot connect to (after retries that a test need
    not wait for): the tokenizer's EOS, no error."""
    set_offline(monkeypatch, False)

    def unreachable(repo_id: str, filename: str, **kwargs) -> str:
        raise LocalEntryNotFoundError("cannot connect to the Hub and the file is not cached")

    monkeypatch.setattr(transformers_hub, "hf_hub_download", unreachable)
    assert eos_token_ids(ModelConfig(name_or_path=REPO), TOKENIZER) == [9]


def test_cached_hub_id_is_read_without_asking_the_hub(hub_cache, monkeypatch, no_network):
    set_offline(monkeypatch, False)
    for name, text in model_files().items():
        write_snapshot(hub_cache, REPO, name, text)
    assert eos_token_ids(ModelConfig(name_or_path=REPO), TOKENIZER) == [1, 5, 7, 9]
    assert no_network == []  # not even to resolve the revision


def test_no_eos_anywhere_is_an_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                      "eos_token_id": None}))
    with pytest.raises(ValueError, match="no EOS token"):
        eos_token_ids(ModelConfig(name_or_path=str(tmp_path)),
                      SimpleNamespace(eos_token_id=None))
