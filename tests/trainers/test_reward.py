"""Reward-model training: the objective's maths, then end-to-end runs through Ray + DeepSpeed."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from align.config import RMConfig, load_config
from align.data import collate_preference, tokenize_preference
from align.errors import ConfigError
from align.losses import pairwise_loss
from align.metrics import combine_metrics
from align.trainers.reward import RewardTrainer, reward_objective
from align.trainers.stage_data import load_train_eval_rows
from reward_models import load_reward
from reward_models.reward_model import pair_means
from reward_models.server import evaluate_reward_model
from tests.conftest import tiny_rm_config
from tests.reward_models.test_reward_model_folder import direct_scores


def easy_pairs(n: int, seed: int = 0) -> list[dict]:
    """Pairs a tiny model separates within a few steps: a number against a word."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        rows.append({"prompt": f"Q: {a}+{b}=", "chosen": f" {a + b}",
                     "rejected": " " + rng.choice(["no", "maybe", "idk", "what"])})
    return rows


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------- fast


def test_objective_is_split_invariant(tiny_reward_model_dir):
    """Micro-batch losses add up to the global-batch mean, metrics reduce to the same values."""
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model_dir)
    tok = AutoTokenizer.from_pretrained(tiny_reward_model_dir)
    examples = tokenize_preference(easy_pairs(8), tok, 32)
    whole = collate_preference(examples, tok.pad_token_id)
    loss, metrics = reward_objective(model, whole, num_pairs=8)
    chosen, rejected = model(input_ids=whole["input_ids"],
                             attention_mask=whole["attention_mask"]).logits[:, 0].detach().chunk(2)
    torch.testing.assert_close(loss, pairwise_loss(chosen, rejected))
    halves = [reward_objective(model, collate_preference(part, tok.pad_token_id), num_pairs=8)
              for part in (examples[:3], examples[3:])]
    torch.testing.assert_close(halves[0][0] + halves[1][0], loss)
    split = pair_means(combine_metrics([m for _, m in halves]))
    for key, value in pair_means(metrics).items():
        assert split[key] == pytest.approx(value, abs=1e-5), key
    assert split["min_reward"] == pytest.approx(float(torch.cat([chosen, rejected]).min()))
    assert split["accuracy"] == pytest.approx(float((chosen > rejected).float().mean()))


def test_center_coef_must_be_non_negative():
    with pytest.raises(ConfigError, match=r"rm\.center_coef"):
        load_config(RMConfig, None, ["rm.center_coef=-0.1"])


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow
def test_run_learns_and_final_reloads_with_same_scores(tmp_path, ray_local):
    data = write_jsonl(tmp_path / "pairs.jsonl", easy_pairs(400))
    cfg = tiny_rm_config(tmp_path, f"data.train={data}", "data.eval_fraction=0.2",
                         "trainer.max_steps=15", "rm.center_coef=0.01")
    summary = RewardTrainer(cfg, show_progress=False).fit()
    run = tmp_path / "run"
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "final/config.json"):
        assert (run / name).is_file(), name
    assert json.loads((run / "summary.json").read_text()) == summary
    assert summary["stage"] == "rm" and summary["eval/pairs"] == 80
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "loss" in m]
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward", "grad_norm"):
        assert key in steps[0], key
    assert sum(m["loss"] for m in steps[-3:]) < sum(m["loss"] for m in steps[:3])
    assert summary["eval/accuracy"] > 0.8, summary
    # final/ is a plain Hugging Face reward model: it reproduces the workers' held-out figures.
    held_out = load_train_eval_rows(cfg.data, cfg.trainer.seed).held_out
    report = evaluate_reward_model(run / "final", write_jsonl(tmp_path / "held.jsonl", held_out))
    for key in ("accuracy", "margin", "mean_reward", "min_reward", "max_reward"):
        assert report[key] == pytest.approx(summary[f"eval/{key}"], abs=1e-4), key
    prompts = [r["prompt"] for r in held_out[:6]]
    completions = [r["chosen"] for r in held_out[:3]] + [r["rejected"] for r in held_out[3:6]]
    expected = direct_scores(AutoModelForSequenceClassification.from_pretrained(run / "final"),
                             AutoTokenizer.from_pretrained(run / "final"), prompts, completions)
    reward = load_reward({"spec": str(run / "final"), "kwargs": {"num_workers": 0}})
    assert reward(prompts, completions) == pytest.approx(expected, abs=1e-5)


@pytest.mark.slow
def test_zero3_lora_two_workers_trains_and_reloads(tmp_path, ray_local, tiny_model_dir):
    base = tiny_model_dir("llama")
    data = write_jsonl(tmp_path / "pairs.jsonl", easy_pairs(400))
    cfg = tiny_rm_config(tmp_path, f"model.name_or_path={base}", f"data.train={data}",
                         "data.eval_fraction=0.1", "model.lora.enabled=true", "trainer.lr=1e-2",
                         "trainer.max_steps=10", "distributed.num_workers=2",
                         "distributed.zero_stage=3")
    summary = RewardTrainer(cfg, show_progress=False).fit()
    final = tmp_path / "run" / "final"
    assert (final / "config.json").is_file()  # the adapter merged: a one-label classifier
    losses = [m["loss"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl")
                                     .read_text().splitlines()) if "loss" in m]
    assert losses[-1] < losses[0], losses
    held_out = load_train_eval_rows(cfg.data, cfg.trainer.seed).held_out
    report = evaluate_reward_model(final, write_jsonl(tmp_path / "held.jsonl", held_out))
    for key in ("accuracy", "margin", "min_reward", "max_reward"):
        assert report[key] == pytest.approx(summary[f"eval/{key}"], abs=1e-4), key
    # Plain transformers (no num_labels), as docs/reward-model.md says, gives the same numbers
    # as the reward spec.
    trained = AutoModelForSequenceClassification.from_pretrained(final)
    prompts = [r["prompt"] for r in held_out[:4]]
    completions = [r["chosen"] for r in held_out[:2]] + [r["rejected"] for r in held_out[2:4]]
    expected = direct_scores(trained, AutoTokenizer.from_pretrained(final), prompts, completions)
    reward = load_reward({"spec": str(final), "kwargs": {"num_workers": 0}})
    assert reward(prompts, completions) == pytest.approx(expected, abs=1e-5)
