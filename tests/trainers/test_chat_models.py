"""Chat models as users bring them: tiny Llama, Qwen2 and GPT-2 folders with a ChatML template
(GPT-2's pad is its EOS) run, with LoRA for a few steps, SFT on `{messages}`, a reward model on
message-list pairs, DPO, and GRPO on message-list prompts with a TRL-style reward of
`completion_ids`. Each stage learns, and its `final/` reloads with plain transformers and peft
and keeps what was learned.

Every (architecture, stage) pair is a case; by default one diagonal of them runs (each stage on
one architecture, each architecture at least once, GPT-2's pad == EOS on the stages that read
the last token or generate), because every run pays ~7 s of worker start-up.
`ALIGN_TEST_FULL=1` runs all twelve.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from align.config import DPOConfig, PPOConfig, RMConfig, SFTConfig, load_config
from align.tracking import read_metrics
from align.trainers.dpo import DPOTrainer
from align.trainers.ppo import PPOTrainer
from align.trainers.reward import RewardTrainer
from align.trainers.sft import SFTTrainer
from tests.chat_models import ARCHS, ASCII_IDS, CHATML
from tests.conftest import CPU_FP32

pytestmark = pytest.mark.slow
REWARD = Path(__file__).with_name("chat_reward.py")
QUESTIONS = ["What is red?", "Name a fruit.", "Say hello.", "Count to three."]
GOOD = ["A colour.", "An apple.", "Hello!", "One, two, three."]
BAD = "No."
DEFAULT = {("llama", "sft"), ("qwen2", "dpo"), ("gpt2", "rm"), ("gpt2", "grpo")}
FULL = os.environ.get("ALIGN_TEST_FULL") == "1"


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def curve(run: Path, key: str) -> list[float]:
    return [m[key] for m in read_metrics(run / "metrics.jsonl") if key in m]


def run_stage(trainer_class, config_class, tmp_path: Path, base: str, *overrides: str) -> Path:
    """Run a stage in `tmp_path/run` and return its final/ folder."""
    run = tmp_path / "run"
    cfg = load_config(config_class, None, [
        f"output_dir={run}", f"model.name_or_path={base}", *CPU_FP32, "model.lora.enabled=true",
        "trainer.scheduler=constant", "trainer.log_every=1", "trainer.global_batch_size=8",
        "trainer.micro_batch_size=8", "data.max_length=96", "trainer.lr=2e-2", *overrides])
    trainer_class(cfg, show_progress=False).fit()
    return run / "final"


def reload_policy(base: str, final: Path) -> tuple[torch.nn.Module, torch.nn.Module, object]:
    """(base model, base + the saved adapter, the saved tokenizer), loaded by plain peft."""
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert tokenizer.chat_template == CHATML
    trained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), final)
    return AutoModelForCausalLM.from_pretrained(base).eval(), trained.eval(), tokenizer


@torch.no_grad()
def answer_logprob(model, tokenizer, question: str, answer: str) -> float:
    """log p(assistant turn | user turn) under the chat template."""
    prompt = tokenizer.apply_chat_template(user(question), tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(user(question) + assistant(answer), tokenize=False)
    ids = tokenizer(full, add_special_tokens=False, return_tensors="pt")["input_ids"]
    start = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    logprobs = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
    return float(logprobs[start - 1:].gather(1, ids[0, start:, None]).sum())


def sft(tmp_path: Path, base: str) -> None:
    rows = [{"messages": user(q) + assistant(a)} for q, a in zip(QUESTIONS, GOOD)] * 2
    final = run_stage(SFTTrainer, SFTConfig, tmp_path, base, "trainer.max_steps=6",
                      "eval.exact_match=false",
                      f"data.train={write_jsonl(tmp_path / 'sft.jsonl', rows)}")
    losses = curve(final.parent, "loss")
    assert losses[-1] < losses[0] - 0.1, losses
    plain, trained, tok = reload_policy(base, final)
    for q, a in zip(QUESTIONS, GOOD):
        assert answer_logprob(trained, tok, q, a) > answer_logprob(plain, tok, q, a)


def preference_rows() -> list[dict]:
    return [{"prompt": user(q), "chosen": assistant(a), "rejected": assistant(BAD)}
            for q, a in zip(QUESTIONS, GOOD)] * 2


def rm(tmp_path: Path, base: str) -> None:
    pairs = write_jsonl(tmp_path / "pairs.jsonl", preference_rows())
    final = run_stage(RewardTrainer, RMConfig, tmp_path, base, "trainer.max_steps=6",
                      f"data.train={pairs}", f"data.eval={pairs}")
    losses = curve(final.parent, "loss")
    assert losses[-1] < losses[0] - 0.05, losses
    # The adapter is merged into final/: a plain one-label classifier (docs/reward-model.md).
    scorer = AutoModelForSequenceClassification.from_pretrained(final).eval()
    tok = AutoTokenizer.from_pretrained(final)
    margins = []
    for question, good in zip(QUESTIONS, GOOD):  # one unpadded text at a time, read at its end
        scores = []
        for answer in (good, BAD):
            text = tok.apply_chat_template(user(question) + assistant(answer), tokenize=False)
            ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                hidden = scorer.base_model(input_ids=ids).last_hidden_state
                scores.append(float(scorer.score(hidden[0, -1])))
        assert scores[0] > scores[1], (question, scores)
        margins.append(scores[0] - scores[1])
    summary = json.loads((final.parent / "summary.json").read_text())
    assert summary["eval/margin"] == pytest.approx(sum(margins) / len(margins), abs=1e-4)


def dpo(tmp_path: Path, base: str) -> None:
    final = run_stage(DPOTrainer, DPOConfig, tmp_path, base, "trainer.max_steps=4",
                      "eval.max_samples=0",
                      f"data.train={write_jsonl(tmp_path / 'pairs.jsonl', preference_rows())}")
    losses = curve(final.parent, "loss")
    assert losses[-1] < losses[0], losses
    plain, trained, tok = reload_policy(base, final)
    for q, a in zip(QUESTIONS, GOOD):
        margin = answer_logprob(trained, tok, q, a) - answer_logprob(trained, tok, q, BAD)
        assert margin > answer_logprob(plain, tok, q, a) - answer_logprob(plain, tok, q, BAD)


def grpo(tmp_path: Path, base: str) -> None:
    rows = [{"prompt": user(q)} for q in QUESTIONS]
    final = run_stage(PPOTrainer, PPOConfig, tmp_path, base, "trainer.lr=5e-2",
                      "trainer.max_steps=8", "algorithm.estimator=grpo", "algorithm.kl_coef=0",
                      "rollout.prompts_per_step=4", "rollout.n_samples_per_prompt=4",
                      "rollout.max_new_tokens=8", "trainer.global_batch_size=16",
                      "trainer.micro_batch_size=16", "eval.max_samples=0",
                      f"rewards=[{{spec: '{REWARD}:ascii_share'}}]",
                      f"data.train={write_jsonl(tmp_path / 'prompts.jsonl', rows)}")
    rewards = curve(final.parent, "reward")
    assert sum(rewards[-3:]) / 3 > sum(rewards[:3]) / 3 + 0.1, rewards
    plain, trained, tok = reload_policy(base, final)
    assert ascii_share_sampled(trained, tok) > ascii_share_sampled(plain, tok) + 0.1


@torch.no_grad()
def ascii_share_sampled(model, tokenizer) -> float:
    """The mean reward of 8 sampled completions per question (temperature 1, seeded)."""
    torch.manual_seed(0)
    shares = []
    for question in QUESTIONS:
        prompt = tokenizer.apply_chat_template(user(question), tokenize=False,
                                               add_generation_prompt=True)
        ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
        out = model.generate(input_ids=ids.repeat(8, 1), do_sample=True, top_k=0,
                             max_new_tokens=8, pad_token_id=tokenizer.pad_token_id)
        shares += [float((row < ASCII_IDS).float().mean()) for row in out[:, ids.shape[1]:]]
    return sum(shares) / len(shares)


STAGES = {"sft": sft, "rm": rm, "dpo": dpo, "grpo": grpo}
CASES = [pytest.param(arch, stage, id=f"{arch}-{stage}", marks=() if FULL or (arch, stage)
                      in DEFAULT else pytest.mark.skip(reason="ALIGN_TEST_FULL=1 runs it"))
         for arch in ARCHS for stage in STAGES]


@pytest.mark.parametrize(("arch", "stage"), CASES)
def test_stage_learns_on_a_chat_model_with_lora(tmp_path, ray_local, chat_model_dir, arch,
                                                stage):
    STAGES[stage](tmp_path, chat_model_dir(arch))
