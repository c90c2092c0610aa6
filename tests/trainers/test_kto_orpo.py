"""KTO and ORPO through `align dpo`: learning, the KL baseline, the reference, metric parity."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.losses import PreferenceLogps, kto_kl_baseline, nll_loss, preference_loss
from align.tracking import read_metrics
from align.trainers.dpo import DPOTrainer
from tests.conftest import full_only, tiny_dpo_config
from tests.trainers.test_dpo import curve, mean, plain_logps

pytestmark = pytest.mark.slow


@torch.no_grad()
def plain_row_logps(model, examples) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) summed log-probs [own completion, mismatched completion] and token counts of
    unpaired rows, one unpadded forward per sequence with plain transformers."""
    logps, lengths = torch.zeros(len(examples), 2), torch.zeros(len(examples), 2)
    for i, e in enumerate(examples):
        for side, completion in enumerate((e.completion_ids, e.kl_completion_ids)):
            ids = torch.tensor([e.prompt_ids + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            logps[i, side] = logp.gather(-1, ids[0, 1:, None])[len(e.prompt_ids) - 1:].sum()
            lengths[i, side] = len(completion)
    return logps, lengths


def expected_kto(policy, lengths, reference, examples, settings) -> dict[str, float]:
    good = torch.tensor([e.desirable for e in examples])
    kl = kto_kl_baseline(policy[:, 1], reference[:, 1])
    own, ref, n = policy[:, 0], reference[:, 0], lengths[:, 0]
    out = preference_loss("kto", PreferenceLogps(own[good], own[~good], n[good], n[~good],
                                                 ref[good], ref[~good], kl),
                          settings.beta, desirable_weight=settings.desirable_weight,
                          undesirable_weight=settings.undesirable_weight)
    chosen, rejected = out.chosen_rewards.mean().item(), out.rejected_rewards.mean().item()
    return {"loss": out.losses.mean().item(), "kl": kl.item(), "rewards/chosen": chosen,
            "rewards/rejected": rejected, "rewards/margins": chosen - rejected,
            "logps/chosen": own[good].mean().item(), "logps/rejected": own[~good].mean().item()}


def test_kto_two_workers_zero2_learns(tmp_path, ray_local):
    cfg = tiny_dpo_config(tmp_path, "task.num_pairs=32", "dpo.loss_type=kto", "dpo.beta=1.0",
                          "trainer.max_steps=16", "distributed.num_workers=2",
                          "distributed.zero_stage=2")
    trainer = DPOTrainer(cfg, show_progress=False)
    summary = trainer.fit()
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert len(trainer.train) == 64  # 32 pairs, each split into two rows
    assert sum(e.desirable for e in trainer.train) == 32
    assert trainer.precompute and trainer.reference["train"].shape == (64, 2)
    for key in ("eval/accuracy", "eval/loss", "eval/kl", "eval/rewards/margins",
                "eval/logps/chosen", "eval/rows"):
        assert key in summary, key
    losses, kls = curve(run, "loss"), curve(run, "kl")
    assert len(losses) == 16 and all(k >= 0 for k in kls)
    # 4 fixed batches a pass: compare whole passes over the 64 rows, not single batches.
    assert mean(losses[-4:]) < mean(losses[:4]) - 0.05, losses
    assert summary["eval/rewards/margins"] > 0.2


def test_kto_metrics_equal_losses_on_plain_transformers(tmp_path, ray_local, tiny_model_dir):
    """The held-out pass of the trained model (KL baseline included) and each training batch
    being one fixed batch whose rows carry that batch's completions, mismatched."""
    base = tiny_model_dir("llama")
    cfg = tiny_dpo_config(tmp_path, f"model.name_or_path={base}", "trainer.max_steps=3",
                          "eval.exact_match=false", "dpo.loss_type=kto", "dpo.beta=0.5",
                          "dpo.desirable_weight=1.5", "dpo.undesirable_weight=0.75")
    trainer = DPOTrainer(cfg, show_progress=False)
    summary = trainer.fit()
    for step in range(3):
        batch = [trainer.train[i] for i in trainer.schedule.indices(step)]
        own = sorted(map(tuple, (e.completion_ids for e in batch)))
        assert own == sorted(map(tuple, (e.kl_completion_ids for e in batch)))
        assert min(trainer.schedule.indices(step)) % 16 == 0  # one of the fixed batches
    # Step 1: policy = reference, every log-ratio and z0 are 0 and a row loses weight x 0.5.
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    good = sum(trainer.train[i].desirable for i in trainer.schedule.indices(0))
    assert first["loss"] == pytest.approx(0.5 * (1.5 * good + 0.75 * (16 - good)) / 16, abs=1e-6)
    assert first["kl"] == pytest.approx(0.0, abs=1e-6)
    base_model = AutoModelForCausalLM.from_pretrained(base)
    final_model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    reference, lengths = plain_row_logps(base_model, trainer.eval)
    policy, _ = plain_row_logps(final_model, trainer.eval)
    expected = expected_kto(policy, lengths, reference, trainer.eval, cfg.dpo)
    for key, value in expected.items():
        assert summary[f"eval/{key}"] == pytest.approx(value, abs=1e-5), key
    assert expected["kl"] > 1e-4 and abs(expected["rewards/margins"]) > 1e-4


@full_only
def test_kto_precomputed_and_live_reference_agree(tmp_path, ray_local):
    common = ("dpo.loss_type=kto", "trainer.max_steps=3", "eval.exact_match=false",
              f"dpo.reference_cache_dir={tmp_path / 'cache'}")
    runs = {}
    for name, extra in (("first", ()), ("again", ()),
                        ("live", ("dpo.precompute_reference=false",)),
                        ("budget", ("dpo.precompute_reference=false",
                                    "trainer.max_tokens_per_micro_batch=96"))):
        trainer = DPOTrainer(tiny_dpo_config(tmp_path / name, *common, *extra),
                             show_progress=False)
        trainer.fit()
        runs[name] = (trainer, curve(tmp_path / name / "run", "loss"),
                      curve(tmp_path / name / "run", "kl"))
    assert runs["again"][0].reference_source == "cache"
    assert runs["live"][0].needs_reference()
    assert runs["again"][1] == runs["first"][1]
    for key in (1, 2):
        for other in ("live", "budget"):
            for a, b in zip(runs["first"][key], runs[other][key], strict=True):
                assert abs(a - b) < 1e-5, (key, other, a, b)


def test_orpo_is_reference_free_and_its_metrics_equal_plain_transformers(tmp_path, ray_local,
                                                                         tiny_model_dir):
    base = tiny_model_dir("llama")
    cfg = tiny_dpo_config(tmp_path, f"model.name_or_path={base}", "trainer.max_steps=2",
                          "eval.exact_match=false", "dpo.loss_type=orpo", "dpo.beta=0.25")
    trainer = DPOTrainer(cfg, show_progress=False)
    summary = trainer.fit()
    assert not trainer.precompute and not trainer.needs_reference()
    for model, metrics, examples in (
            (AutoModelForCausalLM.from_pretrained(base),
             read_metrics(tmp_path / "run" / "metrics.jsonl")[0],
             [trainer.train[i] for i in trainer.schedule.indices(0)]),
            (AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final"),
             {k[len("eval/"):]: v for k, v in summary.items() if k.startswith("eval/")},
             trainer.eval)):
        logps, lengths = plain_logps(model, examples)
        out = preference_loss("orpo", PreferenceLogps(logps[:, 0], logps[:, 1], lengths[:, 0],
                                                      lengths[:, 1]), beta=0.25)
        nll = nll_loss(logps[:, 0], lengths[:, 0])
        assert metrics["loss"] == pytest.approx((out.losses.mean() + nll).item(), abs=1e-5)
        assert metrics["nll"] == pytest.approx(nll.item(), abs=1e-5)
        assert metrics["rewards/margins"] == pytest.approx(
            (out.chosen_rewards - out.rejected_rewards).mean().item(), abs=1e-5)
