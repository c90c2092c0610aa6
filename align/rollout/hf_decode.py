"""The `hf` engine's decoding loop: prompts prefilled past what earlier calls computed, then one
token per row and step, with the sampled tokens' log-probs.

Transformers' `generate` is general (stopping criteria, streamers, beam search, every logits
processor); this loop does what a rollout needs and nothing else, for models whose layers keep a
plain key/value cache (`supports_growing_cache`; others sample through `generate`,
align.rollout.hf_sampling):

- Each distinct prompt runs once (a GRPO group's samples share one prompt's keys and values), and
  only from where the longest row of an earlier call that begins it ends (`PrefixCache`): an
  episode's next turn runs the model's last token and the environment's answer, not the whole
  conversation again.
- Keys and values grow in buffers sized for the call (`GrowingCache`), not by concatenation.
- A token is drawn by inverting the cumulative distribution at one uniform number per token,
  drawn for every row's k-th token when the call starts: exactly the categorical distribution
  of the processed logits, whose log-probs are returned, and the same tokens whatever the
  drafts (below). `torch.multinomial` draws the same distribution from one exponential per
  vocabulary entry, 25x slower on the CPU for 16 rows of 516 ids (0.43 ms against 0.017 ms).

Left-padded rows: a row's reused keys end where the call's reused part ends, its new tokens end
where the prompts end; the gaps are masked, and positions count the row's own tokens. The sampled
log-probs are those of the processed distribution (temperature, then top-p), as `generate`'s.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

import torch
import torch.distributed as dist
from transformers import LogitsProcessor

from align.packed_forward import unwrap
from align.rollout.base import Sampling
from align.rollout.drafts import NgramDrafts
from align.rollout.kv_cache import Entry, GrowingCache, GrowingLayer, PrefixCache


def decode(model: torch.nn.Module, prompts: list[list[int]], sampling: Sampling,
           processors: list[LogitsProcessor], eos_ids: list[int], pad_id: int,
           device: torch.device, prefill_threads: int | None, decode_threads: int | None,
           synced: bool = False, prefix: PrefixCache | None = None,
           drafts: NgramDrafts | None = None, draft_tokens: int = 0,
           ) -> tuple[list[list[int]], list[list[float]] | None]:
    """Complete every prompt (non-empty token lists); (tokens cut after the first EOS,
    log-probs or None). With `prefix`, prompts start from the rows it holds and the rows run
    here are held for the next call; with `drafts`, each forward also checks up to
    `draft_tokens` drafted tokens per row.

    Args:
        processors: the sampling warpers (temperature, top-p); empty when greedy.
        prefill_threads, decode_threads: CPU threads of the prefill and of decoding steps
            (None: torch's current count).
        synced: every rank of the process group keeps stepping until all ranks' rows have
            ended (ZeRO-3 gathers each layer's weights collectively in every forward).
    """
    forward = functools.partial(model, use_cache=True)
    keep = unwrap(model)._supports_logits_to_keep()
    distinct: dict[tuple[int, ...], int] = {}
    select = [distinct.setdefault(tuple(p), len(distinct)) for p in prompts]
    heads = [list(p) for p in distinct]
    reused = [prefix.match(p) if prefix is not None else None for p in heads]
    if drafts is not None:  # the prompts' new text: tool schemas, answers to copy
        for head, entry in zip(heads, reused):
            drafts.add(head[max(0, (len(entry.ids) if entry else 0) - drafts.n):])
    cache, mask, ids, positions = _prefill_inputs(heads, reused, pad_id, device,
                                                  sampling.max_new_tokens)
    width = cache.get_seq_length() + ids.shape[1]  # columns of the cache filled
    with cpu_threads(prefill_threads):
        logits = _last_logits(forward(input_ids=ids, attention_mask=mask[:, :width],
                                      position_ids=positions, past_key_values=cache,
                                      **({"logits_to_keep": 1} if keep else {})), 1)
    if len(heads) < len(prompts):  # repeats of a prompt share its keys, values and logits
        index = torch.tensor(select, device=device)
        cache.select_rows(index)
        logits, mask = logits[index], mask[index]
    rows = _Rows(prompts, set(eos_ids), sampling.max_new_tokens)
    # The uniform number of each row's k-th token, drawn up front: the samples are the same
    # whatever the drafts (and the drafts' table, which a resumed run starts without).
    uniforms = (None if sampling.greedy else
                torch.rand(len(prompts), max(1, sampling.max_new_tokens), device=device))
    fed: list[list[int]] = [[] for _ in prompts]
    with cpu_threads(decode_threads):
        while True:
            kept = rows.take(*_sample(logits, processors, sampling,
                                      rows.uniforms(uniforms, logits.shape[1])), fed)
            if any(fed):  # the drafted columns after the last kept one never count
                for row, count in kept.items():
                    mask[row, width - logits.shape[1] + count:width] = 0
            if _all_ended(rows.done, synced, device):
                break
            fed = [[] if done else drafts.draft(rows.tail(row), min(
                draft_tokens, rows.room(row) - 1)) if drafts is not None else []
                for row, done in enumerate(rows.done)]
            block, block_mask, block_positions = rows.block(fed, pad_id, device)
            mask = _fit(mask, width + block.shape[1])
            mask[:, width:width + block.shape[1]] = block_mask
            width += block.shape[1]
            logits = _last_logits(forward(
                input_ids=block, attention_mask=mask[:, :width], position_ids=block_positions,
                past_key_values=cache, **({"logits_to_keep": block.shape[1]} if keep else {})),
                block.shape[1])
    if prefix is not None:
        prefix.replace([e for e in reused if e is not None],
                       _entries(cache, mask[:, :width], prompts, rows.tokens))
    if drafts is not None:
        for prompt, tokens in zip(prompts, rows.tokens):
            drafts.add(prompt[-drafts.n:] + tokens)
    return rows.tokens, rows.logprobs if sampling.logprobs else None


class _Rows:
    """What each row of a call has sampled, and when it ended (EOS or `max_new` tokens)."""

    def __init__(self, prompts: list[list[int]], eos: set[int], max_new: int) -> None:
        self.prompts, self.eos, self.max_new = prompts, eos, max_new
        self.tokens: list[list[int]] = [[] for _ in prompts]
        self.logprobs: list[list[float]] = [[] for _ in prompts]
        self.done = [max_new <= 0] * len(prompts)

    def take(self, tokens: list[list[int]], logprobs: list[list[float]] | None,
             fed: list[list[int]]) -> dict[int, int]:
        """Keep each running row's samples of one forward's positions: the first, then the
        next while the previous equalled the drafted token fed after it. Returns the count kept
        per row that ran (its fed columns that stay: its last token and the drafts kept)."""
        kept = {}
        for row, done in enumerate(self.done):
            if done:
                continue
            draft, count = fed[row], 0
            for j, token in enumerate(tokens[row]):
                self.tokens[row].append(token)
                if logprobs is not None:
                    self.logprobs[row].append(logprobs[row][j])
                count += 1
                if token in self.eos or len(self.tokens[row]) >= self.max_new:
                    self.done[row] = True
                    break
                if j >= len(draft) or token != draft[j]:
                    break
            kept[row] = count
        return kept

    def uniforms(self, drawn: torch.Tensor | None, width: int) -> torch.Tensor | None:
        """(B x width, 1) numbers of the tokens a forward's `width` positions would be."""
        if drawn is None:
            return None
        start = torch.tensor([len(t) for t in self.tokens], device=drawn.device)
        index = (start[:, None] + torch.arange(width, device=drawn.device)).clamp_(
            max=drawn.shape[1] - 1)
        return drawn.gather(1, index).reshape(-1, 1)

    def room(self, row: int) -> int:
        return self.max_new - len(self.tokens[row])

    def tail(self, row: int) -> list[int]:
        return self.prompts[row][-8:] + self.tokens[row][-8:]

    def block(self, fed: list[list[int]], pad_id: int, device: torch.device
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(ids, mask, positions) of the next forward: each running row's last token and its
        draft, padded after; an ended row's columns are masked."""
        width = 1 + max(len(d) for d in fed)
        ids = [[pad_id] * width for _ in fed]
        mask = [[0] * width for _ in fed]
        positions = [[0] * width for _ in fed]
        for row, draft in enumerate(fed):
            if self.done[row]:
                continue
            at = len(self.prompts[row]) + len(self.tokens[row]) - 1  # the last token's place
            ids[row][:1 + len(draft)] = [self.tokens[row][-1], *draft]
            mask[row][:1 + len(draft)] = [1] * (1 + len(draft))
            positions[row] = list(range(at, at + width))
        return (torch.tensor(ids, device=device), torch.tensor(mask, device=device),
                torch.tensor(positions, device=device))


def _sample(logits: torch.Tensor, processors: list[LogitsProcessor], sampling: Sampling,
            uniform: torch.Tensor | None) -> tuple[list[list[int]], list[list[float]] | None]:
    """A token drawn at every position of (B, m, V) `logits` (at `uniform`, (B x m, 1)), and
    its log-prob if asked."""
    rows, width, vocab = logits.shape
    scores = logits.reshape(rows * width, vocab)
    for processor in processors:
        scores = processor(None, scores)
    token = draw(scores, sampling.greedy, uniform)
    logprobs = None
    if sampling.logprobs:
        logprobs = torch.log_softmax(scores, dim=-1).gather(1, token[:, None]).view(
            rows, width).tolist()
    return token.view(rows, width).tolist(), logprobs


def _last_logits(out: object, count: int) -> torch.Tensor:
    return out.logits[:, -count:].float()


def _fit(mask: torch.Tensor, width: int) -> torch.Tensor:
    """`mask` with at least `width` columns (grown by doubling, zeros)."""
    if mask.shape[1] >= width:
        return mask
    grown = mask.new_zeros(mask.shape[0], max(width, 2 * mask.shape[1]))
    grown[:, :mask.shape[1]] = mask
    return grown


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """torch's intra-op threads set to `threads` for the block (None: unchanged)."""
    saved = torch.get_num_threads()
    if threads is not None and threads != saved:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if torch.get_num_threads() != saved:
            torch.set_num_threads(saved)


def draw(scores: torch.Tensor, greedy: bool, uniform: torch.Tensor | None = None
         ) -> torch.Tensor:
    """One token per row of (B, V) processed `scores`: the argmax, or a sample of their softmax
    by inverse transform (the first id whose cumulative probability passes a uniform number,
    (B, 1) `uniform` or drawn here, scaled to the row's total)."""
    if greedy:
        return torch.argmax(scores, dim=-1)
    cumulative = torch.softmax(scores, dim=-1).cumsum(dim=-1)
    if uniform is None:
        uniform = torch.rand(len(scores), 1, device=scores.device)
    token = torch.searchsorted(cumulative, uniform * cumulative[:, -1:], right=True)
    return token.squeeze(1).clamp_(max=scores.shape[1] - 1)


def _all_ended(done: list[bool], synced: bool, device: torch.device) -> bool:
    """Whether every row has ended; with `synced`, every row of every rank."""
    if not synced:
        return all(done)
    running = torch.tensor(0.0 if all(done) else 1.0, device=device)
    dist.all_reduce(running)
    return running.item() == 0.0


def _prefill_inputs(heads: list[list[int]], reused: list[Entry | None], pad_id: int,
                    device: torch.device, new_tokens: int
                    ) -> tuple[GrowingCache, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(cache, mask, ids, positions) for the prefill of the distinct prompts `heads`: each
    row's reused keys right-aligned in the cache's first columns, its remaining tokens
    left-padded after them. The mask has room for `new_tokens` more columns."""
    starts = [0 if e is None else len(e.ids) for e in reused]
    rest = [p[s:] for p, s in zip(heads, starts)]
    past, width = max(starts), max(len(r) for r in rest)
    capacity = past + width + new_tokens
    mask = torch.zeros(len(heads), capacity, dtype=torch.long)
    ids = torch.full((len(heads), width), pad_id, dtype=torch.long)
    positions = torch.zeros(len(heads), width, dtype=torch.long)
    for row, (start, tail) in enumerate(zip(starts, rest)):
        mask[row, past - start:past] = 1
        mask[row, past + width - len(tail):past + width] = 1
        ids[row, width - len(tail):] = torch.tensor(tail)
        positions[row, width - len(tail):] = torch.arange(start, start + len(tail))
    layers = []
    if past:
        known = next(e for e in reused if e is not None)
        for layer, like in enumerate(known.keys):
            keys = like.new_zeros(len(heads), like.shape[0], past, like.shape[-1])
            values = torch.zeros_like(keys)
            for row, entry in enumerate(reused):
                if entry is not None:
                    keys[row, :, past - len(entry.ids):] = entry.keys[layer]
                    values[row, :, past - len(entry.ids):] = entry.values[layer]
            layers.append(GrowingLayer(capacity, keys, values))
    cache = GrowingCache(layers, capacity)
    return cache, mask.to(device), ids.to(device), positions.to(device)


def _entries(cache: GrowingCache, mask: torch.Tensor, prompts: list[list[int]],
             tokens: list[list[int]]) -> list[Entry]:
    """Each row's keys and values over the columns that ran (mask 1): its prompt and all its
    sampled tokens but the last."""
    entries = []
    for row, (prompt, sampled) in enumerate(zip(prompts, tokens)):
        columns = mask[row].nonzero().squeeze(1)
        ids = prompt + sampled[:-1]
        if len(columns) != len(ids):
            raise AssertionError(f"row {row}: {len(columns)} cached positions for {len(ids)} "
                                 "tokens that ran")
        entries.append(Entry(ids, [layer._keys[row].index_select(1, columns)
                                   for layer in cache.layers],
                             [layer._values[row].index_select(1, columns)
                              for layer in cache.layers]))
    return entries
