"""Hard negatives from a policy's own samples, for the reward model (`align rm`, `mining:`).

A reward model trained only on curated pairs is accurate on them and blind to the mistakes a
policy makes once optimised against it: PPO finds completions unlike any rejected example and
the learned reward rises while the true one falls. Mining adds pairs of exactly those
completions:

1. sample `samples_per_prompt` completions from `mining.policy` (any model folder, e.g. the SFT
   checkpoint PPO starts from, or a list of them: a policy already optimised against an
   earlier reward model shows the mistakes that one rewarded) for `num_prompts` training
   prompts (`align.policy_sampling`'s generation, `hf` or `vllm`);
2. label every sample with `mining.reward` (any reward spec; a verifier such as exact match);
3. for each prompt whose samples got different scores, pair its most frequent best-scored
   completion (chosen) with up to `pairs_per_prompt` distinct lower-scored ones (rejected),
   the most frequent first: the errors the policy makes most.

Every sample counts, those that ran into the token budget without ending too (a policy's
run-on answers are among what a reward model must learn to rank low; a pair's completions are
encoded as training pairs are, with EOS; `mining/ended` gives the share that ended); empty ones,
which no pair can hold, are not. The pairs join the training pairs, `mining.repeat` times each
(a few thousand mined pairs beside tens of thousands of curated ones are otherwise seen about
twice in a run); `mined_pairs.jsonl` in the run folder holds them, and the summary gives
`mining/*` counts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from align.config import MiningSettings
from align.data import tokenize_prompts
from align.data.conversations import is_messages
from align.data.prompts import reward_columns
from align.data.text import eos_token_id
from align.errors import DataError


@dataclass
class MinedPairs:
    rows: list[dict[str, Any]]  # {prompt, chosen, rejected}
    stats: dict[str, float]


def build_pairs(prompts: list[Any], groups: list[list[tuple[str, float]]],
                pairs_per_prompt: int) -> list[dict[str, Any]]:
    """Pairs from each prompt's scored samples (completion text, score): the most frequent
    top-scored text against the most frequent lower-scored distinct texts."""
    rows = []
    for prompt, samples in zip(prompts, groups):
        if not samples:
            continue
        best = max(score for _, score in samples)
        top = Counter(text for text, score in samples if score == best)
        worse = Counter(text for text, score in samples if score < best)
        if not worse:
            continue
        chosen = top.most_common(1)[0][0]
        for rejected, _ in worse.most_common(pairs_per_prompt):
            rows.append(as_pair(prompt, chosen, rejected))
    return rows


def as_pair(prompt: Any, chosen: str, rejected: str) -> dict[str, Any]:
    """A preference row; message-list prompts get assistant-message completions."""
    if is_messages(prompt):
        return {"prompt": prompt, "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def mine(settings: MiningSettings, rows: list[dict], source: str, max_length: int,
         seed: int) -> MinedPairs:
    """Sample, label and pair (see the module docstring).

    Raises:
        DataError: the prompt rows are empty or malformed (the message names the row).
        ConfigError, ModelError, RewardError: a bad policy folder or reward spec.
    """
    from align.config import ModelConfig
    from align.model_loading import load_tokenizer
    from align.policy_sampling import EvalSettings, generate
    from reward_models import CombinedReward

    rows = rows[:settings.num_prompts or None]
    if not rows:
        raise DataError("mining has no prompts to sample", source=source)
    policies = [settings.policy] if isinstance(settings.policy, str) else list(settings.policy)
    k = settings.samples_per_prompt
    texts_by_policy, ended_by_policy = [], []
    for number, policy in enumerate(policies):  # each decoded with its own tokenizer
        tokenizer = load_tokenizer(ModelConfig(name_or_path=policy, tokenizer=policy))
        examples = tokenize_prompts(rows, tokenizer, max_length, source)
        sampling = EvalSettings(max_new_tokens=settings.max_new_tokens, greedy=False,
                                temperature=settings.temperature, seed=seed + 7919 * number,
                                batch_size=settings.batch_size, max_length=max_length,
                                engine=settings.engine)
        ids = generate(policy, [e.ids for e in examples for _ in range(k)], tokenizer, sampling)
        eos = eos_token_id(tokenizer)
        ended_by_policy.append([bool(t) and (t[-1] == eos or len(t) < settings.max_new_tokens)
                                for t in ids])
        texts_by_policy.append([tokenizer.decode(t, skip_special_tokens=True) for t in ids])
    n = k * len(policies)  # samples per prompt, prompt-major: every policy's k in turn

    def prompt_major(per_policy: list[list[Any]]) -> list[Any]:
        return [x for p in range(len(rows)) for out in per_policy for x in out[p * k:(p + 1) * k]]

    texts, ended = prompt_major(texts_by_policy), prompt_major(ended_by_policy)
    columns = reward_columns(examples, n)
    scorer = CombinedReward.from_specs([settings.reward])
    try:
        scores = scorer.score([e.text for e in examples for _ in range(n)], texts,
                              update=False, **columns).total
    finally:
        scorer.close()
    groups = [[(texts[i], scores[i]) for i in range(p * n, (p + 1) * n) if texts[i]]
              for p in range(len(examples))]
    pairs = build_pairs([r["prompt"] for r in rows], groups, settings.pairs_per_prompt)
    best = [max(s for _, s in g) for g in groups if g]
    stats = {"mining/prompts": float(len(examples)), "mining/samples": float(len(texts)),
             "mining/ended": sum(ended) / max(1, len(ended)),
             "mining/mean_score": sum(scores) / max(1, len(scores)),
             "mining/prompts_with_pairs": float(sum(len({s for _, s in g}) > 1
                                                    for g in groups)),
             "mining/pairs": float(len(pairs)),
             "mining/best_score_mean": sum(best) / max(1, len(best))}
    return MinedPairs(pairs, stats)
