"""A hub reward-model id as a reward spec: fetched through align.hub (here from a local Hugging
Face cache holding a tiny reward model, offline), scored like the folder; a name the hub cannot
give stops the run with exit 2 and the hub message."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import ray

from align.cli import main
from align.distributed import ensure_ray
from align.errors import ConfigError
from reward_models import load_reward
from reward_models.reward_model import load_reward_model, score_texts

ROOT = Path(__file__).resolve().parents[2]
REPO = "tiny-org/tiny-rm"
PROMPTS = ["Q: 23+58=", "Q: 10+10="]
COMPLETIONS = [" 81", " 21"]


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, tiny_reward_model_dir):
    """A Hugging Face cache, laid out as the hub client writes it, holding REPO (a copy of the
    tiny reward model) at revision `main`; the hub itself is never asked (offline)."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_reward_model_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # nothing called tiny-org/ here: the name is a hub id
    return cache


def direct_scores(folder: str) -> list[float]:
    model, tokenizer = load_reward_model(folder)
    return score_texts(model, tokenizer, PROMPTS, COMPLETIONS)


def test_a_hub_id_scores_like_the_folder(hub_cache, tiny_reward_model_dir):
    reward = load_reward({"spec": REPO, "kwargs": {"num_workers": 0}})
    assert reward.name == "tiny-rm"
    assert reward(PROMPTS, COMPLETIONS) == pytest.approx(direct_scores(tiny_reward_model_dir),
                                                         abs=1e-6)


@pytest.mark.slow
def test_ray_workers_fetch_the_hub_id_themselves(hub_cache, tiny_reward_model_dir):
    """The workers get the hub id, not the driver's cache path, so each node fetches its
    own copy (here from the cache the environment names, which the workers inherit)."""
    ray.shutdown()  # a Ray whose workers inherit HF_HUB_CACHE
    ensure_ray(None)
    try:
        reward = load_reward(REPO)
        try:
            assert reward.fn.group is not None and str(reward.fn.path) == REPO
            assert reward(PROMPTS, COMPLETIONS) == pytest.approx(
                direct_scores(tiny_reward_model_dir), abs=1e-6)
        finally:
            reward.close()
    finally:
        ray.shutdown()


def test_a_hub_id_missing_from_the_offline_cache_is_refused(hub_cache):
    with pytest.raises(ConfigError, match="reward 'some-org/no-such-rm': 'some-org/no-such-rm' "
                                          "is not a local folder and not in the Hugging Face "
                                          "cache, and HF_HUB_OFFLINE is set"):
        load_reward({"spec": "some-org/no-such-rm", "kwargs": {"num_workers": 0}})


def test_an_unreachable_hub_reward_exits_2_with_the_hub_message(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # refuses at once
    config = ROOT / "configs" / "arithmetic" / "grpo.yaml"
    code = main(["ppo", str(config), "--quiet", "model.name_or_path=embedded",
                 "rewards=[{spec: some-org/no-such-rm}]",
                 f"output_dir={tmp_path / 'run'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert "rewards[0]: reward 'some-org/no-such-rm': 'some-org/no-such-rm' is neither a " \
           "local folder nor reachable on the Hugging Face Hub" in err
    assert "HF_HUB_OFFLINE=1" in err
    assert not (tmp_path / "run").exists()


def test_serve_rm_takes_a_hub_id(hub_cache, tiny_reward_model_dir):
    from reward_models.server import RewardModelServer

    server = RewardModelServer(("127.0.0.1", 0), REPO)
    try:
        assert server.model_name == "tiny-rm"
        assert server.score({"prompts": PROMPTS, "completions": COMPLETIONS}) == pytest.approx(
            direct_scores(tiny_reward_model_dir), abs=1e-6)
    finally:
        server.server_close()
