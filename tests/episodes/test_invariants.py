"""The invariant every episode passes before training: each mask-1 token is the engine's, with
its log-prob; environment tokens carry none."""

from __future__ import annotations

import pytest

from align.data.prompts import PromptExample
from align.episodes.assemble import episodes_rollout
from align.episodes.episode import ENV, MODEL, Episode, InvariantError, Segment, check_invariants
from tests.chat_models import chatml_tokenizer


def episode(*segments):
    return Episode([5, 6], [{"role": "user", "content": "q"}], list(segments), done=True)


def test_a_sound_episode_passes():
    check_invariants(episode(Segment(MODEL, [1, 2], [-0.1, -0.2]), Segment(ENV, [3]),
                             Segment(MODEL, [4], [-0.3])))


@pytest.mark.parametrize("bad", [
    [Segment(MODEL, [1, 2], [-0.1])],  # a model token without its log-prob
    [Segment(MODEL, [1, 2], None)],  # a model turn without the engine's log-probs
    [Segment(MODEL, [1], [-0.1]), Segment(ENV, [3], [0.0])],  # an environment token with one
    [Segment(ENV, [3])],  # the environment speaking before the model's first turn
])
def test_episodes_that_break_it_are_refused(bad):
    with pytest.raises(InvariantError):
        check_invariants(episode(*bad))
    tok = chatml_tokenizer("qwen2")
    with pytest.raises(InvariantError):  # ... also where episodes become a rollout
        episodes_rollout(tok, [PromptExample("q", [5, 6])], 1, [episode(*bad)],
                         [tok.eos_token_id], True)


def test_an_episode_in_flight_survives_a_checkpoint_as_json():
    """What an asynchronous run's checkpoint holds of the episodes it has not trained on."""
    import json

    from align.episodes.episode import Drift
    from align.episodes.submit import EpisodeBatch
    from align.trainers.async_rollouts import RolloutPipeline

    played = episode(Segment(MODEL, [1, 2], [-0.1, -0.2], 0.5), Segment(ENV, [3]),
                     Segment(MODEL, [4], [-0.3]))
    played.tool_calls, played.truncated, played.env_reward = 2, True, 0.75
    played.drift, played.reencodes = Drift(3, 1, [3], [9]), True
    pipeline = RolloutPipeline(None, 1, timeout_s=5)
    pipeline.ready = {4: (3, EpisodeBatch([played]))}
    state = json.loads(json.dumps(pipeline.state()))
    again = RolloutPipeline(None, 1, timeout_s=5)
    again.load(state)
    version, batch = again.ready[4]
    back = batch.episodes[0]
    assert version == 3 and back.ids == played.ids and back.mask == played.mask
    assert back.logprobs == played.logprobs and back.turn_rewards() == played.turn_rewards()
    assert (back.tool_calls, back.truncated, back.env_reward) == (2, True, 0.75)
    assert back.drift == played.drift and back.messages == played.messages and back.reencodes
