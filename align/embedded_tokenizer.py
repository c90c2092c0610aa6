"""The embedded model's tokenizer: ByT5's byte-level one (it builds from no files) with a chat
format chosen by `model.embedded.chat_format`.

- `plain`: `<|role|>content</s>` per message, a minimal format so `{messages}` rows work offline.
- `chatml`: ChatML turns (`<|im_start|>role\\n...<|im_end|>\\n`, EOS `<|im_end|>`) with Qwen2.5's
  tool-call format (Hermes), so tool-using episodes run the path real chat models run: the
  tools as JSON in a system turn inside `<tools></tools>`, a call written
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, tool results as a user turn
  of `<tool_response>\\n...\\n</tool_response>` blocks, generation prompt
  `<|im_start|>assistant\\n`. The two turn markers are special tokens; the four tool markers
  are single added tokens that are not special, so decoding with `skip_special_tokens` keeps
  them and a tool call survives into the text a parser reads.

Every other character is one token per byte, so the system turn is short: one line of compact
JSON per tool, `{"name":...,"description":...,"parameters":{"a":"integer",...}}`, and nothing
else. Qwen2.5 writes each tool's whole JSON schema there, after two paragraphs of
instructions: for the embedded tool task that is 315 byte-tokens of schema against 100 here,
and with it the small model learnt to copy a call's arguments from the question far more
slowly, at twice the cost per step (docs/decisions.md). An assistant message is rendered
from its raw text `content` byte for byte, and one with structured `tool_calls` (and empty
content) renders as the same text the model would have written for them.
"""

from __future__ import annotations

from typing import Literal

from tokenizers import AddedToken
from transformers import ByT5Tokenizer

ChatFormat = Literal["plain", "chatml"]

# A minimal chat format for the byte-level tokenizer, so `{messages}` rows work offline too.
PLAIN_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_TOKENS = ("<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Qwen2.5's template (trl/chat_templates/qwen2_5.jinja) with its default system prompt and
# tool instructions left out, each tool as one line (name, description, parameter types), and
# a call's `arguments` written as given when already JSON text.
CHATML_TOOL_TEMPLATE = (
    "{%- set has_system = messages and messages[0].role == 'system' %}"
    "{%- if tools or has_system %}"
    "{{- '<|im_start|>system\\n' }}"
    "{%- if has_system %}{{- messages[0].content }}{%- if tools %}{{- '\\n\\n' }}{%- endif %}"
    "{%- endif %}"
    "{%- if tools %}{{- '<tools>' }}{%- for tool in tools %}"
    "{%- set f = tool.function if tool.function is defined else tool %}"
    "{{- '\\n{\"name\":' }}{{- f.name | tojson }}"
    "{%- if f.description %}{{- ',\"description\":' }}{{- f.description | tojson }}{%- endif %}"
    "{{- ',\"parameters\":{' }}"
    "{%- for name, spec in ((f.parameters or {}).properties or {}).items() %}"
    "{%- if not loop.first %}{{- ',' }}{%- endif %}"
    "{{- name | tojson }}{{- ':' }}{{- (spec.type or 'any') | tojson }}"
    "{%- endfor %}{{- '}}' }}"
    "{%- endfor %}{{- '\\n</tools>' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'system' and loop.first %}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' %}"
    "{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}"
    "{{- '<|im_start|>assistant' }}"
    "{%- if message.content %}{{- '\\n' }}{{- message.content }}{%- endif %}"
    "{%- for call in message.tool_calls %}"
    "{%- if call.function is defined %}{%- set call = call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- call.name }}{{- '\", \"arguments\": ' }}"
    "{%- if call.arguments is string %}{{- call.arguments }}"
    "{%- else %}{{- call.arguments | tojson }}{%- endif %}"
    "{{- '}\\n</tool_call>' }}"
    "{%- endfor %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message.role + '\\n' }}{{- message.content }}{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def embedded_tokenizer(chat_format: ChatFormat = "plain") -> ByT5Tokenizer:
    """ByT5's byte-level tokenizer with the chat format `chat_format` (see the module
    docstring). With `chatml` it holds 390 ids (ByT5's 384, then `<|im_start|>`, `<|im_end|>`
    and the four tool markers): size a model by `len(tokenizer)`."""
    tok = ByT5Tokenizer()
    if chat_format == "plain":
        tok.chat_template = PLAIN_CHAT_TEMPLATE
        return tok
    turns = [AddedToken(t, special=True, normalized=False) for t in (IM_START, IM_END)]
    tok.add_special_tokens({"additional_special_tokens": turns})
    tok.add_special_tokens({"eos_token": IM_END})
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])
    tok.chat_template = CHATML_TOOL_TEMPLATE
    return tok
