"""The driver's side of a rollout: padded rows and completion texts."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from align.config import ModelConfig
from align.losses import IGNORE_INDEX
from align.model_loading import load_tokenizer
from align.trainers.rollout import decode_completions, pad_sequences


def test_pad_sequences_by_hand():
    batch = pad_sequences([[5, 6], [7]], [[8], [9, 10, 11]], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 8, 0], [7, 9, 10, 11]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]
    x = IGNORE_INDEX
    assert batch["labels"].tolist() == [[x, x, 8, x], [x, 9, 10, 11]]
    assert all(t.dtype == torch.long for t in batch.values())


def fast_tokenizer() -> PreTrainedTokenizerFast:
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator(["the sum is twelve"] * 10, trainers.BpeTrainer(
        vocab_size=280, special_tokens=["<pad>", "<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>",
                                   pad_token="<pad>")


def test_completions_decode_as_decode_skipping_special_tokens():
    slow = load_tokenizer(ModelConfig())  # the embedded byte tokenizer: 128 special ids
    fast = fast_tokenizer()
    for tok in (slow, fast):
        special = tok.all_special_ids
        text = tok.encode(" 57", add_special_tokens=False)
        outputs = [text + [special[0]], [special[-1], *text], [], text]
        got = decode_completions(tok, outputs)
        assert got == [tok.decode(o, skip_special_tokens=True) for o in outputs]
        assert got[0] == got[1] == got[3] and got[0].strip() == "57" and got[2] == ""
    assert not slow.is_fast and fast.is_fast
