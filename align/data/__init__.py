"""Datasets for every stage: read rows, validate and tokenize them, mask, pad or pack them.

`load_rows` reads any supported source; `tokenize_sft`, `tokenize_preference` and
`tokenize_unpaired` (KTO) turn rows in TRL's column conventions into token ids; the `collate_*`
functions build tensors.
"""

from align.data.batching import (
    collate_packed,
    collate_padded,
    collate_preference,
    collate_preference_packed,
    example_size,
    length_grouped_order,
)
from align.data.preference import PreferenceExample, extract_prompt, tokenize_preference
from align.data.prompts import PromptExample, tokenize_prompts
from align.data.sft import TokenizedExample, tokenize_sft
from align.data.sources import load_rows
from align.data.unpaired import (
    UnpairedExample,
    collate_unpaired,
    tokenize_unpaired,
    with_kl_completions,
)

__all__ = [
    "PreferenceExample",
    "PromptExample",
    "TokenizedExample",
    "UnpairedExample",
    "collate_packed",
    "collate_padded",
    "collate_preference",
    "collate_preference_packed",
    "collate_unpaired",
    "example_size",
    "extract_prompt",
    "length_grouped_order",
    "load_rows",
    "tokenize_preference",
    "tokenize_prompts",
    "tokenize_sft",
    "tokenize_unpaired",
    "with_kl_completions",
]
