"""Tiny chat models as users bring them: a Llama, Qwen2 or GPT-2 folder holding a byte-level BPE
tokenizer with ChatML special tokens and a ChatML chat template.

Qwen2 and Llama end a turn with `<|im_end|>` (their EOS) and pad with `<|endoftext|>`; GPT-2
pads with its EOS, `<|endoftext|>`, as GPT-2 tokenizers do. Every byte is one token (no merges),
so any text encodes; the three special tokens come after the 256 bytes. `llama3_tokenizer` is
the same with Llama 3's special tokens instead, and `trl_template` reads a real chat template
as TRL ships it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    LlamaConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
ARCHS = ("llama", "qwen2", "gpt2")
INIT_STD = 0.5  # large random weights: peaked distributions that a few LoRA steps visibly move
ASCII_IDS = 94  # ids 0-93 are the printable ASCII bytes `!`..`~` (the alphabet sorted)


def _byte_level(special: list[str]) -> Tokenizer:
    """Every byte one token (no merges), then `special`."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(special)
    return backend


def chatml_tokenizer(arch: str) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with ChatML tokens; GPT-2's pad is its EOS."""
    eos = "<|endoftext|>" if arch == "gpt2" else "<|im_end|>"
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level(SPECIAL), eos_token=eos,
                                        pad_token="<|endoftext|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def llama3_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level tokenizer with Llama 3's special tokens, set up as Llama 3.2 Instruct's
    (BOS `<|begin_of_text|>`, EOS `<|eot_id|>`, which ends a turn), and TRL's Llama 3
    template."""
    special = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
               "<|end_header_id|>", "<|eot_id|>"]
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=_byte_level(special),
                                        bos_token="<|begin_of_text|>", eos_token="<|eot_id|>",
                                        pad_token="<|end_of_text|>")
    tokenizer.chat_template = trl_template("llama3")
    return tokenizer


def trl_template(name: str) -> str:
    """A chat template as TRL ships it (`trl/chat_templates/NAME.jinja`): qwen2_5, llama3..."""
    import trl

    return (Path(trl.__file__).parent / "chat_templates" / f"{name}.jinja").read_text()


def chat_config(arch: str, tokenizer: PreTrainedTokenizerFast, width: int = 32,
                init_std: float = INIT_STD, heads: int = 4):
    ids = {"vocab_size": len(tokenizer), "pad_token_id": tokenizer.pad_token_id,
           "eos_token_id": tokenizer.eos_token_id, "bos_token_id": None,
           "initializer_range": init_std}
    if arch == "llama":
        return LlamaConfig(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                           intermediate_size=2 * width, max_position_embeddings=256, **ids)
    if arch == "qwen2":
        return Qwen2Config(hidden_size=width, num_hidden_layers=2, num_attention_heads=heads,
                           num_key_value_heads=2, intermediate_size=2 * width,
                           max_position_embeddings=256, **ids)
    if arch == "gpt2":
        return GPT2Config(n_embd=width, n_layer=2, n_head=4, n_positions=256, **ids)
    raise ValueError(arch)


def save_chat_model(arch: str, folder: Path, seed: int = 0, eos_scale: float = 0.0,
                    width: int = 32, heads: int = 4) -> Path:
    """A tiny random causal LM of `arch` and its ChatML tokenizer, saved in `folder`.

    `eos_scale` > 0 points the output row of EOS along the mean final hidden state, scaled to
    that norm, so turns end after a few tokens (about 0.3 mean probability per token at 6)
    instead of almost never: what multi-turn episodes of a random model need. vLLM's CPU
    attention needs heads of 32 dimensions or more (`width=64, heads=2`)."""
    tokenizer = chatml_tokenizer(arch)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(chat_config(arch, tokenizer, width, heads=heads))
    if eos_scale:
        with torch.no_grad():
            ids = torch.randint(0, ASCII_IDS, (16, 40))
            hidden = model(ids, output_hidden_states=True).hidden_states[-1]
            direction = hidden.reshape(-1, hidden.shape[-1]).mean(0)
            model.get_output_embeddings().weight[tokenizer.eos_token_id] = (
                eos_scale * direction / direction.norm())
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
