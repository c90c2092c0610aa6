"""Weight streaming to engines: names, LoRA merging, bucket bounds (no Ray, no engine)."""

from __future__ import annotations

import copy

import torch

from align.config import LoraConfig
from align.model_loading import apply_lora
from align.rollout.weight_sync import buckets, gathered_buckets, weight_units
from tests.conftest import tiny_config


def tiny_llama() -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = tiny_config("llama", 64)
    config.tie_word_embeddings = True
    return AutoModelForCausalLM.from_config(config)


def test_names_are_the_state_dict_keys_tied_embeddings_included():
    model = tiny_llama()
    names = [u.name for u in weight_units(model)]
    assert names == list(model.state_dict())
    assert "lm_head.weight" in names  # tied: sent under both names


def test_lora_weights_arrive_merged_under_base_names():
    model = tiny_llama()
    merged_ref = copy.deepcopy(model)
    peft_model = apply_lora(model, LoraConfig(enabled=True, r=4))
    torch.manual_seed(1)
    with torch.no_grad():  # fresh B is zero: make the adapter matter
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    expected = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    sent = dict(pair for bucket in gathered_buckets(peft_model, 1 << 30, 0, 0)
                for pair in bucket)
    assert list(sent) == list(merged_ref.state_dict())
    changed = 0
    for name, tensor in sent.items():
        torch.testing.assert_close(tensor, expected[name], rtol=0, atol=1e-6)
        changed += not torch.equal(tensor, merged_ref.state_dict()[name])
    assert changed >= 14  # every adapted projection (7 per block x 2 blocks)
    for name, param in peft_model.get_base_model().named_parameters():  # base untouched
        if "base_layer" in name:
            key = name.replace(".base_layer", "")
            torch.testing.assert_close(param, merged_ref.state_dict()[key], rtol=0, atol=0)


def test_buckets_keep_blocks_whole_and_stay_bounded():
    units = weight_units(tiny_llama())
    block_bytes = sum(u.nbytes for u in units if ".layers.0." in u.name)
    packed = buckets(units, bucket_bytes=block_bytes)
    assert [u.name for b in packed for u in b] == [u.name for u in units]
    for bucket in packed:
        blocks = {u.name.split(".")[2] for u in bucket if ".layers." in u.name}
        assert len(blocks) <= 1
        assert sum(u.nbytes for u in bucket) <= block_bytes
    assert len(packed) >= 4  # embeddings, two blocks, head/norm
    for i in (0, 1):  # each block travels in one bucket
        holding = [b for b in packed if any(f".layers.{i}." in u.name for u in b)]
        assert len(holding) == 1


def test_other_ranks_yield_nothing():
    assert all(b == [] for b in gathered_buckets(tiny_llama(), 1 << 30, 0, rank=1))
