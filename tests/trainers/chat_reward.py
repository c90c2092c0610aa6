"""A TRL-style reward for the chat-model tests: it scores token ids and insists on TRL's
conversational form (message-list prompts, `[{"role": "assistant", ...}]` completions)."""

from __future__ import annotations

from tests.chat_models import ASCII_IDS


def ascii_share(prompts: list, completions: list, completion_ids: list[list[int]],
                **columns) -> list[float]:
    """The share of a completion's tokens that are printable ASCII characters."""
    for prompt, completion in zip(prompts, completions):
        if not (isinstance(prompt, list) and isinstance(completion, list)
                and completion[0]["role"] == "assistant"):
            raise TypeError(f"not TRL's conversational form: {prompt!r}, {completion!r}")
    return [sum(i < ASCII_IDS for i in ids) / max(len(ids), 1) for ids in completion_ids]
