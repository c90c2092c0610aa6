"""The embedded tokenizer's chat formats: ChatML with Qwen2.5's tool calls renders what the
model wrote byte for byte, renders structured tool calls as the same text, passes TRL's
tool-calling check, and survives a run's save and reload; the model is sized by it."""

from __future__ import annotations

import json

from trl.chat_template_utils import supports_tool_calling

from align.config import ModelConfig
from align.embedded_tokenizer import embedded_tokenizer
from align.model_loading import load_model, load_tokenizer
from align.tasks import products
from align.tasks.calculator import tool_schemas

A, B = 4821, 37
RAW = [{"role": "user", "content": products.question(A, B)},
       {"role": "assistant", "content": products.tool_call_text(A, B)},
       {"role": "tool", "name": "multiply", "content": str(A * B)},
       {"role": "assistant", "content": str(A * B)}]
TOOLS_LINE = ('{"name":"multiply","description":"Multiply two integers.",'
              '"parameters":{"a":"integer","b":"integer"}}')
EXPECTED = (
    "<|im_start|>system\n<tools>\n" + TOOLS_LINE + "\n</tools><|im_end|>\n"
    "<|im_start|>user\nWhat is 4821 times 37?<|im_end|>\n"
    "<|im_start|>assistant\n<tool_call>\n"
    '{"name": "multiply", "arguments": {"a": 4821, "b": 37}}\n</tool_call><|im_end|>\n'
    "<|im_start|>user\n<tool_response>\n178377\n</tool_response><|im_end|>\n"
    "<|im_start|>assistant\n178377<|im_end|>\n"
)


def chatml() -> ModelConfig:
    cfg = ModelConfig()
    cfg.embedded.chat_format = "chatml"
    return cfg


def test_raw_and_structured_tool_calls_render_in_qwen25_form_byte_for_byte():
    tok, tools = embedded_tokenizer("chatml"), tool_schemas()
    text = tok.apply_chat_template(RAW, tools=tools, tokenize=False)
    assert text == EXPECTED
    structured = [RAW[0], products.tool_call(A, B), *RAW[2:]]
    assert tok.apply_chat_template(structured, tools=tools, tokenize=False) == text
    as_json_text = {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "multiply",
                                          "arguments": json.dumps({"a": A, "b": B})}}]}
    assert tok.apply_chat_template([RAW[0], as_json_text, *RAW[2:]], tools=tools,
                                   tokenize=False) == text
    prompt = tok.apply_chat_template(RAW[:1], tools=tools, tokenize=False,
                                     add_generation_prompt=True)
    assert text.startswith(prompt) and prompt.endswith("<|im_start|>assistant\n")
    # without tools or a system message there is no system turn at all; a system message
    # comes before the tools, and a tool without description or parameters is just its name
    assert tok.apply_chat_template(RAW[:1], tokenize=False) == (
        "<|im_start|>user\nWhat is 4821 times 37?<|im_end|>\n")
    bare = {"type": "function", "function": {"name": "now"}}
    system = [{"role": "system", "content": "Be brief."}, RAW[0]]
    assert tok.apply_chat_template(system, tools=[bare], tokenize=False).startswith(
        '<|im_start|>system\nBe brief.\n\n<tools>\n{"name":"now","parameters":{}}\n'
        "</tools><|im_end|>\n<|im_start|>user\n")


def test_turn_markers_are_special_and_tool_markers_single_tokens_that_decoding_keeps():
    tok = embedded_tokenizer("chatml")
    assert tok.eos_token == "<|im_end|>" and tok.pad_token_id == 0
    ids = tok(EXPECTED, add_special_tokens=False).input_ids
    for marker in ("<|im_start|>", "<|im_end|>", "<tool_call>", "</tool_call>",
                   "<tool_response>", "</tool_response>"):
        assert tok(marker, add_special_tokens=False).input_ids == [
            tok.convert_tokens_to_ids(marker)]
    kept = tok.decode(ids, skip_special_tokens=True)
    assert "<|im_start|>" not in kept and "<|im_end|>" not in kept
    assert products.tool_call_text(A, B) in kept and "<tool_response>\n178377" in kept


def test_trl_sees_a_template_that_calls_tools_and_plain_does_not():
    assert supports_tool_calling(embedded_tokenizer("chatml"))
    assert not supports_tool_calling(embedded_tokenizer("plain"))


def test_the_tokenizer_a_run_saves_loads_back_the_same(tmp_path):
    tok = load_tokenizer(chatml())
    tok.save_pretrained(tmp_path)  # what every run's final/ holds
    back = load_tokenizer(ModelConfig(tokenizer=str(tmp_path)))
    assert len(back) == len(tok) == 390
    assert (back.eos_token, back.pad_token_id) == ("<|im_end|>", 0)
    assert back.chat_template == tok.chat_template
    text = tok.apply_chat_template(RAW, tools=tool_schemas(), tokenize=False)
    ids = tok(text, add_special_tokens=False).input_ids
    assert back(text, add_special_tokens=False).input_ids == ids
    assert back.decode(ids, skip_special_tokens=True) == tok.decode(ids,
                                                                    skip_special_tokens=True)


def test_the_embedded_model_is_sized_by_the_tokenizer():
    cfg = chatml()
    cfg.embedded.hidden_size, cfg.embedded.intermediate_size = 16, 32
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    assert model.config.vocab_size == len(tok) == 390
    assert model.config.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert load_tokenizer(ModelConfig()).eos_token == "</s>"  # plain stays as it was
