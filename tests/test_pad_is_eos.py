"""Tokenizers whose pad token is their EOS (GPT-2 style): reward models, `align eval-rm`,
`align serve-rm` and the critic read a sequence's true last token (its EOS), and batched
left-padded generation equals one prompt at a time."""

from __future__ import annotations

import json
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from align.data.packing import pack_sequences
from align.packed_forward import classifier_parts
from align.rollout import Sampling
from align.rollout.hf_sampling import hf_sample
from align.trainers.ppo_objectives import token_values
from reward_models import load_reward
from reward_models.reward_model import (
    collate_sequences,
    encode_sample,
    load_reward_model,
    score_batch,
    score_texts,
)
from reward_models.server import RewardModelServer, evaluate_reward_model
from tests.chat_models import chat_config, chatml_tokenizer

PROMPTS = ["Q: 23+58=", "Q: 1+1=", "Q: 99+99="]
COMPLETIONS = [" 81", " 2", " 198"]


@pytest.fixture(scope="module")
def gpt2_rm_dir(tmp_path_factory) -> str:
    """A tiny GPT-2 reward model whose tokenizer pads with its EOS."""
    tokenizer = chatml_tokenizer("gpt2")
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    config = chat_config("gpt2", tokenizer)
    config.num_labels = 1
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config)
    with torch.no_grad():  # scores of order 1, so a token's effect is plain
        model.score.weight.normal_(0.0, 1.0)
    path = tmp_path_factory.mktemp("gpt2-rm")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@torch.no_grad()
def score_at_end(model, ids: list[int]) -> float:
    """The head at the last token of one unpadded sequence, computed by hand."""
    backbone, head = classifier_parts(model)
    hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
    return float(head(hidden))


def test_scores_are_read_at_the_closing_eos(gpt2_rm_dir):
    model, tok = load_reward_model(gpt2_rm_dir)
    sequences = [encode_sample(tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert all(s[-1] == tok.pad_token_id for s in sequences)  # each ends with EOS == pad
    truth = [score_at_end(model, s) for s in sequences]
    with torch.no_grad():
        padded = score_batch(model, collate_sequences(sequences, tok.pad_token_id)).tolist()
        packed = score_batch(model, pack_sequences(sequences, None, tok.pad_token_id,
                                                   "position_ids")).tolist()
        pooled = model(**collate_sequences(sequences, tok.pad_token_id)).logits[:, 0].tolist()
    assert padded == pytest.approx(truth, abs=1e-5)
    assert packed == pytest.approx(truth, abs=1e-5)
    # Hugging Face's own head skips the EOS (it looks for the last non-pad token).
    assert all(abs(p - t) > 1e-3 for p, t in zip(pooled, truth))
    # A truncated completion (no EOS) now scores differently from the one that ended.
    ended, cut = score_texts(model, tok, PROMPTS[:1] * 2, COMPLETIONS[:1] * 2,
                             truncated=[False, True])
    assert ended == pytest.approx(truth[0], abs=1e-5) and abs(ended - cut) > 1e-3


def test_eval_rm_and_serve_rm_read_the_closing_eos(tmp_path, gpt2_rm_dir, monkeypatch):
    model, tok = load_reward_model(gpt2_rm_dir)
    rows = [{"prompt": p, "chosen": c, "rejected": c + "0"} for p, c in zip(PROMPTS,
                                                                             COMPLETIONS)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    chosen = [score_at_end(model, encode_sample(tok, r["prompt"], r["chosen"])) for r in rows]
    rejected = [score_at_end(model, encode_sample(tok, r["prompt"], r["rejected"]))
                for r in rows]
    report = evaluate_reward_model(gpt2_rm_dir, str(data), batch_size=8)
    assert report["margin"] == pytest.approx((sum(chosen) - sum(rejected)) / 3, abs=1e-5)
    for key in ("http_proxy", "HTTP_PROXY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    server = RewardModelServer(("127.0.0.1", 0), gpt2_rm_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        reward = load_reward({"spec": server.url, "kwargs": {"max_tries": 1}})
        served = reward(PROMPTS, COMPLETIONS)
    finally:
        server.shutdown()
        server.server_close()
    truth = [score_at_end(model, encode_sample(tok, p, c)) for p, c in zip(PROMPTS, COMPLETIONS)]
    assert served == pytest.approx(truth, abs=1e-5)


def test_critic_values_ignore_the_padding(gpt2_rm_dir):
    model, tok = load_reward_model(gpt2_rm_dir)
    sequences = [encode_sample(tok, p, c) for p, c in zip(PROMPTS, COMPLETIONS)]
    with torch.no_grad():
        values = token_values(model, collate_sequences(sequences, tok.pad_token_id))
    for row, ids in enumerate(sequences):  # the state before each next token, EOS included
        alone = [score_at_end(model, ids[:n]) for n in range(1, len(ids))]
        # Relative too: a batch and a single sequence sum in other orders (1.0e-5 seen at 2.2).
        assert values[row, :len(ids) - 1].tolist() == pytest.approx(alone, rel=1e-5, abs=1e-5)


@torch.no_grad()
def greedy_by_hand(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Greedy decoding of one unpadded prompt with plain forward passes."""
    ids, out = list(prompt), []
    for _ in range(steps):
        token = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


def test_batched_left_padded_generation_equals_one_prompt_at_a_time(chat_model_dir):
    model = AutoModelForCausalLM.from_pretrained(chat_model_dir("gpt2")).eval()
    tok = chatml_tokenizer("gpt2")
    assert tok.pad_token_id == tok.eos_token_id
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in
               ("a", "x<|endoftext|>y", "a much longer prompt than the others")]
    eos = tok.eos_token_id
    greedy = Sampling(max_new_tokens=10, greedy=True, logprobs=True)
    with torch.no_grad():
        tokens, logprobs = hf_sample(model, prompts, greedy, [eos], tok.pad_token_id,
                                     torch.device("cpu"))
        alone = [hf_sample(model, [p], greedy, [eos], tok.pad_token_id, torch.device("cpu"))
                 for p in prompts]
    assert tokens == [greedy_by_hand(model, p, 10, eos) for p in prompts]
    assert any(len(t) > 1 for t in tokens)  # not just an EOS each
    assert tokens == [t[0] for t, _ in alone]
    for lp, (_, lp_alone) in zip(logprobs, alone):
        assert lp == pytest.approx(lp_alone[0], abs=1e-4)
