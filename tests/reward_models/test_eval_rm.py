"""`align eval-rm MODEL DATA`: pairwise accuracy printed as a table and written as JSON."""

from __future__ import annotations

import json

import pytest

from reward_models.reward_model import load_reward_model, score_texts
from reward_models.server import evaluate_reward_model
from tests.test_cli import run_align

ROWS = [{"prompt": "Q: 23+58=", "chosen": " 81", "rejected": " 71"},
        {"prompt": "Q: 10+10=", "chosen": " 20", "rejected": " 21"},
        {"prompt": "Q: 99+99=", "chosen": " 198", "rejected": " 188"}]


def test_figures_match_the_scores(tmp_path, tiny_reward_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    report = evaluate_reward_model(tiny_reward_model_dir, str(data), batch_size=2)
    model, tok = load_reward_model(tiny_reward_model_dir)
    prompts = [r["prompt"] for r in ROWS]
    chosen = score_texts(model, tok, prompts, [r["chosen"] for r in ROWS])
    rejected = score_texts(model, tok, prompts, [r["rejected"] for r in ROWS])
    assert report["pairs"] == 3
    assert report["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert report["margin"] == pytest.approx(sum(chosen) / 3 - sum(rejected) / 3, abs=1e-5)
    assert report["min_reward"] == pytest.approx(min(chosen + rejected), abs=1e-5)


def test_cli_prints_a_table_and_writes_json(tmp_path, tiny_reward_model_dir):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "report.json"
    result = run_align("eval-rm", tiny_reward_model_dir, str(data), "--output", str(out))
    assert result.returncode == 0, result.stderr
    for label in ("pairs", "accuracy", "mean margin", "mean chosen reward"):
        assert label in result.stdout
    report = json.loads(out.read_text())
    assert report["pairs"] == 3 and 0.0 <= report["accuracy"] <= 1.0


@pytest.mark.parametrize(("args", "needle"), [
    (["{model}", "missing.jsonl"], "missing.jsonl"),
    (["{tmp}", "{data}"], "no config.json"),
])
def test_bad_input_exits_2(tmp_path, tiny_reward_model_dir, args, needle):
    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps(ROWS[0]) + "\n")
    values = {"model": tiny_reward_model_dir, "tmp": tmp_path, "data": data}
    result = run_align("eval-rm", *[a.format(**values) for a in args], cwd=tmp_path)
    assert result.returncode == 2, result.stderr
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "eval_rm.json").exists()
