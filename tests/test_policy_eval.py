"""`align eval`: generate with a saved policy, score with reward specs, compare with a
baseline. The win rate under an exact-match reward must equal 0.5 + (acc_model -
acc_baseline) / 2, since ties count half."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from align.cli import main
from align.policy_eval import win_rate
from reward_models.builtin import clean_completion
from tests.conftest import tiny_config

EXACT = "reward_models.builtin:exact_match"


def test_win_rate_hand_values():
    result = win_rate([1.0, 0.0, 1.0, 0.5], [0.0, 0.0, 0.0, 1.0])
    assert result["win_rate"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    assert (result["wins"], result["ties"], result["losses"]) == (2, 1, 1)
    # 95% normal interval over outcomes (1, .5, 1, 0): std 0.4146, half-width 1.96 * std / 2
    assert result["win_rate_ci_low"] == pytest.approx(0.625 - 1.959964 * 0.41458 / 2, abs=1e-4)
    assert win_rate([1.0], [1.0])["win_rate"] == 0.5


def save_model(path, seed: int) -> str:
    tok = ByT5Tokenizer()
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(tiny_config("llama", len(tok))).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_eval_with_baseline_gives_the_win_rate_its_accuracies_imply(tmp_path, capsys):
    model, baseline = save_model(tmp_path / "a", 0), save_model(tmp_path / "b", 1)
    prompts = [{"prompt": f"Q: {a}+{a + 3}="} for a in range(10, 30)]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    first = tmp_path / "first.json"
    assert main(["eval", model, str(tmp_path / "prompts.jsonl"), "--reward", EXACT,
                 "--max-new-tokens", "4", "--output", str(first)]) == 2  # no `answer` column
    assert "answer" in capsys.readouterr().err
    # The answers: model a's own greedy completions for the first 12 prompts, so it is right
    # on at least those and the random baseline on (almost surely) none.
    with_answers = [{**r, "answer": "unknowable"} for r in prompts]
    assert main(["eval", model, str(tmp_path / "prompts.jsonl"), "--reward",
                 "reward_models.builtin:length_penalty", "--max-new-tokens", "4",
                 "--output", str(first)]) == 0
    samples = [json.loads(line) for line in (tmp_path / "first.samples.jsonl").open()]
    for row, sample in list(zip(with_answers, samples))[:12]:
        row["answer"] = clean_completion(sample["completion"])
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in with_answers))
    out = tmp_path / "eval.json"
    assert main(["eval", model, str(tmp_path / "rows.jsonl"), "--reward", EXACT,
                 "--baseline", baseline, "--max-new-tokens", "4", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    base_acc = report["baseline"]["rewards"]["exact_match"]["mean"]
    assert report["exact_match"] == pytest.approx(report["rewards"]["exact_match"]["mean"])
    assert report["exact_match"] >= 0.6 > base_acc
    assert report["baseline"]["win_rate"] == pytest.approx(
        0.5 + (report["exact_match"] - base_acc) / 2)
    assert report["baseline"]["win_rate_ci_low"] <= report["baseline"]["win_rate"]
    lines = (tmp_path / "eval.samples.jsonl").read_text().splitlines()
    assert len(lines) == 20 and "baseline_completion" in json.loads(lines[0])
    assert "win rate over" in capsys.readouterr().out


def test_bad_input_exits_2_naming_the_cause(tmp_path, capsys):
    model = save_model(tmp_path / "a", 0)
    assert main(["eval", model, str(tmp_path / "missing.jsonl"), "--reward", EXACT]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
    assert main(["eval", model, "embedded"]) == 2
    assert "--reward" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nope"), "embedded", "--reward", EXACT]) == 2
    assert "nope" in capsys.readouterr().err


def test_conversational_prompts_reach_a_trl_reward_in_trls_form(tmp_path, chat_model_dir):
    """`align eval` calls rewards as `align ppo` does: message-list prompts and completions,
    and the completions' token ids."""
    from tests.chat_models import ASCII_IDS, chatml_tokenizer

    rows = [{"prompt": [{"role": "user", "content": f"Say {w}."}]} for w in ("hi", "yes")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "eval.json"
    assert main(["eval", chat_model_dir("gpt2"), str(tmp_path / "chat.jsonl"), "--reward",
                 "tests.trainers.chat_reward:ascii_share", "--max-new-tokens", "6",
                 "--output", str(out)]) == 0
    samples = [json.loads(line) for line in (tmp_path / "eval.samples.jsonl").open()]
    assert samples[0]["prompt"].startswith("<|im_start|>user\nSay hi.<|im_end|>")
    tok = chatml_tokenizer("gpt2")
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir("gpt2"))
    for sample in samples:  # the reward counted the generated ids, EOS included
        prompt = tok(sample["prompt"], add_special_tokens=False, return_tensors="pt")
        new = model.generate(**prompt, max_new_tokens=6, do_sample=False,
                             pad_token_id=tok.pad_token_id)[0, prompt["input_ids"].shape[1]:]
        ids = new.tolist()[: ids_end(new.tolist(), tok.eos_token_id)]
        share = sum(i < ASCII_IDS for i in ids) / len(ids)
        assert sample["rewards"]["ascii_share"] == pytest.approx(share)


def ids_end(ids: list[int], eos: int) -> int:
    return ids.index(eos) + 1 if eos in ids else len(ids)
