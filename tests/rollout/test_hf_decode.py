"""The `hf` engine's decoding loop: exact sampling, keys and values reused across an episode's
turns, drafted tokens checked against the model's own samples."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from align.rollout import Sampling
from align.rollout.drafts import NgramDrafts
from align.rollout.hf_decode import draw
from align.rollout.hf_sampling import hf_sample
from align.rollout.kv_cache import Entry, PrefixCache

CPU = torch.device("cpu")


def full_forward_logprobs(model, prompt: list[int], tokens: list[int],
                          temperature: float) -> torch.Tensor:
    """The trainer's view: one forward over prompt + tokens, log-probs of the tokens."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt + tokens])).logits[0].float()
    scores = logits[len(prompt) - 1:-1] / temperature
    return torch.log_softmax(scores, dim=-1).gather(1, torch.tensor(tokens)[:, None])[:, 0]


def play_turns(model, prompts, sampling, prefix, drafts, turns=3, eos=(1,)):
    """Episodes of `turns` calls: each turn's prompt is the last one, its sampled tokens and
    two tokens of an environment's answer. Returns (prompt, tokens, logprobs) per row and turn,
    and the input widths of every forward."""
    widths: list[tuple[int, int]] = []
    handle = model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: widths.append(tuple(args[0].shape)))
    played = []
    try:
        for turn in range(turns):
            with torch.no_grad():
                tokens, logprobs = hf_sample(model, prompts, sampling, list(eos), 0, CPU,
                                             prefix=prefix, drafts=drafts)
            played.append(list(zip(prompts, tokens, logprobs)))
            prompts = [p + t + [60 + turn, 61] for p, t in zip(prompts, tokens)]
    finally:
        handle.remove()
    return played, widths


@pytest.mark.parametrize(("arch", "temperature", "top_p", "draft"),
                         [("llama", 1.0, 1.0, 0), ("llama", 0.7, 1.0, 4), ("gpt2", 1.0, 1.0, 4),
                          ("opt", 0.9, 1.0, 4), ("llama", 1.0, 0.9, 0)])
def test_every_turns_log_probs_are_the_trainers(tiny_model_dir, arch, temperature, top_p,
                                                draft):
    """Over three turns that reuse the earlier turns' keys and values (and check drafted
    tokens), every sampled token's log-prob is a full forward's over the whole conversation."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir(arch)).eval()
    torch.manual_seed(0)
    prompts = [[40, 41, 42, 43, 44], [50, 51], [40, 41, 42, 43, 44], [52, 53, 54]]
    drafts = NgramDrafts(draft, n=1) if draft else None
    if drafts is not None:  # guesses right or wrong, both must come out exact
        drafts.add([45, 46, 47, 48, 49, 45, 47])
    sampling = Sampling(max_new_tokens=6, temperature=temperature, top_p=top_p, logprobs=True)
    played, _ = play_turns(model, prompts, sampling, PrefixCache(1 << 30), drafts)
    checked = 0
    for turn in played:
        for prompt, tokens, logprobs in turn:
            assert len(logprobs) == len(tokens) and 1 not in tokens[:-1]
            if top_p == 1.0:
                want = full_forward_logprobs(model, prompt, tokens, temperature)
                torch.testing.assert_close(torch.tensor(logprobs), want, atol=2e-5, rtol=0)
            checked += len(tokens)
    assert checked > 30


def test_a_turn_runs_only_its_new_tokens_and_samples_as_without_reuse(tiny_model_dir):
    """The second turn's forward runs each row's last sampled token and the environment's
    answer (3 tokens), not the whole conversation; its samples and log-probs are those of a
    prefill of everything, under the same seed."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompts = [[40, 41, 42, 43, 44, 45, 46, 47]] * 2 + [[50, 51, 52, 53]] * 2
    sampling = Sampling(max_new_tokens=4, logprobs=True)
    torch.manual_seed(0)
    reused, widths = play_turns(model, prompts, sampling, PrefixCache(1 << 30), None, turns=2)
    prefill = [w for w in widths if w[1] > 1]
    assert prefill[0] == (2, 8)  # two distinct prompts, each once
    assert prefill[1] == (4, 3)  # the last sampled token and the answer's two
    torch.manual_seed(0)
    alone, widths = play_turns(model, prompts, sampling, None, None, turns=2)
    assert [w for w in widths if w[1] > 1][1][1] > 8  # without the cache: all of it again
    for got, want in zip(reused[1], alone[1]):
        assert got[1] == want[1]
        torch.testing.assert_close(torch.tensor(got[2]), torch.tensor(want[2]), atol=1e-5,
                                   rtol=0)


def test_right_drafts_come_out_of_one_forward(tiny_model_dir):
    """Greedy decoding with its own continuation as the draft: one forward checks all of it,
    and the tokens are plain greedy decoding's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompt = [40, 41, 42, 43]
    greedy = Sampling(max_new_tokens=6, greedy=True, logprobs=True)
    plain, widths = play_turns(model, [prompt], greedy, None, None, turns=1, eos=(-1,))
    tokens = plain[0][0][1]
    assert len(widths) == 6
    drafts = NgramDrafts(8, n=2)
    drafts.add(prompt[-2:] + tokens)
    drafted, widths = play_turns(model, [prompt], greedy, None, drafts, turns=1, eos=(-1,))
    assert drafted[0][0][1] == tokens
    # The prompt; then the first token with the 4 drafts the budget leaves room for, whose
    # forward also gives the sixth token.
    assert widths == [(1, 4), (1, 5)]


def likeliest_pair(model, prompt: list[int]) -> tuple[float, int, int, float, float]:
    """(temperature, a, b, p(a), p(a b)): the likeliest first token a and second b, at the
    first temperature that makes both "a then b" and "a then another" common."""
    with torch.no_grad():
        first_logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        a = int(first_logits.argmax())
        second_logits = model(input_ids=torch.tensor([prompt + [a]])).logits[0, -1]
        b = int(second_logits.argmax())
    for temperature in (0.3, 0.1, 0.05, 0.03, 0.02, 0.015, 0.01):
        p_first = float(torch.softmax(first_logits / temperature, dim=-1)[a])
        p_pair = p_first * float(torch.softmax(second_logits / temperature, dim=-1)[b])
        if 0.1 < p_pair < 0.9 and p_first - p_pair > 0.05:
            return temperature, a, b, p_first, p_pair
    raise AssertionError("no temperature makes both outcomes common")


def test_drafted_decoding_samples_the_models_distribution(tiny_model_dir):
    """Two tokens sampled 6,000 times with a draft of the likeliest pair: the pair's frequency,
    and that of its first token followed by another, are the model's probabilities."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompt = [40, 41, 42, 43]
    temperature, a, b, p_first, p_pair = likeliest_pair(model, prompt)
    drafts = NgramDrafts(1, n=1)
    drafts.add([a, b, a])  # after a, guess b
    calls, per_call = 12, 500  # calls small enough for the CPU to check drafts
    rows = calls * per_call
    widths: list[tuple[int, int]] = []
    model.get_input_embeddings().register_forward_hook(
        lambda _m, args, _out: widths.append(tuple(args[0].shape)))
    torch.manual_seed(0)
    tokens = []
    with torch.no_grad():
        for _ in range(calls):
            tokens += hf_sample(model, [prompt] * per_call,
                                Sampling(max_new_tokens=3, temperature=temperature), [-1], 0,
                                CPU, drafts=drafts)[0]
    assert widths[:3] == [(1, 4), (per_call, 2), (per_call, 1)]  # the draft checked
    pair = sum(t[:2] == [a, b] for t in tokens) / rows
    other = sum(t[0] == a and t[1] != b for t in tokens) / rows
    for seen, want in ((pair, p_pair), (other, p_first - p_pair)):
        assert abs(seen - want) < 4 * (want * (1 - want) / rows) ** 0.5, (seen, want)


def test_draw_samples_the_softmax_and_never_a_zero_probability_token():
    torch.manual_seed(0)
    probs = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])
    scores = torch.log(probs).expand(60000, -1)
    counts = torch.bincount(draw(scores, greedy=False), minlength=6).float() / 60000
    assert counts[[0, 2, 5]].sum() == 0
    torch.testing.assert_close(counts, probs, atol=0.01, rtol=0)
    assert draw(scores[:2], greedy=True).tolist() == [1, 1]


def entry(ids: list[int], width: int = 2) -> Entry:
    keys = [torch.zeros(1, len(ids), width)]
    return Entry(ids, keys, [k.clone() for k in keys])


def test_prefix_cache_finds_the_longest_held_prefix_and_drops_extended_rows():
    cache = PrefixCache(1 << 20)
    short, long = entry([1, 2]), entry([1, 2, 3, 4])
    cache.replace([], [short, long, entry([9, 9, 9])])
    assert cache.match([1, 2, 3, 4, 5]) is long
    assert cache.match([1, 2, 3, 4]) is short  # one token must still run
    assert cache.match([1, 2, 7]) is short
    assert cache.match([2, 2, 3]) is None and cache.match([1]) is None
    cache.replace([long], [entry([1, 2, 3, 4, 5, 6])])
    assert len(cache) == 3 and cache.match([1, 2, 3, 4, 5]) is short
    cache.clear()
    assert len(cache) == 0 and cache.nbytes == 0


def test_prefix_cache_drops_the_oldest_rows_past_its_bytes():
    rows = [entry([i, i + 1, i + 2]) for i in range(5)]
    cache = PrefixCache(3 * rows[0].nbytes)
    cache.replace([], rows)
    assert len(cache) == 3 and cache.nbytes == 3 * rows[0].nbytes
    assert cache.match([0, 1, 2, 3]) is None and cache.match([4, 5, 6, 7]) is rows[4]
    assert len(PrefixCache(0).__class__(0).entries) == 0


def test_a_policy_forgets_its_keys_when_its_weights_may_change(tiny_model_dir):
    """The policy keeps the rows it ran between `generate` calls, only while asked to, and
    drops them before anything else runs (a training step, an inference pass)."""
    from align.config import DistributedConfig, ModelConfig, TrainerConfig
    from align.policy import Policy

    policy = Policy(ModelConfig(name_or_path=tiny_model_dir("llama")), TrainerConfig(),
                    DistributedConfig(), total_steps=1, trainable=False)
    sampling = Sampling(max_new_tokens=3, seed=0)
    policy.generate([[40, 41, 42]] * 2, sampling, prefix_cache_bytes=1 << 20)
    assert len(policy.prefix_cache) == 2
    policy.infer(lambda module, batch: 0, [])
    assert len(policy.prefix_cache) == 0
    policy.generate([[40, 41, 42]], sampling, prefix_cache_bytes=1 << 20)
    policy.generate([[40, 41, 42]], sampling)  # not asked: nothing kept
    assert len(policy.prefix_cache) == 0


def test_drafts_on_the_cpu_stop_where_a_step_is_bound_by_its_arithmetic(tiny_model_dir):
    """A step of `rows` rows checks drafts only while its work, 2 x parameters x rows x
    (1 + drafts) flops, stays under DECODE_FLOPS_PER_THREAD."""
    from align.rollout.hf_sampling import DECODE_FLOPS_PER_THREAD, draft_tokens_on_cpu

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama"))
    per_row = 2 * sum(p.numel() for p in model.parameters())
    assert draft_tokens_on_cpu(model, 1, 8) == 8
    rows = int(DECODE_FLOPS_PER_THREAD // (per_row * 4))  # room for 1 + 3 tokens a row
    assert draft_tokens_on_cpu(model, rows, 8) == 3
    assert draft_tokens_on_cpu(model, 10 * rows, 8) == 0


def test_drafts_change_how_many_forwards_not_which_tokens(tiny_model_dir):
    """Under one seed, decoding with drafts (a table guessing right, or wrong) samples the
    tokens plain decoding samples: each token's uniform number is drawn for its place in the
    row, not for the forward that computes it (a resumed run starts with an empty table)."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("llama")).eval()
    prompts = [[40, 41, 42, 43], [50, 51], [40, 41, 42, 43]]
    sampling = Sampling(max_new_tokens=8, temperature=0.05, logprobs=True)
    torch.manual_seed(0)
    plain, plain_widths = play_turns(model, prompts, sampling, None, None, turns=1, eos=(-1,))
    table = NgramDrafts(6, n=1)
    for _, tokens, _ in plain[0]:
        table.add(tokens)
    forwards = []
    for drafts in (table, NgramDrafts(6, n=1)):
        drafts.add([40, 41, 42, 43, 99, 98, 97])  # and some wrong guesses
        torch.manual_seed(0)
        drafted, widths = play_turns(model, prompts, sampling, None, drafts, turns=1,
                                     eos=(-1,))
        assert [t for _, t, _ in drafted[0]] == [t for _, t, _ in plain[0]]
        forwards.append(len(widths))
    assert forwards[0] < len(plain_widths)  # the right guesses saved forwards
