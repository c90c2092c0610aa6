"""Chat-template pieces of an episode: the prompt, the environment's turns, and the drift check.

Only environment turns are tokenised here; the model's turns are the engine's tokens, never
re-encoded. An environment turn's tokens are what the template adds after an assistant turn
that ended with EOS: render a short fixed conversation `[user, assistant, *new messages]` with
the generation prompt, find the EOS that closes the assistant turn, and tokenise what follows
it (template tokens between turns included). Its tokens therefore follow the model's EOS as the
template puts them, whatever the template does to earlier turns.

The drift check renders the finished conversation as a user would
(`apply_chat_template(messages, tools=...)`) and compares it with the stream trained on: the
stream must be a prefix of the rendering (the rendering may close the last turn after it). A
template that rewrites history (one that drops earlier reasoning) shows up as drift. The model's
turns are compared as the text they decode to, encoded again: a sampled token sequence that is
not the canonical encoding of its own text (a lone byte of a multi-byte character, pieces a
tokenizer would have merged) is no fault of the template, and is counted apart
(`reencodes`): it is trained as sampled, which a pipeline that re-tokenises text would not do.
"""

from __future__ import annotations

import json
from typing import Any

from align.episodes.episode import MODEL, Drift, Episode

_MARKER = "probe-7c41e"  # the probe assistant turn's content, found again in the rendering
_PROBE = [{"role": "user", "content": "x"}, {"role": "assistant", "content": _MARKER}]
DRIFT_CONTEXT = 8  # tokens shown on each side of a drift
RENDERINGS_KEPT = 4096  # prompts and environment turns remembered, then forgotten at once


class ChatRenderer:
    """Renders an episode's prompt and environment turns with the tokenizer's chat template.

    Args:
        tokenizer: the policy's tokenizer (its chat template).
        tools: JSON schemas passed as `tools=` (None or []: none).
        eos_ids: ids a model turn ends with.
    """

    def __init__(self, tokenizer: Any, tools: list[dict] | None, eos_ids: list[int]) -> None:
        self.tokenizer, self.tools, self.eos = tokenizer, tools or None, set(eos_ids)
        self.eos_texts = [tokenizer.decode([i]) for i in eos_ids]
        # Renderings of prompts and environment turns seen this round (`forget`): a group's
        # episodes share their prompt, and tools answer alike ("Recorded.") in many episodes.
        self.seen: dict[tuple[bool, str], list[int]] = {}

    def forget(self) -> None:
        """Render everything afresh from here on (a template may read the date)."""
        self.seen.clear()

    def _remembered(self, prompt: bool, messages: list[dict], render: Any) -> list[int]:
        key = (prompt, json.dumps(messages, sort_keys=True, default=str))
        ids = self.seen.get(key)
        if ids is None:
            if len(self.seen) >= RENDERINGS_KEPT:
                self.seen.clear()
            ids = self.seen[key] = render(messages)
        return list(ids)

    def _ids(self, messages: list[dict], add_generation_prompt: bool) -> list[int]:
        text = self.tokenizer.apply_chat_template(
            messages, tools=self.tools, tokenize=False,
            add_generation_prompt=add_generation_prompt)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        """The prompt as the model is asked: its messages, the tools, the generation prompt."""
        return self._remembered(True, messages, lambda m: self._ids(m, True))

    def env_turn_ids(self, messages: list[dict]) -> list[int]:
        """The tokens that follow a model turn's EOS for environment `messages` (tool results
        or observations), up to and including the next generation prompt."""
        return self._remembered(False, messages, self._env_turn_ids)

    def _env_turn_ids(self, messages: list[dict]) -> list[int]:
        probe = [_PROBE[0], {**_PROBE[1], **({"tool_calls": _dummy_calls(messages)}
                                             if _tool_names(messages) else {})}]
        text = self.tokenizer.apply_chat_template(
            probe + messages, tools=self.tools, tokenize=False, add_generation_prompt=True)
        after = text.index(_MARKER) + len(_MARKER)
        ends = [(text.find(eos, after), eos) for eos in self.eos_texts]
        ends = [(at, eos) for at, eos in ends if at >= 0]
        if not ends:
            raise ValueError("the chat template does not close an assistant turn with the "
                             f"EOS token ({', '.join(self.eos_texts)}) the model ends its turns "
                             "with; episodes need one that does")
        at, eos = min(ends)
        return self.tokenizer(text[at + len(eos):], add_special_tokens=False).input_ids

    def reencoded(self, ids: list[int]) -> list[int]:
        """A model turn's tokens as its text encodes: the body decoded and encoded again, the
        closing EOS kept."""
        ended = bool(ids) and ids[-1] in self.eos
        body = ids[:-1] if ended else ids
        text = self.tokenizer.decode(body)
        return self.tokenizer(text, add_special_tokens=False).input_ids + ids[len(body):]

    def check(self, episode: Episode) -> tuple[Drift | None, bool]:
        """(drift, reencodes) of `episode`: where the conversation as a user renders it
        departs from the trained stream (the model's turns taken as their text encodes), and
        whether some model turn's sampled tokens differ from the encoding of their text."""
        segments = [self.reencoded(s.ids) if s.kind == MODEL else s.ids
                    for s in episode.segments]
        reencodes = any(s.kind == MODEL and ids != s.ids
                        for s, ids in zip(episode.segments, segments))
        return self._drift(episode, segments), reencodes

    def _drift(self, episode: Episode, segments: list[list[int]]) -> Drift | None:
        rendered = self._ids(episode.messages, False)
        lengths = [len(ids) for ids in segments]
        stream = episode.prompt_ids + [t for ids in segments for t in ids]
        limit = min(len(stream), len(rendered))
        index = next((i for i in range(limit) if stream[i] != rendered[i]), None)
        if index is None:
            if len(stream) <= len(rendered):
                return None
            index = len(rendered)
        return Drift(index, _turn_at(episode, index, lengths),
                     stream[index: index + DRIFT_CONTEXT],
                     rendered[index: index + DRIFT_CONTEXT])


def _turn_at(episode: Episode, index: int, lengths: list[int]) -> int:
    """The model turn (1-based) whose tokens, or the environment turn after which, hold
    stream position `index` (segments of `lengths` tokens); 0 for the prompt."""
    at, turn = len(episode.prompt_ids), 0
    if index < at:
        return 0
    for segment, length in zip(episode.segments, lengths):
        turn += segment.kind == MODEL
        at += length
        if index < at:
            return turn
    return max(turn, 1)


def _tool_names(messages: list[dict]) -> list[str]:
    return [m["name"] for m in messages if m.get("role") == "tool" and m.get("name")]


def _dummy_calls(messages: list[dict]) -> list[dict]:
    """Tool calls for the probe's assistant turn, named as the tool messages that answer them
    (some templates take a tool turn's header from the call it answers)."""
    return [{"type": "function", "function": {"name": name, "arguments": {}}}
            for name in _tool_names(messages)]
