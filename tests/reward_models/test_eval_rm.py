"""`align eval-rm MODEL DATA`: pairwise accuracy printed as a table and written as JSON."""

from __future__ import annotations

import json
import shutil

import pytest

from align.config import RMConfig, TaskConfig, dump_config, load_config
from align.tasks import load_task
from reward_models.reward_model import load_reward_model, score_texts
from reward_models.server import evaluate_reward_model
from tests.test_cli import run_align

ROWS = [{"prompt": "Q: 23+58=", "chosen": " 81", "rejected": " 71"},
        {"prompt": "Q: 10+10=", "chosen": " 20", "rejected": " 21"},
        {"prompt": "Q: 99+99=", "chosen": " 198", "rejected": " 188"}]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def expected_accuracy(model_dir: str, rows: list[dict]) -> float:
    """Pairwise accuracy from the model's own scores, one text at a time."""
    model, tok = load_reward_model(model_dir)
    prompts = [r["prompt"] for r in rows]
    chosen = score_texts(model, tok, prompts, [r["chosen"] for r in rows])
    rejected = score_texts(model, tok, prompts, [r["rejected"] for r in rows])
    return sum(c > r for c, r in zip(chosen, rejected)) / len(rows)


def test_figures_match_the_scores(tmp_path, tiny_reward_model_dir):
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    report = evaluate_reward_model(tiny_reward_model_dir, data, batch_size=2)
    model, tok = load_reward_model(tiny_reward_model_dir)
    prompts = [r["prompt"] for r in ROWS]
    chosen = score_texts(model, tok, prompts, [r["chosen"] for r in ROWS])
    rejected = score_texts(model, tok, prompts, [r["rejected"] for r in ROWS])
    assert report["pairs"] == 3
    assert report["accuracy"] == pytest.approx(sum(c > r for c, r in zip(chosen, rejected)) / 3)
    assert 0 < report["accuracy"] < 1  # the random model ranks some pairs wrong: not a constant
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
    assert report["pairs"] == 3
    assert report["accuracy"] == pytest.approx(expected_accuracy(tiny_reward_model_dir, ROWS))
    assert f"{100 * report['accuracy']:.2f}%" in result.stdout


def test_embedded_pairs_follow_the_runs_task_settings(tmp_path, tiny_reward_model_dir):
    """`embedded` scores the held-out pairs of the task the model's run trained on."""
    run = tmp_path / "run"
    shutil.copytree(tiny_reward_model_dir, run / "final")
    cfg = load_config(RMConfig, None, ["task.seed=7", "task.num_eval=40"])
    dump_config(cfg, run / "config.yaml")
    task = load_task(cfg.task)
    held_out = task.held_out_preference_rows()
    # Why it matters: the default task's held-out pairs include pairs this run trained on.
    trained = {r["prompt"] for r in task.preference_rows()}
    assert not trained & {r["prompt"] for r in held_out}
    assert trained & {r["prompt"] for r in load_task(TaskConfig()).held_out_preference_rows()}

    report = evaluate_reward_model(run / "final", "embedded")
    direct = evaluate_reward_model(run / "final", write_jsonl(tmp_path / "held.jsonl", held_out))
    assert report["pairs"] == 40
    for key in ("accuracy", "margin", "chosen_reward", "rejected_reward"):
        assert report[key] == pytest.approx(direct[key], abs=1e-6), key


@pytest.mark.parametrize(("args", "needle"), [
    (["{model}", "missing.jsonl"], "missing.jsonl"),
    (["{tmp}", "{data}"], "no config.json"),
    (["{model}", "embedded"], "config.yaml"),  # no run beside the model: no task settings
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
