"""Key/value caches of the `hf` engine's decoding loop (align.rollout.hf_decode).

`GrowingCache` holds a call's keys and values in buffers sized for the whole call: a decoding
step writes its column in place and attends to a view. Transformers' `DynamicCache` instead
concatenates the whole cache at every step, which was 42% of a decoding step's time for 16 rows
of 380 tokens on the CPU (docs/decisions.md).

`PrefixCache` keeps, between calls, the keys and values of every row a call ran: the prompt and
the sampled tokens that went through the model (all but the last). An episode's next turn is
its previous turn's input, the tokens sampled and the environment's answer, so the next call
finds that row as a prefix of its input and runs only the new tokens through the model. Keys and
values hold for the weights that computed them: the owner clears the cache whenever its weights
change (align.policy.Policy).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

_HASH_BASE, _HASH_MASK = 1_000_003, (1 << 61) - 1


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys and values live in buffers of `capacity` positions.

    Args:
        capacity: positions the buffers hold at first (the call's prompt width plus its new
            tokens); they grow when a write passes it.
        keys: optional (B, heads, width, head_dim) keys already computed (a reused prefix),
            with `values` alike; the buffers start with them.
    """

    def __init__(self, capacity: int, keys: torch.Tensor | None = None,
                 values: torch.Tensor | None = None) -> None:
        super().__init__()
        self.capacity, self.length = capacity, 0
        if keys is not None:
            self._allocate(keys)
            self.length = keys.shape[-2]
            self._keys[..., :self.length, :] = keys
            self._values[..., :self.length, :] = values
            self._views()

    def _allocate(self, like: torch.Tensor) -> None:
        shape = (*like.shape[:-2], self.capacity, like.shape[-1])
        self._keys = like.new_zeros(shape)
        self._values = like.new_zeros(shape)
        self.dtype, self.device, self.is_initialized = like.dtype, like.device, True

    def _grow(self, capacity: int) -> None:
        keys, values = self._keys, self._values
        self.capacity = capacity
        self._allocate(keys)
        self._keys[..., :self.length, :] = keys[..., :self.length, :]
        self._values[..., :self.length, :] = values[..., :self.length, :]

    def _views(self) -> None:
        self.keys = self._keys[..., :self.length, :]
        self.values = self._values[..., :self.length, :]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self._allocate(key_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:  # drafted tokens that were not kept take columns too
            self._grow(max(end, 2 * self.capacity))
        self._keys[..., self.length:end, :] = key_states
        self._values[..., self.length:end, :] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def select_rows(self, index: torch.Tensor) -> None:
        """Keep (and repeat) the rows `index` names, in that order."""
        if self.is_initialized:
            self._keys = self._keys.index_select(0, index)
            self._values = self._values.index_select(0, index)
            self._views()


class GrowingCache(DynamicCache):
    """A cache of `GrowingLayer`s: `layers` (a reused prefix's), or made on first use, one per
    model layer, each holding `capacity` positions."""

    def __init__(self, layers: list[GrowingLayer], capacity: int) -> None:
        if layers:
            Cache.__init__(self, layers=layers)
        else:
            Cache.__init__(self, layer_class_to_replicate=functools.partial(GrowingLayer,
                                                                            capacity))

    def select_rows(self, index: torch.Tensor) -> None:
        for layer in self.layers:
            layer.select_rows(index)


def supports_growing_cache(config: object) -> bool:
    """Whether every layer of the model keeps a plain, full-length key/value cache (no sliding
    window, no recurrent state): the layers `GrowingLayer` replaces."""
    layers = DynamicCache(config=config).layers
    return all(type(layer) is DynamicLayer for layer in layers)


@dataclass
class Entry:
    """The keys and values of one row: `ids` went through the model, in this order.

    Attributes:
        ids: the tokens whose keys and values are held.
        keys: per layer, (heads, len(ids), head_dim); `values` alike.
    """

    ids: list[int]
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (*self.keys, *self.values))


class PrefixCache:
    """Rows of earlier calls, found again as prefixes of later inputs.

    An input reuses the longest held row whose ids all begin it (an episode's previous turn);
    rows are looked up by a hash of each prefix length held, then compared exactly. A row that
    a call extended is dropped afterwards (the longer row replaces it); the oldest rows go
    first when the held bytes pass `max_bytes`.

    Args:
        max_bytes: the most bytes of keys and values held; 0 holds nothing.
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.entries: dict[tuple[int, int], Entry] = {}  # (length, hash of ids) -> row
        self.nbytes = 0

    def clear(self) -> None:
        self.entries.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self.entries)

    def match(self, prompt: list[int]) -> Entry | None:
        """The longest held row that is a prefix of `prompt` and shorter than it (at least one
        token of the prompt must still run, for the next token's logits); None if none."""
        if not self.entries:
            return None
        lengths = {length for length, _ in self.entries}
        found, value = None, 0
        for n, token in enumerate(prompt[:-1], start=1):
            value = (value * _HASH_BASE + token + 1) & _HASH_MASK
            if n in lengths:
                entry = self.entries.get((n, value))
                if entry is not None and entry.ids == prompt[:n]:
                    found = entry
        return found

    def replace(self, used: list[Entry], new: list[Entry]) -> None:
        """Drop the rows `used` (extended by this call) and hold the rows `new`, the oldest
        rows going first past `max_bytes`."""
        for entry in used:
            if self.entries.pop(_key(entry.ids), None) is not None:
                self.nbytes -= entry.nbytes
        for entry in new:
            key = _key(entry.ids)
            if key in self.entries:
                continue  # the same row sampled twice alike (greedy): held once
            self.entries[key] = entry
            self.nbytes += entry.nbytes
        while self.entries and self.nbytes > self.max_bytes:
            self.nbytes -= self.entries.pop(next(iter(self.entries))).nbytes


def _key(ids: list[int]) -> tuple[int, int]:
    value = 0
    for token in ids:
        value = (value * _HASH_BASE + token + 1) & _HASH_MASK
    return len(ids), value
