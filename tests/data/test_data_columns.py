"""`data.columns`: the user's column names mapped onto align's; errors name the user's."""

from __future__ import annotations

import json

import pytest

from align.config import PPOConfig, load_config
from align.data.sources import rename_columns
from align.errors import ConfigError, DataError
from align.trainers.sft import SFTTrainer
from align.trainers.stage_data import load_train_eval_rows
from tests.conftest import tiny_sft_config


def write(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_rows_are_renamed_for_sft_preference_and_rl_data(tmp_path):
    sft = write(tmp_path / "sft.jsonl", [{"question": "Q: 1+1=", "response": " 2", "id": 7}])
    cfg = tiny_sft_config(tmp_path, f"data.train={sft}",
                          "data.columns={prompt: question, completion: response}")
    assert load_train_eval_rows(cfg.data, 0).train == [
        {"id": 7, "prompt": "Q: 1+1=", "completion": " 2"}]
    pairs = [{"q": "Q: 1+1=", "good": " 2", "bad": " 3"}]
    assert rename_columns(pairs, {"prompt": "q", "chosen": "good", "rejected": "bad"},
                          "p.jsonl") == [{"prompt": "Q: 1+1=", "chosen": " 2", "rejected": " 3"}]
    rl = write(tmp_path / "rl.jsonl", [{"problem": "Q: 1+1=", "solution": "2"}])
    ppo = load_config(PPOConfig, None, [f"data.train={rl}", "rewards=[{spec: 'x:y'}]",
                                        "data.columns={prompt: problem, answer: solution}"])
    assert load_train_eval_rows(ppo.data, 0).train == [{"prompt": "Q: 1+1=", "answer": "2"}]


def test_a_row_without_the_mapped_column_names_it(tmp_path):
    rows = [{"question": "a", "response": "b"}, {"query": "a", "response": "b"}]
    with pytest.raises(DataError, match=r"d.jsonl, row 2, column 'question': missing "
                                        r"\(data.columns maps it to 'prompt'"):
        rename_columns(rows, {"prompt": "question"}, "d.jsonl")


def test_errors_while_preparing_name_the_users_column(tmp_path):
    data = write(tmp_path / "sft.jsonl", [{"question": "Q: 1+1=", "response": " 2"},
                                          {"question": "Q: 1+2=", "response": 3}])
    cfg = tiny_sft_config(tmp_path, f"data.train={data}",
                          "data.columns={prompt: question, completion: response}")
    with pytest.raises(DataError, match=r"row 2, column 'response'"):
        SFTTrainer(cfg, show_progress=False).fit()  # fails in data preparation, before Ray
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("columns, message", [
    ("{prompt: q, completion: q}", "maps one of your columns twice"),
    ("{prompt: ''}", "strings"),
])
def test_bad_mappings_are_config_errors(tmp_path, columns, message):
    with pytest.raises(ConfigError, match=message):
        tiny_sft_config(tmp_path, "data.train=x.jsonl", f"data.columns={columns}")
    with pytest.raises(ConfigError, match="embedded task"):
        tiny_sft_config(tmp_path, "data.columns={prompt: q}")
