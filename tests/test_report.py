"""Reports: plots and tables from run folders, the same for `align report` and the quickstart."""

from __future__ import annotations

import json
from pathlib import Path

from align.cli import main
from align.report import load_run, proxy_key, summary_table, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def fake_run(folder: Path, stage: str, records: list[dict], accuracy: float | None) -> Path:
    folder.mkdir(parents=True)
    summary = {"stage": stage, "steps": len(records), "wall_seconds": 12.0,
               "samples_per_second": 100.0}
    if accuracy is not None:
        summary["eval/accuracy"] = accuracy
    (folder / "summary.json").write_text(json.dumps(summary))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return folder


def test_report_plots_every_kind_of_curve(tmp_path):
    sft = fake_run(tmp_path / "sft", "sft",
                   [{"step": s, "loss": 3.0 / s} for s in range(1, 6)], 0.5)
    ppo = fake_run(tmp_path / "ppo_rm", "ppo",
                   [{"step": s, "policy_loss": 0.1, "reward": s, "kl": 0.1 * s,
                     "reward/proxy": s, "reward/gold": 1.0 / s} for s in range(1, 6)], 0.7)
    rm = fake_run(tmp_path / "rm", "rm", [{"step": 1, "loss": 0.6}], 0.99)
    runs = [load_run(p) for p in (sft, rm, ppo)]
    report = write_report(runs, tmp_path / "out", title="T").read_text()
    plots = tmp_path / "out" / "plots"
    expected = ["accuracy.png", "sft-loss.png", "rm-loss.png", "ppo_rm-loss.png",
                "ppo_rm-reward-kl.png", "ppo_rm-proxy-gold.png"]
    for name in expected:
        assert (plots / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"(plots/{name})" in report
    assert not (plots / "sft-reward-kl.png").exists()  # SFT logs no reward
    assert "| rm | rm | 99.0% (pairwise) |" in report
    assert "| sft | sft | 50.0% (exact match) |" in report


def test_run_without_metrics_gets_a_message_not_a_crash(tmp_path):
    empty = fake_run(tmp_path / "dpo", "dpo", [], 0.9)
    report = write_report([load_run(empty)], tmp_path / "out").read_text()
    assert "No metrics were logged for this run" in report
    assert summary_table([load_run(empty)]).count("| dpo |") == 1


def test_align_report_cli(tmp_path, capsys):
    run = fake_run(tmp_path / "sft", "sft", [{"step": 1, "loss": 1.0}], 0.4)
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").is_file() and (run / "plots" / "sft-loss.png").is_file()
    (tmp_path / "not-a-run").mkdir()
    assert main(["report", str(tmp_path / "not-a-run")]) == 2
    assert "has no metrics.jsonl or summary.json" in capsys.readouterr().err


def test_a_normalised_proxy_is_plotted_by_its_raw_score(tmp_path):
    """A normalised reward's trained-on value is centred by construction; the hacking plot
    sets the raw score against gold instead."""
    plain = fake_run(tmp_path / "plain", "ppo",
                     [{"step": 1, "kl": 0.0, "reward/proxy": 0.1, "reward/gold": 0.5}], 0.6)
    normalised = fake_run(tmp_path / "normalised", "ppo", [
        {"step": s, "kl": 0.1 * s, "reward/proxy": 0.0, "reward/gold": 0.5,
         "rewards/reward_model/mean": float(s), "rewards/reward_model/shaped_mean": 0.0}
        for s in range(1, 4)], 0.8)
    assert proxy_key(load_run(plain)) == "reward/proxy"
    assert proxy_key(load_run(normalised)) == "rewards/reward_model/mean"
