"""Every recipe runs end to end on the embedded default, shrunk to a tiny model and a few
steps (the shipped configs with overrides, as a user would pass them)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY, full_only

pytestmark = pytest.mark.slow
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
SHRINK = [*(f"model.embedded.{k}={v}" for k, v in TINY.items()),
          "trainer.max_steps=2", "trainer.global_batch_size=16", "trainer.micro_batch_size=16",
          "trainer.eval_every=0", "trainer.save_every=0", "task.num_train=400",
          "task.num_pairs=200", "task.num_eval=16", "eval.max_samples=16"]


def run_recipe(name: str, output: Path, *overrides: str, capsys) -> str:
    argv = [str(RECIPES / name), "--output-dir", str(output), "--quiet", *SHRINK, *overrides]
    old, sys.argv = sys.argv, argv
    try:
        runpy.run_path(str(RECIPES / name), run_name="__main__")
    finally:
        sys.argv = old
    return capsys.readouterr().out


def summary_exists(folder: Path) -> bool:
    return (folder / "summary.json").is_file() and (folder / "final").is_dir()


def test_full_pipeline_recipe_wires_each_stage_to_the_last(tmp_path, monkeypatch, capsys):
    """The quickstart's stages (test_quickstart trains them): here each stage's config loads
    with the user's overrides and points at the runs before it."""
    import align.recipe

    trained = []

    def record(stage, cfg, show_progress):
        trained.append((stage, cfg))
        return {"stage": stage, "eval/accuracy": 0.5}

    monkeypatch.setattr(align.recipe, "run_stage", record)
    out = run_recipe("arithmetic_rlhf.py", tmp_path, "ppo_rm:rollout.prompts_per_step=8",
                     capsys=capsys)
    assert [stage for stage, _ in trained] == ["sft", "rm", "ppo", "dpo"]
    sft_final = str(tmp_path / "sft" / "final")
    (_, sft), (_, rm), (_, ppo), (_, dpo) = trained
    assert sft.output_dir == str(tmp_path / "sft") and sft.trainer.max_steps == 2
    assert rm.model.name_or_path == ppo.model.name_or_path == dpo.model.name_or_path == sft_final
    assert ppo.rewards[0].spec == str(tmp_path / "rm" / "final")
    assert rm.task.pair_errors == "symmetric" and rm.mining.policy == sft_final
    assert rm.mining.repeat == 4  # the mined pairs weighted as measured (rm_mined.yaml)
    assert ppo.rewards[0].normalize and not any(r.spec.startswith("reward_models.builtin")
                                                for r in ppo.rewards)  # learned rewards only
    assert ppo.rollout.prompts_per_step == 8  # a scoped override reaches its run alone
    assert "PPO(RM)  held-out exact match  50.0%" in out


def test_tools_recipe_wires_sft_into_multi_turn_grpo(tmp_path, monkeypatch, capsys):
    import align.recipe

    trained = []

    def record(stage, cfg, show_progress):
        trained.append((stage, cfg))
        return {"stage": stage, "eval/loss": 0.25, "eval/accuracy": 0.5}

    monkeypatch.setattr(align.recipe, "run_stage", record)
    out = run_recipe("tools.py", tmp_path, "grpo:environment.max_turns=2", capsys=capsys)
    (_, sft), (_, grpo) = trained
    assert [stage for stage, _ in trained] == ["sft", "ppo"]
    assert sft.task.name == grpo.task.name == "products"
    assert sft.model.embedded.chat_format == "chatml"
    assert grpo.model.name_or_path == str(tmp_path / "sft" / "final")
    assert grpo.environment.spec == "align.tasks.calculator:Calculator"
    assert grpo.environment.max_turns == 2  # a scoped override reaches its run alone
    assert grpo.rewards[0].spec == "reward_models.builtin:exact_match"
    assert "GRPO  held-out exact match               50.0%" in out


@full_only
def test_dpo_from_sft_recipe(tmp_path, ray_local, capsys):
    out = run_recipe("dpo_from_sft.py", tmp_path, capsys=capsys)
    assert summary_exists(tmp_path / "sft") and summary_exists(tmp_path / "dpo")
    assert "DPO  held-out exact match" in out


def test_grpo_custom_reward_recipe(tmp_path, ray_local, capsys):
    out = run_recipe("grpo_custom_reward.py", tmp_path, "grpo:rollout.prompts_per_step=4",
                     capsys=capsys)
    metrics = (tmp_path / "grpo" / "metrics.jsonl").read_text()
    assert "rewards/digit_credit/mean" in metrics  # trained on the file beside the recipe
    assert "trained on digit_credit" in out


@full_only
def test_reward_model_service_recipe(tmp_path, ray_local, capsys):
    out = run_recipe("reward_model_service.py", tmp_path,
                     "ppo_http:rollout.prompts_per_step=4", capsys=capsys)
    metrics = (tmp_path / "ppo_http" / "metrics.jsonl").read_text()
    assert "rewards/127.0.0.1/mean" in metrics or "rewards/reward_model/mean" in metrics
    assert "PPO(HTTP)  held-out exact match" in out and "accuracy" in out


def test_digit_credit_hand_values():
    sys.path.insert(0, str(RECIPES))
    try:
        from arithmetic_rewards import digit_credit
    finally:
        sys.path.remove(str(RECIPES))
    scores = digit_credit(["p"] * 4, [" 81", " 71", " 18", "x"], ["81", "81", "81", "81"])
    assert scores == [1.0, 0.25, 0.0, 0.0]


def test_robust_reward_recipe_wires_mined_members_into_one_ensemble(tmp_path, monkeypatch,
                                                                  capsys):
    """Each member mines the SFT policy with its own seed and PPO scores their ensemble (the
    stages themselves are trained in test_mining and test_resume, the ensemble scored in
    test_reward_robust)."""
    import align.recipe

    trained = []

    def record(stage, cfg, show_progress):
        trained.append((stage, cfg))
        return {"stage": stage, "eval/accuracy": 0.5, "mining/pairs": 3.0}

    monkeypatch.setattr(align.recipe, "run_stage", record)
    out = run_recipe("robust_reward.py", tmp_path, "--members", "3",
                     "rm_2:mining.num_prompts=8", capsys=capsys)
    assert [stage for stage, _ in trained] == ["sft", "rm", "rm", "rm", "ppo"]
    sft_final = str(tmp_path / "sft" / "final")
    members = [cfg for stage, cfg in trained if stage == "rm"]
    assert [m.trainer.seed for m in members] == [0, 1, 2]
    assert all(m.mining.policy == m.model.name_or_path == sft_final for m in members)
    assert [m.mining.num_prompts for m in members] == [4000, 4000, 8]
    ppo = trained[-1][1]
    assert ppo.model.name_or_path == sft_final
    assert ppo.rewards[0].spec == [str(tmp_path / f"rm_{i}" / "final") for i in range(3)]
    assert "PPO(ensemble)    held-out exact match  50.0%" in out and "(3 mined pairs)" in out
