"""Tokenizer loading: `model.chat_template` overrides the tokenizer's template."""

from __future__ import annotations

import pytest

from align.config import ModelConfig
from align.data import tokenize_sft
from align.errors import ConfigError
from align.model_loading import load_tokenizer

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MESSAGES = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]


@pytest.mark.parametrize("as_file", [False, True])
def test_a_template_string_or_file_replaces_the_tokenizers(tmp_path, saved_tokenizer, as_file):
    value = CHATML
    if as_file:
        (tmp_path / "chatml.jinja").write_text(CHATML)
        value = str(tmp_path / "chatml.jinja")
    tok = load_tokenizer(ModelConfig(tokenizer=str(saved_tokenizer), chat_template=value))
    assert tok.chat_template == CHATML
    (example,), _ = tokenize_sft([{"messages": MESSAGES}], tok, max_length=128)
    text = tok.decode(example.input_ids)
    assert text.startswith("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n4")
    saved = tmp_path / "saved"
    tok.save_pretrained(saved)  # what every run's final/ holds
    assert load_tokenizer(ModelConfig(tokenizer=str(saved))).chat_template == CHATML


@pytest.mark.parametrize("value, message", [
    ("no/such/template.jinja", "neither a file nor a Jinja template"),
    ("{% for m in messages %}{{ m['content'] }}", "invalid Jinja template"),
])
def test_a_bad_template_names_the_key(saved_tokenizer, value, message):
    with pytest.raises(ConfigError, match=f"model.chat_template: .*{message}"):
        load_tokenizer(ModelConfig(tokenizer=str(saved_tokenizer), chat_template=value))
