"""DPO end to end through Ray workers and DeepSpeed: learning, the reference, parity."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from align.cli import main
from align.config import TaskConfig, dump_config
from align.data import (
    PreferenceExample,
    collate_preference,
    collate_preference_packed,
    tokenize_preference,
)
from align.losses import dpo_loss, nll_loss, preference_metrics, simpo_loss
from align.tasks import arithmetic
from align.tracking import read_metrics
from align.trainers.dpo import DPOTrainer, completion_logps, reference_cache_path
from tests.conftest import full_only, tiny_dpo_config

pytestmark = pytest.mark.slow

# 32 pairs seen again and again: even a random tiny model learns to rank them in a few steps.
MEMORISE = ("task.num_pairs=32", "dpo.beta=0.5", "trainer.lr=1e-2", "trainer.max_steps=12")


def curve(run_dir, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run_dir / "metrics.jsonl") if key in m]


def mean(values: list[float]) -> float:
    return sum(values) / len(values)


@torch.no_grad()
def plain_logps(model, examples: list[PreferenceExample]) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 2) summed completion log-probs [chosen, rejected] and token counts, one unpadded
    forward per sequence with plain transformers."""
    logps, lengths = torch.zeros(len(examples), 2), torch.zeros(len(examples), 2)
    for i, e in enumerate(examples):
        for side, completion in enumerate((e.chosen_ids, e.rejected_ids)):
            ids = torch.tensor([e.prompt_ids + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].float(), dim=-1)
            token = logp.gather(-1, ids[0, 1:, None])[:, 0]
            logps[i, side] = token[len(e.prompt_ids) - 1:].sum()
            lengths[i, side] = len(completion)
    return logps, lengths


def expected_metrics(policy: torch.Tensor, lengths: torch.Tensor, reference: torch.Tensor,
                     settings) -> dict[str, float]:
    """What align.losses gives for these log-probs, under the trainer's metric names."""
    chosen, rejected = policy[:, 0], policy[:, 1]
    if settings.loss_type == "simpo":
        out = simpo_loss(chosen / lengths[:, 0], rejected / lengths[:, 1], settings.beta,
                         settings.gamma, settings.label_smoothing)
    else:
        out = dpo_loss(chosen, rejected, reference[:, 0], reference[:, 1], settings.beta,
                       settings.loss_type, settings.label_smoothing, lengths[:, 0],
                       lengths[:, 1])
    loss = out.losses.mean() + settings.nll_coef * nll_loss(chosen, lengths[:, 0])
    metrics = {k: v.item() for k, v in
               preference_metrics(out.chosen_rewards, out.rejected_rewards).items()}
    return {"loss": loss.item(), **metrics, "logps/chosen": chosen.mean().item(),
            "logps/rejected": rejected.mean().item()}


def test_packed_completion_logps_equal_padded_and_plain(tiny_model_dir):
    """One concatenated forward (packed or padded) gives each sequence's own log-probs."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    examples = tokenize_preference(
        [*arithmetic.preference_rows(TaskConfig(), 5), {"prompt": "", "chosen": "ab",
                                                        "rejected": "abc"}],
        ByT5Tokenizer(), max_length=24)
    with torch.no_grad():
        packed, packed_len = completion_logps(
            model, collate_preference_packed(examples, row_length=30, pad_id=0))
        padded, padded_len = completion_logps(model, collate_preference(examples, 0))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)
    assert packed_len.tolist() == padded_len.tolist()
    plain, _ = plain_logps(model, examples[:-1])  # plain_logps assumes a non-empty prompt
    torch.testing.assert_close(torch.stack(packed.chunk(2), 1)[:-1], plain, atol=1e-5, rtol=0)


def test_reference_cache_is_keyed_by_what_the_log_probs_depend_on(tmp_path):
    """Other data, another max_length or another model: another cache file, never reused.
    Settings the reference does not depend on (beta, the loss) keep the file."""
    tok = ByT5Tokenizer()
    rows = arithmetic.preference_rows(TaskConfig(), 8)
    examples = tokenize_preference(rows, tok, max_length=24)
    cfg = tiny_dpo_config(tmp_path)
    path = reference_cache_path(cfg, tmp_path, examples)
    assert reference_cache_path(tiny_dpo_config(tmp_path), tmp_path, list(examples)) == path
    same = tiny_dpo_config(tmp_path, "dpo.beta=0.3", "dpo.loss_type=ipo")
    assert reference_cache_path(same, tmp_path, examples) == path
    changed = {
        "other pair": (cfg, tokenize_preference([*rows[:-1], rows[0]], tok, max_length=24)),
        "max_length": (tiny_dpo_config(tmp_path, "data.max_length=32"), examples),
        "data source": (tiny_dpo_config(tmp_path, f"data.train={tmp_path / 'p.jsonl'}"),
                        examples),
        "model": (tiny_dpo_config(tmp_path, "model.embedded.seed=1"), examples),
        "dtype": (tiny_dpo_config(tmp_path, "model.dtype=bfloat16"), examples),
    }
    for what, (other_cfg, other_examples) in changed.items():
        assert reference_cache_path(other_cfg, tmp_path, other_examples) != path, what


def test_two_workers_zero2_trains_and_margins_rise(tmp_path, ray_local):
    cfg = tiny_dpo_config(tmp_path, *MEMORISE, "distributed.num_workers=2",
                          "distributed.zero_stage=2")
    trainer = DPOTrainer(cfg, show_progress=False)
    summary = trainer.fit()
    run = tmp_path / "run"
    assert trainer.precompute and not trainer.needs_reference()  # full weights: precomputed
    assert json.loads((run / "summary.json").read_text()) == summary
    for key in ("eval/accuracy", "eval/loss", "eval/rewards/margins", "eval/rewards/accuracies",
                "eval/logps/chosen", "eval/logps/rejected"):
        assert key in summary, key
    assert summary["stage"] == "dpo" and summary["steps"] == 12
    margins, losses = curve(run, "rewards/margins"), curve(run, "loss")
    assert len(margins) == 12
    assert mean(margins[-3:]) > mean(margins[:3]) + 0.2, margins
    assert mean(losses[-3:]) < mean(losses[:3]), losses
    assert list((run / "reference_logps").glob("*.pt"))  # cached beside the run by default
    assert (run / "final" / "config.json").is_file()


def test_zero3_lora_reference_is_the_base_model(tmp_path, ray_local, tiny_model_dir):
    base = tiny_model_dir("llama")
    cfg = tiny_dpo_config(tmp_path, f"model.name_or_path={base}", "model.lora.enabled=true",
                          *MEMORISE, "trainer.lr=3e-2", "distributed.num_workers=2",
                          "distributed.zero_stage=3", "eval.exact_match=false")
    trainer = DPOTrainer(cfg, show_progress=False)
    summary = trainer.fit()
    assert not trainer.precompute and trainer.needs_reference()  # LoRA: adapter-off view
    margins = curve(tmp_path / "run", "rewards/margins")
    assert margins[0] == 0.0  # same batch, same weights: the adapter starts at zero
    assert mean(margins[-3:]) > mean(margins[:3]) + 0.05, margins  # rank-8 adapters: slower
    # Computed at the end, after the adapter trained: still exactly the base model's.
    expected, _ = plain_logps(AutoModelForCausalLM.from_pretrained(base), trainer.eval)
    torch.testing.assert_close(trainer.reference["eval"], expected, atol=1e-5, rtol=0)
    assert abs(summary["eval/logps/chosen"] - expected[:, 0].mean().item()) > 1e-3


@full_only
def test_precomputed_reference_matches_live_one_and_is_reused(tmp_path, ray_local):
    common = ("trainer.max_steps=3", "eval.exact_match=false",
              f"dpo.reference_cache_dir={tmp_path / 'cache'}")
    runs = {}
    for name, extra in (("first", ()), ("again", ()),
                        ("live", ("dpo.precompute_reference=false",)),
                        ("budget", ("dpo.precompute_reference=false",
                                    "trainer.max_tokens_per_micro_batch=96"))):
        trainer = DPOTrainer(tiny_dpo_config(tmp_path / name, *common, *extra),
                             show_progress=False)
        trainer.fit()
        runs[name] = (trainer, curve(tmp_path / name / "run", "loss"))
    assert runs["first"][0].reference_source == "computed"
    assert runs["again"][0].reference_source == "cache"
    assert runs["live"][0].reference_source == "none" and runs["live"][0].needs_reference()
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1
    assert runs["again"][1] == runs["first"][1]
    for step, (a, b, c) in enumerate(zip(runs["first"][1], runs["live"][1], runs["budget"][1],
                                         strict=True), start=1):
        assert abs(a - b) < 1e-5, f"step {step}: {a} vs {b}"
        assert abs(a - c) < 1e-5, f"step {step}, token budget: {a} vs {c}"


@pytest.mark.parametrize("loss", [
    ("dpo.loss_type=sigmoid", "dpo.label_smoothing=0.1", "dpo.nll_coef=0.5"),
    ("dpo.loss_type=ipo", "dpo.beta=0.5"),
    ("dpo.loss_type=simpo", "dpo.beta=2.0", "dpo.gamma=0.5"),
    ("dpo.loss_type=hinge", "dpo.beta=0.5"),
], ids=["cdpo+rpo", "ipo", "simpo", "hinge"])
def test_logged_metrics_equal_losses_on_plain_transformers(tmp_path, ray_local, tiny_model_dir,
                                                           loss):
    """Step 1 (policy = reference = base) and the final held-out pass (the trained final/
    against base) against align.losses on log-probs from plain transformers, within 1e-5."""
    base = tiny_model_dir("llama")
    cfg = tiny_dpo_config(tmp_path, f"model.name_or_path={base}", "trainer.max_steps=2",
                          "eval.exact_match=false", *loss)
    trainer = DPOTrainer(cfg, show_progress=False)
    summary = trainer.fit()
    base_model = AutoModelForCausalLM.from_pretrained(base)
    final_model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")

    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    batch = [trainer.train[i] for i in trainer.schedule.indices(0)]
    logps, lengths = plain_logps(base_model, batch)
    for key, value in expected_metrics(logps, lengths, logps, cfg.dpo).items():
        if key == "rewards/accuracies" and cfg.dpo.loss_type != "simpo":
            continue  # rewards are 0 up to float noise at step 1: ties broken by noise
        assert first[key] == pytest.approx(value, abs=1e-5), key

    reference, lengths = plain_logps(base_model, trainer.eval)
    policy, _ = plain_logps(final_model, trainer.eval)
    for key, value in expected_metrics(policy, lengths, reference, cfg.dpo).items():
        assert summary[f"eval/{key}"] == pytest.approx(value, abs=1e-5), key
    assert abs(summary["eval/rewards/margins"]) > 1e-4  # the check is not of zeros


def test_implicit_rewards_are_zero_at_step_one_on_a_model_with_dropout(tmp_path, ray_local,
                                                                       dropout_model_dir):
    """The reference log-probs come from eval mode, the loss forward from train mode: with
    dropout off (the dpo default) policy = reference at step 1, so every reward is 0."""
    cfg = tiny_dpo_config(tmp_path, f"model.name_or_path={dropout_model_dir('gpt2')}",
                          "trainer.max_steps=1", "eval.exact_match=false")
    DPOTrainer(cfg, show_progress=False).fit()
    first = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]
    for key in ("rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert first[key] == pytest.approx(0.0, abs=1e-5), key
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-5)


def unusable_pairs(path, share: float) -> str:
    """100 pairs: `share` of them with chosen == rejected, as many with a prompt longer than
    the tiny configs' data.max_length=24, spread through the file."""
    rows = [{"prompt": f"Q: {i}+{i}=", "chosen": f" {2 * i}", "rejected": f" {2 * i + 1}"}
            for i in range(100)]
    bad = int(round(100 * share))
    for k in range(bad):
        rows[3 * k]["rejected"] = rows[3 * k]["chosen"]
        rows[3 * k + 1]["prompt"] = f"Q: {'9' * 30}+{k}="
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_unusable_pairs_are_skipped_and_counted_until_too_many(tmp_path, ray_local, caplog,
                                                               capsys):
    """`align dpo` on pairs of which 5% are identical and 5% have a prompt over max_length
    trains on the rest and reports both counts; at 30% it stops with exit 2, naming each
    reason and its share."""
    cfg = tiny_dpo_config(tmp_path, f"data.train={unusable_pairs(tmp_path / 'ok.jsonl', 0.05)}",
                          "trainer.max_steps=2", f"data.cache_dir={tmp_path / 'cache'}")
    config = tmp_path / "dpo.yaml"
    dump_config(cfg, config)
    assert main(["dpo", str(config), "--quiet"]) == 0, capsys.readouterr().err
    counts = {"data/skipped/identical_pair": 5, "data/skipped/prompt_too_long": 5}
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert {k: summary.get(k) for k in counts} == counts and summary["steps"] == 2
    assert read_metrics(tmp_path / "run" / "metrics.jsonl")[0] == {"step": 0, **counts}
    assert ("ok.jsonl: 10 of 100 training rows skipped as unusable (identical_pair: 5, "
            "prompt_too_long: 5)") in caplog.text
    for share in (0.15, 0.3):  # 30% of the pairs unusable, or 30% for each reason
        capsys.readouterr()
        too_many = unusable_pairs(tmp_path / f"bad-{share}.jsonl", share)
        code = main(["dpo", str(config), "--quiet", f"data.train={too_many}",
                     f"output_dir={tmp_path / 'run-bad'}"])
        err = capsys.readouterr().err
        bad = round(100 * share)
        assert code == 2, err
        assert f"bad-{share}.jsonl: {2 * bad} of 100 rows ({2 * bad}.0%) are unusable" in err
        assert f"identical_pair (chosen identical to rejected): {bad} rows, {bad}.0%" in err, err
        assert (f"prompt_too_long (a prompt of data.max_length=24 tokens or more): {bad} rows, "
                f"{bad}.0%") in err, err
        assert "Traceback" not in err and not (tmp_path / "run-bad").exists()
