"""Each stage's examples from files: RL prompts and KTO rows through the preparation cache, and
unusable rows skipped from both splits and counted."""

from __future__ import annotations

import json

import pytest
from transformers import ByT5Tokenizer

from align.data.prepare import sft_encoder
from align.data.sft import sft_examples, tokenize_sft
from align.errors import DataError
from align.model_loading import load_tokenizer
from align.trainers.kto import load_unpaired_examples
from align.trainers.ppo import PPOTrainer
from align.trainers.stage_data import stage_examples
from tests.conftest import tiny_dpo_config, tiny_ppo_config, tiny_sft_config


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


@pytest.fixture()
def tokenizer_calls(monkeypatch) -> list[int]:
    """Counts the texts the (ByT5) tokenizer of the tiny configs is asked to encode."""
    calls: list[int] = []
    real = ByT5Tokenizer.__call__

    def counting(self, text, *args, **kwargs):
        calls.append(1 if isinstance(text, str) else len(text))
        return real(self, text, *args, **kwargs)

    monkeypatch.setattr(ByT5Tokenizer, "__call__", counting)
    return calls


def prepared_prompts(cfg):
    trainer = PPOTrainer(cfg, show_progress=False)
    trainer.tokenizer = load_tokenizer(cfg.model)
    trainer.prepare_data()
    return trainer


def test_rl_prompts_are_read_from_the_cache_on_a_second_launch(tmp_path, tokenizer_calls):
    rows = [{"prompt": f"Q: {i}+{i}=", "answer": str(2 * i), "level": i % 3} for i in range(40)]
    cfg = tiny_ppo_config(tmp_path, f"data.train={write_jsonl(tmp_path / 'rl.jsonl', rows)}",
                          "data.eval_fraction=0.1", f"data.cache_dir={tmp_path / 'cache'}")
    first = prepared_prompts(cfg)
    assert tokenizer_calls, "the first launch tokenises the prompts"
    tokenizer_calls.clear()
    second = prepared_prompts(cfg)
    assert tokenizer_calls == [], "the second launch tokenised the prompts again"
    assert list(second.prompts) == list(first.prompts) and len(first.prompts) == 36
    assert second.eval_prompts == first.eval_prompts and len(first.eval_prompts) == 4
    example = first.prompts[0]
    assert example.ids == list(ByT5Tokenizer()(example.text, add_special_tokens=False)
                               ["input_ids"])
    assert example.columns == {k: v for k, v in rows[int(example.text[3:].split("+")[0])]
                               .items() if k != "prompt"}


def test_kto_rows_are_read_from_the_cache_on_a_second_launch(tmp_path, tokenizer_calls):
    rows = [{"prompt": f"Q: {i}+1=", "chosen": f" {i + 1}", "rejected": f" {i + 2}"}
            for i in range(20)]
    rows += [{"prompt": "Q: 0+0=", "completion": " 0", "label": True}]
    cfg = tiny_dpo_config(tmp_path, f"data.train={write_jsonl(tmp_path / 'kto.jsonl', rows)}",
                          "dpo.loss_type=kto", "data.eval_fraction=0.2",
                          f"data.cache_dir={tmp_path / 'cache'}", "trainer.global_batch_size=4",
                          "trainer.micro_batch_size=4")
    tokenizer = load_tokenizer(cfg.model)
    first = load_unpaired_examples(cfg, tokenizer)
    assert tokenizer_calls
    tokenizer_calls.clear()
    second = load_unpaired_examples(cfg, tokenizer)
    assert tokenizer_calls == [], "the second launch tokenised the rows again"
    assert second[:2] == first[:2]
    assert len(first[0]) + len(first[1]) == 2 * 20 + 1  # every pair split in two


def test_unusable_rows_leave_both_splits_and_are_counted(tmp_path):
    rows = [{"prompt": f"Q: {i}+1=", "completion": f" {i + 1}"} for i in range(40)]
    for i in (3, 17, 30):
        rows[i] = {"prompt": "Q: " + "9" * 30 + "+1=", "completion": " 1"}  # over max_length
    cfg = tiny_sft_config(tmp_path, f"data.train={write_jsonl(tmp_path / 'sft.jsonl', rows)}",
                          "data.eval_fraction=0.5", f"data.cache_dir={tmp_path / 'cache'}")
    tokenizer = load_tokenizer(cfg.model)
    data = stage_examples(cfg, "sft", sft_encoder(24, True, "skip"), tokenizer, sft_examples,
                          show_progress=False)
    assert len(data.train) + len(data.held_out) == 37
    counts = data.skip_metrics()
    assert (counts.get("data/skipped/prompt_too_long", 0)
            + counts.get("data/held_out_skipped/prompt_too_long", 0)) == 3
    # The raw held-out rows are those of the held-out examples, in the same order.
    held_rows = list(data.held_out_rows())
    expected, _ = tokenize_sft(held_rows, tokenizer, 24)
    assert expected == data.held_out
    assert list(data.train) == tokenize_sft([r for r in rows if r not in held_rows
                                             and len(r["prompt"]) < 24], tokenizer, 24)[0]


def test_a_file_with_too_many_unusable_rows_stops_the_run(tmp_path):
    rows = [{"prompt": f"Q: {i}+1=", "completion": f" {i + 1}"} for i in range(10)]
    rows += [{"prompt": "Q: " + "9" * 30 + "+1=", "completion": " 1"}] * 3
    cfg = tiny_sft_config(tmp_path, f"data.train={write_jsonl(tmp_path / 'sft.jsonl', rows)}",
                          f"data.cache_dir={tmp_path / 'cache'}")
    with pytest.raises(DataError, match=r"sft.jsonl: 3 of 13 rows \(23.1%\) are unusable, more "
                                        r"than data.max_skipped_fraction=0.2 allows: "
                                        r"prompt_too_long .*data.max_length=24"):
        stage_examples(cfg, "sft", sft_encoder(24, True, "skip"), load_tokenizer(cfg.model),
                       sft_examples, show_progress=False)
