"""Sampling inside a policy worker (the `hf` engine), with the behaviour log-probs.

Models whose layers keep a plain key/value cache (most decoder-only models) sample in align's
own loop (align.rollout.hf_decode): each distinct prompt prefilled once and only past what an
earlier call computed (an episode's earlier turns), drafted tokens checked in one forward. Other
models (sliding-window or recurrent layers) sample through Hugging Face `generate`.

Either way the sampled distribution is exactly the asked-for temperature and top-p over the
model's logits, and nothing from the model folder's `generation_config.json` (a
`repetition_penalty`, `min_p`, `no_repeat_ngram_size`, a default top-k...) can reach the
sampler, because such settings would change the behaviour policy without changing the log-probs
the trainer computes.

Through `generate`, prompts are prefilled here, not in `generate` (`prefill_prompts`). A prompt
sampled several times (GRPO's group, RLOO's k samples) runs once: the KV cache and the
next-token logits of each distinct prompt are computed on one row and copied to the rows that
repeat it. The first token is drawn from those logits exactly as `generate` draws (the same
processors, then one `multinomial` over the whole batch), and `generate` goes on from the prompt
and that token, so it runs only decoding steps, on as many CPU threads as their size pays for
(`decoding_threads`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from transformers import (
    DynamicCache,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    TemperatureLogitsWarper,
    TopPLogitsWarper,
)

from align.packed_forward import unwrap
from align.rollout.base import Sampling, cut_at_eos
from align.rollout.drafts import NgramDrafts
from align.rollout.hf_decode import cpu_threads, decode
from align.rollout.kv_cache import PrefixCache, supports_growing_cache


class SampledLogprobs(LogitsProcessor):
    """Last in the processor list: records the log-prob of each sampled token under the final
    (temperature-scaled, nucleus-truncated) distribution. It keeps one step's log-softmax at a
    time and reads the sampled token from the next step's input ids (memory B x V, not
    B x V x steps as `output_scores` would)."""

    def __init__(self) -> None:
        self.pending: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.Tensor:
        self._take(input_ids[:, -1])
        self.pending = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def _take(self, tokens: torch.Tensor) -> None:
        if self.pending is not None:
            self.steps.append(self.pending.gather(1, tokens[:, None]).squeeze(1))
            self.pending = None

    def finish(self, last_tokens: torch.Tensor) -> torch.Tensor:
        """(B, steps) log-probs, given the tokens sampled at the last step."""
        self._take(last_tokens)
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros(len(last_tokens), 0)


@contextlib.contextmanager
def neutral_generation_config(model: torch.nn.Module, eos_ids: list[int],
                              pad_id: int) -> Iterator[None]:
    """Swap the model's generation config for one that sets nothing but EOS and pad.

    `generate` fills every unset field of the config it is given from `model.generation_config`,
    so passing a clean config is not enough: the model's own must be neutral during the call.
    """
    target = model
    while not hasattr(target, "generation_config") and hasattr(target, "module"):
        target = target.module  # DeepSpeed engine
    saved = target.generation_config
    target.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=pad_id)
    try:
        yield
    finally:
        target.generation_config = saved


def hf_sample(model: torch.nn.Module, prompts: list[list[int]], sampling: Sampling,
              eos_ids: list[int], pad_id: int, device: torch.device,
              synced: bool = False, prefix: PrefixCache | None = None,
              drafts: NgramDrafts | None = None,
              ) -> tuple[list[list[int]], list[list[float]] | None]:
    """Complete `prompts`; (tokens, logprobs or None). Models whose layers keep a plain
    key/value cache decode in align's own loop (align.rollout.hf_decode), starting from the
    rows `prefix` holds and checking `drafts`' guesses; others through `generate`.

    `synced`: every rank of the process group runs decoding steps until all ranks' rows have
    ended (ZeRO-3 gathers each layer's weights collectively in every forward, so a rank whose
    rows all stopped early must keep stepping, or the others wait for it forever).
    """
    warpers = sampling_warpers(sampling)
    if (sampling.max_new_tokens > 0 and all(prompts)
            and supports_growing_cache(unwrap(model).config)):
        cpu = device.type == "cpu"
        threads = decoding_threads(model, len(prompts)) if cpu else None
        guesses = 0 if drafts is None else (
            draft_tokens_on_cpu(model, len(prompts), drafts.k) if cpu else drafts.k)
        with neutral_generation_config(model, eos_ids, pad_id):
            return decode(model, prompts, sampling, warpers, eos_ids, pad_id, device,
                          None, threads, synced, prefix, drafts, guesses)
    return _generate(model, prompts, sampling, warpers, eos_ids, pad_id, device, synced)


def sampling_warpers(sampling: Sampling) -> list[LogitsProcessor]:
    """The processors between the logits and the sampled distribution: temperature, top-p
    (none when greedy). HF adds none of its own for temperature 1, top_p 1, top_k 0."""
    if sampling.greedy:
        return []
    warpers: list[LogitsProcessor] = []
    if sampling.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(sampling.temperature))
    if sampling.top_p < 1.0:
        warpers.append(TopPLogitsWarper(sampling.top_p))
    return warpers


def _generate(model: torch.nn.Module, prompts: list[list[int]], sampling: Sampling,
              warpers: list[LogitsProcessor], eos_ids: list[int], pad_id: int,
              device: torch.device, synced: bool
              ) -> tuple[list[list[int]], list[list[float]] | None]:
    """Complete left-padded `prompts` with `model.generate`, each distinct prompt prefilled
    once (`prefill_prompts`)."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts],
                        device=device)
    processors = LogitsProcessorList(warpers)  # our own warpers: the recorder sees their output
    recorder = SampledLogprobs() if sampling.logprobs else None
    if recorder is not None:
        processors.append(recorder)
    knobs = {} if sampling.greedy else {"temperature": 1.0, "top_p": 1.0, "top_k": 0}
    config = GenerationConfig(max_new_tokens=sampling.max_new_tokens,
                              do_sample=not sampling.greedy, repetition_penalty=1.0,
                              eos_token_id=eos_ids, pad_token_id=pad_id, **knobs)
    with neutral_generation_config(model, eos_ids, pad_id):
        prefilled = prefill_prompts(model, ids, mask) if config.max_new_tokens > 0 else None
        if prefilled is not None:
            cache, logits = prefilled
            first = _draw(processors(ids, logits), sampling.greedy)
            ids = torch.cat([ids, first[:, None]], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            config.max_new_tokens -= 1
        # With the prompts cached, `generate` runs only decoding steps: one token per row.
        threads = (decoding_threads(model, len(prompts))
                   if prefilled is not None and ids.device.type == "cpu" else None)
        if config.max_new_tokens > 0:
            with cpu_threads(threads):
                ids = model.generate(input_ids=ids, attention_mask=mask,
                                     generation_config=config, logits_processor=processors,
                                     synced_gpus=synced,
                                     **({} if prefilled is None else {"past_key_values": cache}))
    new = ids[:, width:]
    eos = set(eos_ids)
    tokens = [cut_at_eos(row, eos) for row in new.tolist()]
    if recorder is None:
        return tokens, None
    logprobs = recorder.finish(new[:, -1]).tolist() if new.shape[1] else [[] for _ in prompts]
    return tokens, [lp[: len(t)] for lp, t in zip(logprobs, tokens)]


# Work of one decoding step (2 x parameters x rows flops) below which one more CPU thread costs
# more than it saves: workers wait passively for OpenMP threads (align.distributed.group), so
# every parallel region wakes its threads. Measured on 2 cores (docs/performance.md): 0.08 and
# 0.56 GFLOP a step ran 22% faster on one thread, 2.2 even, 4.3 on two threads 18% faster.
DECODE_FLOPS_PER_THREAD = 1e9


def decoding_threads(model: torch.nn.Module, rows: int) -> int:
    """CPU threads for decoding steps over `rows` rows: one per `DECODE_FLOPS_PER_THREAD` of a
    step's matmul work, at least one and at most torch's current count."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return max(1, min(torch.get_num_threads(), int(2 * params * rows // DECODE_FLOPS_PER_THREAD)))


def draft_tokens_on_cpu(model: torch.nn.Module, rows: int, most: int) -> int:
    """Draft tokens per row that a decoding step on the CPU checks: at most `most`, and only
    while the step's matmul work (2 x parameters x rows x (1 + drafts) flops) stays below
    `DECODE_FLOPS_PER_THREAD`, where a step costs its overhead more than its arithmetic. A
    larger model's step is bound by its arithmetic: each drafted token not kept costs as much
    as a kept one, and a guess saves only where it is cheaper than a step."""
    params = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    return max(0, min(most, int(DECODE_FLOPS_PER_THREAD // (2 * params * rows)) - 1))


def _draw(scores: torch.Tensor, greedy: bool) -> torch.Tensor:
    """One token per row from processed scores, drawn as `generate`'s sampling loop draws."""
    if greedy:
        return torch.argmax(scores, dim=-1)
    return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)


def prefill_prompts(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor
                    ) -> tuple[DynamicCache, torch.Tensor] | None:
    """Every row's prompt KV cache and next-token logits (float32, (B, V)), each distinct prompt
    computed once; None when the prompts are empty or the model keeps another kind of cache
    than `DynamicCache` (`generate` then prefills them itself).

    Position ids are those `generate` gives left-padded rows (the attention mask's cumsum), so
    the cache and logits are those `generate` would compute for each row.

    Args:
        model: the causal LM (peft or plain).
        ids: (B, W) left-padded prompts, repeats in any order.
        mask: (B, W) their attention mask.
    """
    if ids.shape[1] == 0:
        return None
    distinct: dict[tuple[int, ...], int] = {}
    inverse = [distinct.setdefault(tuple(row), i) for i, row in enumerate(ids.tolist())]
    first = torch.tensor(sorted(set(inverse)), device=ids.device)
    slot = {row: n for n, row in enumerate(first.tolist())}
    select = torch.tensor([slot[i] for i in inverse], device=ids.device)
    hf = unwrap(model)
    head, tail = ids[first], mask[first]
    keep = {"logits_to_keep": 1} if hf._supports_logits_to_keep() else {}
    out = model(input_ids=head, attention_mask=tail,
                position_ids=(tail.cumsum(-1) - 1).masked_fill(tail == 0, 0),
                past_key_values=DynamicCache(config=hf.config), use_cache=True, **keep)
    cache = out.past_key_values
    if not isinstance(cache, DynamicCache):
        return None
    logits = out.logits[:, -1].float()
    if len(distinct) < len(inverse):  # copy each prompt's cache and logits to its repeats
        cache.batch_select_indices(select)
        logits = logits[select]
    return cache, logits
