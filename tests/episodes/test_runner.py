"""The episode runner on a scripted engine: tokens, masks, log-probs, budgets, failures, drift.

The engine answers from the conversation so far (decoded), as a model would, and returns
log-probs unique to each token it sampled, so a test can tell where every trained token and
log-prob came from.
"""

from __future__ import annotations

import time
from dataclasses import replace

import pytest
import torch

from align.config import EnvironmentConfig
from align.data.prompts import PromptExample
from align.episodes.assemble import episode_metrics, episodes_rollout
from align.episodes.checks import episode_checks
from align.episodes.environment import load_environment
from align.episodes.episode import ENV, MODEL
from align.episodes.runner import EpisodeRunner
from align.errors import TrainingError
from align.losses import IGNORE_INDEX
from align.rollout.base import Generation, Sampling
from tests.chat_models import chatml_tokenizer, trl_template
from tests.episodes import envs

CALL = '<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>'


class ScriptedEngine:
    """Answers with `script(conversation text so far)`, EOS-terminated unless the script's text
    ends with `...` (then it runs out of tokens); log-prob of the k-th token sampled overall is
    -k / 1000, and every sampled (tokens, log-probs) is recorded."""

    def __init__(self, tokenizer, script):
        self.tokenizer, self.script, self.count, self.sampled = tokenizer, script, 0, []
        self.calls = []

    def generate(self, prompts, sampling):
        self.calls.append((len(prompts), sampling.max_new_tokens))
        tokens, logprobs = [], []
        for prompt in prompts:
            text = self.script(self.tokenizer.decode(prompt))
            ids = self.tokenizer(text, add_special_tokens=False).input_ids
            ids = ids + [self.tokenizer.eos_token_id] if not text.endswith("...") else ids
            ids = ids[: sampling.max_new_tokens]
            lps = [-(self.count + k + 1) / 1000 for k in range(len(ids))]
            self.count += len(ids)
            tokens.append(ids)
            logprobs.append(lps)
            self.sampled.append((ids, lps))
        return Generation(tokens, logprobs)


def tokenizer(template="qwen2_5"):
    tok = chatml_tokenizer("qwen2")
    tok.chat_template = trl_template(template)
    return tok


def example(question="What is 2+3?", **columns):
    messages = [{"role": "user", "content": question}]
    return PromptExample(question, [], columns, messages)


def runner(tok, spec="tests.episodes.envs:Calculator", **settings):
    cfg = EnvironmentConfig(spec=spec, **{"max_turns": 4, "tool_timeout_s": 5.0, **settings})
    return EpisodeRunner(tok, [tok.eos_token_id], cfg, load_environment(cfg), 4096), cfg


def calculator_script(text):
    """Call add(2, 3) once, then answer with the tool's result."""
    if "<tool_response>" in text:
        return text.rsplit("<tool_response>\n", 1)[1].split("\n", 1)[0]
    return CALL % ("add", '{"a": 2, "b": 3}')


SAMPLING = Sampling(max_new_tokens=256, seed=0, logprobs=True)


def test_tool_turns_are_masked_and_every_trained_token_is_the_engines():
    tok = tokenizer()
    play, _ = runner(tok)
    engine = ScriptedEngine(tok, calculator_script)
    episodes = play.run(engine, [example(), example()], SAMPLING)
    for episode in episodes:
        assert [s.kind for s in episode.segments] == [MODEL, ENV, MODEL]
        assert episode.final_text == "5" and episode.tool_calls == 1 and not episode.truncated
        assert episode.drift is None  # ChatML renders the episode exactly as trained
    rollout = episodes_rollout(tok, [example()], 2, episodes, [tok.eos_token_id], True)
    sampled = [ids for ids, _ in engine.sampled]
    for row, episode in enumerate(episodes):
        labels, start = rollout.batch["labels"][row], len(episode.prompt_ids)
        trained = labels[labels != IGNORE_INDEX].tolist()
        assert all(s.ids in sampled for s in episode.segments if s.kind == MODEL)
        # every label is a token the engine sampled, and no environment token carries one
        env = episode.segments[1]
        env_at = start + len(episode.segments[0].ids)
        assert (labels[env_at: env_at + len(env.ids)] == IGNORE_INDEX).all()
        assert trained == episode.model_ids
        # the engine's log-prob sits at each model token's shifted position
        for s_at, segment in ((start, episode.segments[0]),
                              (env_at + len(env.ids), episode.segments[2])):
            got = rollout.engine_logprobs[row, s_at - 1: s_at - 1 + len(segment.ids)]
            assert torch.allclose(got, torch.tensor(segment.logprobs))
    # the tool's turn is the template's: `<|im_start|>user ... <tool_response>` tokens
    assert "<tool_response>\n5\n</tool_response>" in tok.decode(episodes[0].segments[1].ids)
    assert episode_metrics(episodes)["episodes/env_token_share"] > 0


def test_the_engines_tokens_are_kept_where_decoding_and_encoding_again_would_change_them():
    tok = tokenizer()
    play, _ = runner(tok)
    odd = tok("é", add_special_tokens=False).input_ids[:1]  # half a UTF-8 character

    class HalfCharacter(ScriptedEngine):
        def generate(self, prompts, sampling):
            generation = super().generate(prompts, sampling)
            generation.tokens = [odd + t for t in generation.tokens]
            generation.logprobs = [[-0.5] + lp for lp in generation.logprobs]
            return generation

    episodes = play.run(HalfCharacter(tok, lambda text: "7"), [example()], SAMPLING)
    assert episodes[0].model_ids[0] == odd[0]  # trained on what was sampled ...
    assert episodes[0].reencodes  # ... which its text, encoded again, would not give
    assert episodes[0].drift is None  # the template renders that text as the model wrote it
    metrics = episode_metrics(episodes)
    assert (metrics["episodes/reencode_rate"], metrics["episodes/drift_rate"]) == (1.0, 0.0)


def test_a_round_renders_a_shared_prompt_and_a_repeated_tool_answer_once(monkeypatch):
    """Four episodes of one prompt, each answered "5" by the tool: the template renders the
    prompt once and the tool's turn once in the round (and each conversation once more for the
    drift check); the next round renders afresh."""
    tok = tokenizer()
    play, _ = runner(tok)
    rendered: list[int] = []
    template = type(tok).apply_chat_template

    def counting(self, messages, *args, **kwargs):
        rendered.append(len(messages))
        return template(self, messages, *args, **kwargs)

    monkeypatch.setattr(type(tok), "apply_chat_template", counting)
    for _ in range(2):
        rendered.clear()
        episodes = play.run(ScriptedEngine(tok, calculator_script), [example()] * 4, SAMPLING)
        assert len({tuple(e.ids) for e in episodes}) == 1 and episodes[0].drift is None
        assert sorted(rendered) == [1, 3] + [4] * 4  # prompt, tool turn (probe), drift checks


def test_one_environment_instance_per_episode():
    tok = tokenizer()
    play, _ = runner(tok)
    before = len(envs.INSTANCES)
    episodes = play.run(ScriptedEngine(tok, calculator_script), [example()] * 3, SAMPLING)
    made = envs.INSTANCES[before:]
    assert len({id(e.env.instance) for e in episodes}) == 3
    assert all(m.calls == 1 for m in made[-3:])  # each saw its own episode's call only
    assert [e.env_reward for e in episodes] == [1.0, 1.0, 1.0]


def test_tool_errors_go_back_to_the_model_and_are_counted():
    tok = tokenizer()
    play, _ = runner(tok)

    def script(text):
        if "<tool_response>" not in text:
            return (CALL % ("fail", '{"reason": "no"}') + CALL % ("nope", "{}")
                    + "<tool_call>\n{bad json\n</tool_call>")
        return "done"

    episode = play.run(ScriptedEngine(tok, script), [example()], SAMPLING)[0]
    assert episode.tool_calls == 3 and episode.tool_errors == 3
    assert episode.infra_error is None and episode.final_text == "done"
    tool_turn = tok.decode(episode.segments[1].ids)
    assert "Error: ValueError: no" in tool_turn and "unknown tool 'nope'" in tool_turn


def test_a_call_that_does_not_parse_can_end_the_episode():
    """`on_malformed_call: end` reads the turn as text, as TRL does: the episode ends there,
    no tool runs (not even the turn's well-formed call), and the mistake is counted."""
    tok = tokenizer()
    play, _ = runner(tok, on_malformed_call="end")
    turn = CALL % ("add", '{"a": 2, "b": 3}') + "<tool_call>\n{bad json\n</tool_call>"
    episode = play.run(ScriptedEngine(tok, lambda text: turn), [example()], SAMPLING)[0]
    assert episode.turns == 1 and len(episode.segments) == 1 and episode.done
    assert episode.tool_calls == 0 and episode.tool_errors == 1 and not episode.truncated
    assert episode.env.instance.calls == 0 and episode.infra_error is None


def test_async_tools_run():
    tok = tokenizer()
    play, _ = runner(tok)

    def script(text):
        if "<tool_response>" not in text:
            return CALL % ("shout", '{"text": "hi"}')
        return "ok"

    episode = play.run(ScriptedEngine(tok, script), [example()], SAMPLING)[0]
    assert "HI" in tok.decode(episode.segments[1].ids) and episode.tool_errors == 0


def test_a_hanging_tool_costs_its_timeout_and_the_others_go_on():
    tok = tokenizer()
    play, cfg = runner(tok, tool_timeout_s=0.5)

    def script(text):
        if "<tool_response>" in text:
            return "done"
        return (CALL % ("hang", '{"seconds": 30}') if "slow" in text
                else CALL % ("add", '{"a": 1, "b": 1}'))

    start = time.monotonic()
    episodes = play.run(ScriptedEngine(tok, script),
                        [example("slow one"), example("fast"), example("fast")], SAMPLING)
    assert time.monotonic() - start < 5
    assert "'hang'" in episodes[0].infra_error and "tool_timeout_s" in episodes[0].infra_error
    assert [e.infra_error for e in episodes[1:]] == [None, None]
    assert [e.final_text for e in episodes[1:]] == ["done", "done"]
    rollout = episodes_rollout(tok, [example()], 3, episodes, [tok.eos_token_id], True)
    assert rollout.valid == [False, True, True]
    assert (rollout.batch["labels"][0] == IGNORE_INDEX).all()  # nothing of it is trained on
    episode_checks(episodes, replace(cfg, max_infra_failure_fraction=0.5), "Calculator", 0)
    with pytest.raises(TrainingError, match="Calculator.*hang"):
        episode_checks(episodes, replace(cfg, max_infra_failure_fraction=0.2), "Calculator", 0)


def test_an_environment_that_crashes_is_an_infrastructure_failure():
    tok = tokenizer()
    play, _ = runner(tok, spec="tests.episodes.envs:Crashing")
    episodes = play.run(ScriptedEngine(tok, calculator_script),
                        [example(crash=True), example(crash=False)], SAMPLING)
    assert "backend is down" in episodes[0].infra_error and not episodes[0].segments
    assert episodes[1].infra_error is None and episodes[1].final_text == "5"
    # reset's text is appended to the last user message
    assert episodes[1].messages[0]["content"].endswith("(use the tools)")


def test_budgets_end_episodes_truncated():
    tok = tokenizer()
    always_call = lambda text: CALL % ("add", '{"a": 1, "b": 1}')  # noqa: E731
    play, _ = runner(tok, max_turns=2)
    episode = play.run(ScriptedEngine(tok, always_call), [example()], SAMPLING)[0]
    assert episode.truncated and episode.turns == 2 and episode.tool_calls == 1

    play, _ = runner(tok, max_tokens_per_turn=5)
    engine = ScriptedEngine(tok, always_call)
    episode = play.run(engine, [example()], SAMPLING)[0]
    assert episode.truncated and episode.turns == 1 and len(episode.ids) == 5
    assert engine.calls == [(1, 5)]

    play, _ = runner(tok, max_episode_tokens=120)
    episode = play.run(ScriptedEngine(tok, always_call), [example()], SAMPLING)[0]
    assert episode.truncated and len(episode.ids) <= 120

    long_output = lambda text: ("done" if "<tool_response>" in text  # noqa: E731
                                else CALL % ("shout", '{"text": "%s"}' % ("a" * 100)))
    play, _ = runner(tok, max_tool_output_tokens=16)
    episode = play.run(ScriptedEngine(tok, long_output), [example()], SAMPLING)[0]
    assert episode.tool_outputs_cut == 1 and not episode.truncated
    assert "[output truncated]" in episode.messages[-2]["content"]
    assert len(tok(episode.messages[-2]["content"]).input_ids) < 40


def test_a_turn_is_one_engine_call_and_each_episode_is_cut_at_its_own_budget():
    tok = tokenizer()

    def script(text):  # a longer call (and tool output) for one episode, then a long answer
        if "<tool_response>" in text:
            return "y" * 300
        return CALL % ("add", '{"a": 123456789, "b": 1}' if "big" in text else '{"a": 1, "b": 1}')

    play, _ = runner(tok, max_episode_tokens=200)
    engine = ScriptedEngine(tok, script)
    small, big = play.run(engine, [example("Add small."), example("Add big.")], SAMPLING)
    assert [n for n, _ in engine.calls] == [2, 2]  # both episodes in each turn's one call
    # the call's limit is the largest budget left: the episode with the shorter first turn's
    assert engine.calls[1][1] == 200 - sum(len(s.ids) for s in small.segments[:2])
    for episode in (small, big):  # the second turn ran out of the episode's tokens
        model_turn = episode.segments[-1]
        assert episode.truncated and len(episode.ids) == 200 and episode.turns == 2
        assert len(model_turn.ids) == len(model_turn.logprobs) < 300
    assert len(big.segments[-1].ids) < len(small.segments[-1].ids)


def test_turn_rewards_sit_on_the_last_token_of_their_turn():
    tok = tokenizer()
    play, _ = runner(tok, spec="tests.episodes.envs:Guess", max_turns=4)
    guesses = iter(["1", "2", "3"])
    episode = play.run(ScriptedEngine(tok, lambda text: next(guesses)), [example(target=3)],
                       SAMPLING)[0]
    assert [s.reward for s in episode.segments if s.kind == MODEL] == [-0.1, -0.1, 1.0]
    rollout = episodes_rollout(tok, [example()], 1, [episode], [tok.eos_token_id], True)
    start, ends, at = len(episode.prompt_ids), [], 0
    for segment in episode.segments:
        at += len(segment.ids)
        if segment.kind == MODEL:
            ends.append(start + at - 1 - 1)  # shifted: position t holds token t + 1
    placed = rollout.token_rewards[0].nonzero().flatten().tolist()
    assert placed == ends
    assert rollout.token_rewards[0, ends].tolist() == pytest.approx([-0.1, -0.1, 1.0])


def test_a_template_that_rewrites_history_shows_as_drift():
    """Qwen3's template drops the reasoning of assistant turns before the last user message: a
    multi-turn chat (a TurnEnvironment answering as the user) is no longer a prefix."""
    tok = tokenizer("qwen3")
    guesses = iter(["1", "3"])
    play, cfg = runner(tok, spec="tests.episodes.envs:Guess")
    engine = ScriptedEngine(tok, lambda text: f"<think>\nmaybe\n</think>\n\n{next(guesses)}")
    episodes = play.run(engine, [example(target=3)], SAMPLING)
    drift = episodes[0].drift
    assert drift is not None and drift.turn == 1  # the first turn's reasoning is dropped
    assert tok.decode(drift.trained).startswith("<think>")
    assert episode_metrics(episodes)["episodes/drift_rate"] == 1.0
    episode_checks(episodes, cfg, "Guess", 0)  # report: trains on, logs
    with pytest.raises(TrainingError, match="turn 1"):
        episode_checks(episodes, replace(cfg, on_drift="error"), "Guess", 4)


def test_chatml_reports_no_drift_over_a_multi_turn_chat():
    tok = tokenizer("qwen2_5")
    guesses = iter(["1", "2", "3"])
    play, _ = runner(tok, spec="tests.episodes.envs:Guess")
    episodes = play.run(ScriptedEngine(tok, lambda text: next(guesses)), [example(target=3)],
                        SAMPLING)
    assert episodes[0].turns == 3 and episodes[0].drift is None


def test_the_python_tool_runs_model_code_in_the_sandbox_within_an_episode():
    tok = tokenizer()
    cfg = EnvironmentConfig(tools=["align.sandbox.tools:python"], max_turns=3,
                            tool_timeout_s=30.0)
    play = EpisodeRunner(tok, [tok.eos_token_id], cfg, load_environment(cfg), 4096)
    code = '{"code": "import os; print(6 * 7, os.environ.get(\\"HF_TOKEN\\"))"}'

    def script(text):
        return "done" if "<tool_response>" in text else CALL % ("python", code)

    episode = play.run(ScriptedEngine(tok, script), [example()], SAMPLING)[0]
    assert episode.infra_error is None and episode.tool_calls == 1
    assert "42 None" in tok.decode(episode.segments[1].ids)  # ran, and saw no secret
