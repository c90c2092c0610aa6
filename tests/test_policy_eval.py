"""`align eval`: generate with a saved policy, score with reward specs, compare with a
baseline. The win rate under an exact-match reward must equal 0.5 + (acc_model -
acc_baseline) / 2, since ties count half. With `-k` and an environment: k samples per prompt,
each a multi-turn episode, pass@k and mean@k as counted by hand."""

from __future__ import annotations

import json
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, ByT5Tokenizer

from align.cli import main
from align.config import EnvironmentConfig
from align.data import tokenize_prompts
from align.episodes.rewards import with_environment_reward
from align.policy_eval import sample_records, score, summarize, win_rate
from align.policy_sampling import EvalSettings, load_eval_environment, play
from align.rollout.base import Generation
from reward_models.builtin import clean_completion
from tests.chat_models import chatml_tokenizer, save_chat_model, trl_template
from tests.conftest import tiny_config
from tests.episodes import envs

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


# ---------------------------------------------------------------- k samples and environments

ROWS = [("2+3", "5"), ("4+4", "8"), ("1+1", "2"), ("3+3", "6")]
# Whether the scripted model answers sample j of prompt p with the tool's (right) result.
RIGHT = [[True, False, False], [False, False, False], [True, True, False]]


class TableEngine:
    """A scripted model: its first turn calls add(a, b) for the question, its second answers
    the tool's result where RIGHT says so (row r of a call is sample r % 3 of prompt r // 3),
    else 0. Log-prob -0.001 per token."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_ids = tokenizer, [tokenizer.eos_token_id]

    def generate(self, prompts, sampling):
        tokens = []
        for row, prompt in enumerate(prompts):
            text = self.tokenizer.decode(prompt)
            if "<tool_response>" in text:
                result = text.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0]
                answer = result if RIGHT[row // 3][row % 3] else "0"
            else:
                a, b = re.findall(r"What is (\d+)\+(\d+)\?", text)[-1]
                call = {"name": "add", "arguments": {"a": int(a), "b": int(b)}}
                answer = f"<tool_call>\n{json.dumps(call)}\n</tool_call>"
            tokens.append(self.tokenizer(answer).input_ids + self.eos_ids)
        return Generation(tokens, [[-0.001] * len(t) for t in tokens])


def test_pass_at_k_of_episodes_matches_the_hand_count():
    """Three samples of four prompts; the last prompt's environment crashes in reset (an
    infrastructure failure: no reward, not correct). Right answers per prompt: 1, 0, 2, 0."""
    tok = chatml_tokenizer("qwen2")
    tok.chat_template = trl_template("qwen2_5")
    settings = EvalSettings(greedy=False, samples_per_prompt=3, max_length=4096, max_new_tokens=256,
                            environment=EnvironmentConfig(spec="tests.episodes.envs:Crashing"))
    spec = load_eval_environment(settings)
    rows = [{"prompt": [{"role": "user", "content": f"What is {q}?"}], "answer": a,
             **({"crash": True} if q == "3+3" else {})} for q, a in ROWS]
    examples = tokenize_prompts(rows, tok, 4096, "rows")
    samples = play(TableEngine(tok), tok, examples, settings, spec)
    scorer = with_environment_reward([EXACT], spec, 1.0)
    scores = score(scorer, samples)
    report = summarize("m", "rows", "rows", settings, samples, scores)
    assert report["pass_at_k"] == pytest.approx({
        "judged_by": "answer (exact match)", "n": 3,
        "pass@1": (1 / 3 + 0 + 2 / 3 + 0) / 4,
        "pass@2": ((1 - 1 / 3) + 0 + 1 + 0) / 4,  # 1 - C(2,2)/C(3,2) for prompt 0
        "pass@3": (1 + 0 + 1 + 0) / 4})
    assert report["exact_match"] == pytest.approx(3 / 12)
    # mean@3 over the 9 samples that were scored; each episode called add once
    assert report["rewards"]["exact_match"]["mean@3"] == pytest.approx(3 / 9)
    assert report["rewards"]["exact_match"]["scored"] == 9
    assert report["rewards"]["Crashing"]["mean@3"] == 1.0
    episodes = report["episodes"]
    assert episodes["infra_failures"] == 3 and episodes["turns_mean"] == 2.0
    assert episodes["tool_calls"] == pytest.approx(9 / 12) and episodes["drift_rate"] == 0.0
    records = sample_records(samples, scores)
    assert [r["prompt_index"] for r in records] == [p for p in range(4) for _ in range(3)]
    assert records[0]["episode"]["messages"][2] == {"role": "tool", "content": "5",
                                                    "name": "add"}
    assert records[-1]["rewards"] == {"exact_match": None, "Crashing": None}


def chat_rows(tmp_path, answers: bool = False):
    rows = [{"prompt": [{"role": "user", "content": q}], **({"answer": "yes"} if answers else {})}
            for q in ("What is red?", "Say hello.")]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(tmp_path / "chat.jsonl")


@pytest.fixture
def loads(monkeypatch):
    """How often a model is loaded (align.rollout.local)."""
    import align.rollout.local as local

    count, load = [0], local.load_model

    def counted(*args, **kwargs):
        count[0] += 1
        return load(*args, **kwargs)

    monkeypatch.setattr(local, "load_model", counted)
    return count


def test_eval_with_an_environment_through_the_cli(tmp_path, loads):
    model = save_chat_model("qwen2", tmp_path / "model", eos_scale=6.0)
    (tmp_path / "qwen2_5.jinja").write_text(trl_template("qwen2_5"))
    out = tmp_path / "eval.json"
    assert main(["eval", str(model), chat_rows(tmp_path), "--environment",
                 "tests.episodes.envs:Calculator", "--tool", "tests.episodes.envs:multiply",
                 "--chat-template", str(tmp_path / "qwen2_5.jinja"), "-k", "2", "--max-turns",
                 "2", "--max-tokens-per-turn", "6", "--max-length", "2048",
                 "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["samples_per_prompt"] == 2 and not report["greedy"]
    assert set(report["rewards"]) == {"Calculator"}  # get_reward() is the reward
    assert "mean@2" in report["rewards"]["Calculator"]
    assert report["pass_at_k"]["judged_by"] == "Calculator = 1"  # calls made: 0 or 1 here
    assert {"pass@1", "pass@2"} <= set(report["pass_at_k"])
    assert {"turns_mean", "tool_calls", "tool_errors", "truncated", "infra_failures",
            "drift_rate"} <= set(report["episodes"])
    assert report["environment"]["tools"] == ["tests.episodes.envs:multiply"]
    samples = [json.loads(line) for line in (tmp_path / "eval.samples.jsonl").open()]
    assert len(samples) == 4
    for sample in samples:
        messages = sample["episode"]["messages"]
        assert messages[0]["role"] == "user" and messages[1]["role"] == "assistant"
        assert "multiply" in sample["prompt"]  # the tools reached the prompt
    assert loads[0] == 1


def test_k_samples_per_prompt_over_multi_turn_episodes(tmp_path, loads):
    model = save_chat_model("qwen2", tmp_path / "model", eos_scale=6.0)
    out = tmp_path / "eval.json"
    assert main(["eval", str(model), chat_rows(tmp_path, answers=True),
                 "--environment", "tests.episodes.envs:Chatter", "-k", "3",
                 "--max-tokens-per-turn", "8", "--max-turns", "3", "--output", str(out)]) == 0
    report = json.loads(out.read_text())
    samples = [json.loads(line) for line in (tmp_path / "eval.samples.jsonl").open()]
    assert [s["prompt_index"] for s in samples] == [0, 0, 0, 1, 1, 1]
    assert [s["sample"] for s in samples] == [0, 1, 2, 0, 1, 2]
    assert any(len({s["completion"] for s in samples[p:p + 3]}) > 1 for p in (0, 3))
    # No --reward: the TurnEnvironment's return is the reward, its per-turn rewards summed
    # over the turns it answered (a turn cut without EOS ends the episode unanswered).
    returns = []
    for sample in samples:
        turns = [m["content"] for m in sample["episode"]["messages"] if m["role"] == "assistant"]
        answered = turns[:-1] if sample["episode"]["truncated"] else turns
        returns.append(sum(envs.ascii_share(text) for text in answered))
    assert report["rewards"]["Chatter"]["mean@3"] == pytest.approx(sum(returns) / 6)
    assert list(report["pass_at_k"]) == ["judged_by", "n", "pass@1", "pass@2", "pass@3"]
    # Chatter answers every turn that ends: episodes went on past one turn, one model load
    assert max(s["episode"]["turns"] for s in samples) >= 2 and loads[0] == 1
    assert any(m == {"role": "user", "content": "more"} for s in samples
               for m in s["episode"]["messages"])


def test_bad_eval_options_exit_2_naming_the_option(tmp_path, capsys, chat_model_dir):
    model, data = chat_model_dir("qwen2"), chat_rows(tmp_path)
    env = ["--environment", "tests.episodes.envs:Calculator"]
    cases = [
        (["-k", "0"], "-k/--samples-per-prompt"),
        (["-k", "2", "--temperature", "0"], "--temperature"),
        (["--max-turns", "2"], "--max-turns sets a budget of episodes"),
        ([*env, "--max-turns", "0"], "--max-turns must be at least 1"),
        ([*env, "--max-tokens-per-turn", "0"], "--max-tokens-per-turn must be at least 1"),
        (["--environment", f"{tmp_path}/absent.py:Env"], "--environment"),
        ([*env, "--tool", "tests.episodes.envs:nothing"], "--tool 'tests.episodes.envs:"),
        (["--tool", "tests.episodes.envs:multiply"], "--reward"),  # no reward at all
        (env, "--chat-template: environment Calculator"),  # ChatML cannot render tool calls
    ]
    for options, needle in cases:
        assert main(["eval", model, data, *options, "--output",
                     str(tmp_path / "e.json")]) == 2, options
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (options, err)
