"""One optimizer step must not depend on how the global batch is split over workers and
micro-batches: the same `grad_norm` and the same parameter update, for every stage's objective,
with micro-batches of a fixed size or cut by a token budget (`trainer.max_tokens_per_micro_batch`,
whose steps here also take their log-probs through the LM head in chunks).

Each split also runs under a different DeepSpeed set-up (ZeRO 0-3, optimizer offload), so the
ZeRO-1 and offload paths take real steps here too. Workers are built once per world size and
re-set-up for every split, which keeps the test to about a minute on two cores.
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Callable
from typing import Any

import pytest
import torch
from ray import cloudpickle

from align.config import DistributedConfig, DPOSettings, ModelConfig, TaskConfig, TrainerConfig
from align.data import (
    collate_packed,
    collate_preference,
    collate_preference_packed,
    example_size,
    tokenize_preference,
    tokenize_sft,
)
from align.distributed import PolicyWorker, WorkerGroup
from align.model_loading import load_model, load_tokenizer
from align.tasks import arithmetic
from align.trainers.batches import TokenBudget, shard_by_tokens
from align.trainers.dispatch import train_objective
from align.trainers.dpo import chosen_targets, dpo_objective
from align.trainers.ppo_objectives import (
    ppo_objective,
    response_mask,
    token_logprobs,
    token_values,
    value_objective,
)
from align.trainers.reward import reward_objective
from align.trainers.rollout import pad_sequences
from align.trainers.sft import sft_objective, target_tokens
from tests.conftest import TINY, full_only

pytestmark = pytest.mark.slow
cloudpickle.register_pickle_by_value(sys.modules[__name__])

GLOBAL_BATCH = 16
# (workers, micro-batch, ZeRO stage, optimizer offload); the first is the reference.
SPLITS = [(1, 16, 0, False), (1, 8, 0, False), (1, 4, 3, False), (2, 4, 0, False),
          (2, 8, 1, False), (2, 4, 2, True)]
TOLERANCE = 1e-5  # relative
# Token-budget splits (workers, ZeRO stage, optimizer offload), against SPLITS[0].
TOKEN_SPLITS = [(1, 0, False), (2, 3, False), (2, 2, True)]


class ProbeWorker(PolicyWorker):
    def engine_facts(self) -> dict[str, Any]:
        engine = self.policy.ds_engine
        torch_optimizer = getattr(engine.optimizer, "optimizer", engine.optimizer)
        return {"zero_stage": engine.zero_optimization_stage(),
                "offload": bool(engine.zero_cpu_offload()),
                "accumulation": engine.gradient_accumulation_steps(),
                "fused": torch_optimizer.param_groups[0]["fused"],
                "compiled": engine.module._compiled_call_impl is not None}


@dataclasses.dataclass
class Case:
    """One objective with a fixed global batch of GLOBAL_BATCH items."""

    kind: str  # model kind
    objective: Callable
    collate: Callable[[list[int]], dict[str, torch.Tensor]]  # item indices -> micro-batch
    kwargs: dict[str, Any]
    size_of: Callable[[int], tuple[int, int]]  # item index -> (sequences, longest's tokens)


def model_config() -> ModelConfig:
    cfg = ModelConfig(dtype="float32")
    cfg.embedded = dataclasses.replace(cfg.embedded, hidden_size=TINY["hidden_size"],
                                       num_layers=TINY["num_layers"],
                                       num_heads=TINY["num_heads"],
                                       intermediate_size=TINY["intermediate_size"])
    return cfg


def sft_case(tok) -> Case:
    examples, _ = tokenize_sft(arithmetic.sft_rows(TaskConfig(num_train=GLOBAL_BATCH)), tok, 24,
                               True)
    return Case("causal_lm", sft_objective,
                lambda idx: collate_packed([examples[i] for i in idx], None, tok.pad_token_id),
                {"num_tokens": float(sum(map(target_tokens, examples)))},
                lambda i: example_size(examples[i]))


def preference_examples(tok):
    return tokenize_preference(arithmetic.preference_rows(TaskConfig(), GLOBAL_BATCH), tok, 24)


def reward_case(tok) -> Case:
    examples = preference_examples(tok)

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = collate_preference([examples[i] for i in idx], tok.pad_token_id)
        batch.pop("labels")
        return batch

    return Case("sequence_classification", reward_objective, collate,
                {"num_pairs": float(GLOBAL_BATCH), "center_coef": 0.01},
                lambda i: example_size(examples[i]))


def dpo_case(tok) -> Case:
    examples = preference_examples(tok)
    reference = -20.0 + torch.randn(GLOBAL_BATCH, 2, generator=torch.Generator().manual_seed(0))

    def collate(idx: list[int]) -> dict[str, torch.Tensor]:
        batch = collate_preference_packed([examples[i] for i in idx], None, tok.pad_token_id)
        batch["reference_logps"] = torch.cat([reference[idx, 0], reference[idx, 1]])
        return batch

    settings = DPOSettings(beta=0.5, nll_coef=0.5)
    return Case("causal_lm", dpo_objective, collate,
                {"settings": settings, "num_pairs": float(GLOBAL_BATCH),
                 "num_chosen_tokens": float(sum(map(chosen_targets, examples)))},
                lambda i: example_size(examples[i]))


def rollout_rows(tok) -> dict[str, torch.Tensor]:
    """Prompts with completions of varied length, as a PPO rollout lays them out."""
    rows = arithmetic.rl_rows(TaskConfig(), GLOBAL_BATCH)
    prompts = [tok(r["prompt"], add_special_tokens=False).input_ids for r in rows]
    answers = [tok(" " + r["answer"] * (1 + i % 3)).input_ids for i, r in enumerate(rows)]
    return pad_sequences(prompts, answers, tok.pad_token_id)


def ppo_case(tok) -> Case:
    batch = rollout_rows(tok)
    mask = response_mask(batch)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        old = token_logprobs(load_model(model_config(), tok).eval(), batch, temperature=0.7)
    batch.update(old_logprobs=old, ref_logprobs=old + 0.1 * torch.randn(old.shape, generator=gen),
                 advantages=torch.randn(old.shape, generator=gen) * mask)
    kwargs = {"temperature": 0.7, "clip_eps": 0.2, "clip_eps_high": None, "dual_clip": None,
              "aggregation": "token", "normalizer": float(mask.sum()), "kl_coef": 0.05,
              "kl_estimator": "k3", "entropy_coef": 0.01}
    return Case("causal_lm", ppo_objective, lambda idx: {k: v[idx] for k, v in batch.items()},
                kwargs, lambda i: (1, int(batch["attention_mask"][i].sum())))


def critic_case(tok) -> Case:
    batch = rollout_rows(tok)
    mask = response_mask(batch)
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        values = token_values(load_model(model_config(), tok, "sequence_classification").eval(),
                              batch)
    batch.update(old_values=values, returns=values + torch.randn(values.shape, generator=gen))
    kwargs = {"clip_eps": 0.2, "aggregation": "token", "normalizer": float(mask.sum())}
    return Case("sequence_classification", value_objective,
                lambda idx: {k: v[idx] for k, v in batch.items()}, kwargs,
                lambda i: (1, int(batch["attention_mask"][i].sum())))


CASES = {"sft": sft_case, "reward": reward_case, "dpo": dpo_case, "ppo_policy": ppo_case,
         "ppo_critic": critic_case}


@pytest.fixture(scope="module")
def groups():
    """A 1-worker and a 2-worker group, side by side on the shared cores."""
    made = {n: WorkerGroup(ProbeWorker, DistributedConfig(num_workers=n, cpus_per_worker=0.5,
                                                          gpus_per_worker=0, torch_threads=1))
            for n in (1, 2)}
    yield made
    for group in made.values():
        group.shutdown()


def one_step(groups, case: Case, split: tuple, grad_clip: float, fused_adam: bool = False,
             compile: bool = False, max_tokens: int = 0,
             **extra: Any) -> tuple[float, torch.Tensor]:
    """(grad_norm, flat parameter update) of one optimizer step on the global batch; with
    `max_tokens`, micro-batches by that token budget (`micro` plays no part); `extra` goes to
    the objective."""
    workers, micro, zero, offload = split
    group = groups[workers]
    # A large epsilon makes Adam's first step proportional to the gradient: with the usual
    # 1e-8 it is lr * sign(g), blind to the gradient's scale.
    trainer = TrainerConfig(lr=1e-2, adam_eps=1.0, scheduler="constant", grad_clip=grad_clip,
                            global_batch_size=GLOBAL_BATCH, micro_batch_size=micro,
                            fused_adam=fused_adam, compile=compile,
                            max_tokens_per_micro_batch=max_tokens)
    dist = DistributedConfig(num_workers=workers, zero_stage=zero, offload_optimizer=offload)
    group.call("setup", model_config(), trainer, dist, 1, case.kind)
    facts = group.call("engine_facts")[0]
    assert facts == {"zero_stage": zero, "offload": offload,
                     "accumulation": 1 if max_tokens else GLOBAL_BATCH // (workers * micro),
                     "fused": fused_adam, "compiled": compile}, facts
    before = group.call("full_state_dict")[0]
    batching = TokenBudget(max_tokens, case.size_of) if max_tokens else micro
    result = train_objective(group, case.objective, list(range(GLOBAL_BATCH)), case.collate,
                             batching, **case.kwargs, **extra)
    after = group.call("full_state_dict")[0]
    update = torch.cat([(after[k].float() - before[k].float()).flatten() for k in sorted(before)])
    return result.shared["grad_norm"], update


def assert_same_step(reference: tuple[float, torch.Tensor], got: tuple[float, torch.Tensor],
                     split: tuple) -> None:
    (norm_a, update_a), (norm_b, update_b) = reference, got
    assert norm_b == pytest.approx(norm_a, rel=TOLERANCE), f"grad_norm, split {split}"
    change = float((update_b - update_a).norm() / update_a.norm())
    assert change < TOLERANCE, f"parameter update differs by {change:.2e}, split {split}"


@pytest.mark.parametrize("name", list(CASES))
def test_one_step_is_the_same_for_every_split(groups, name):
    tok = load_tokenizer(model_config())
    case = CASES[name](tok)
    reference = one_step(groups, case, SPLITS[0], grad_clip=0.0)
    assert reference[0] > 0 and reference[1].abs().max() > 0
    for split in SPLITS[1:]:
        assert_same_step(reference, one_step(groups, case, split, grad_clip=0.0), split)
    # With clipping active: a threshold below the true norm but above half of it, so a
    # gradient shrunk by the accumulation steps would escape the clip and move differently.
    clip = 0.7 * reference[0]
    clipped = one_step(groups, case, SPLITS[0], grad_clip=clip)
    assert clipped[0] == pytest.approx(reference[0], rel=TOLERANCE)  # the norm before clipping
    assert float(clipped[1].norm()) < float(reference[1].norm())  # the clip acted
    for split in SPLITS[1:]:
        assert_same_step(clipped, one_step(groups, case, split, grad_clip=clip), split)


@pytest.mark.parametrize("name", list(CASES))
def test_token_budget_takes_the_whole_batchs_step(groups, name):
    """Micro-batches cut by a token budget (a few samples each, uneven, as many on every rank)
    give the step of one whole batch, under ZeRO 0, 2 (offloaded) and 3; the causal-LM
    objectives take their log-probs through the LM head in chunks of 4 tokens."""
    tok = load_tokenizer(model_config())
    case = CASES[name](tok)
    budget = 3 * max(rows * tokens for rows, tokens in map(case.size_of, range(GLOBAL_BATCH)))
    for workers, _, _ in TOKEN_SPLITS:
        ranks = shard_by_tokens(list(range(GLOBAL_BATCH)), workers,
                                TokenBudget(budget, case.size_of))
        assert len({len(rank) for rank in ranks}) == 1 and len(ranks[0]) > 1
        assert len({len(mb) for rank in ranks for mb in rank}) > 1  # sizes vary
    extra = {"logprob_chunk_size": 4} if case.kind == "causal_lm" else {}
    reference = one_step(groups, case, SPLITS[0], grad_clip=0.0)
    for workers, zero, offload in TOKEN_SPLITS:
        split = (workers, GLOBAL_BATCH // workers, zero, offload)
        got = one_step(groups, case, split, grad_clip=0.0, max_tokens=budget, **extra)
        assert_same_step(reference, got, split)


@pytest.mark.parametrize("split", [SPLITS[0], SPLITS[-1]])
def test_fused_adam_takes_the_per_tensor_loops_step(groups, split):
    """`trainer.fused_adam` changes the kernel, not the update: one clipped step
    from the same start moves the parameters alike, under ZeRO-0 and under ZeRO-2 with the
    optimizer offloaded (`one_step` checks which kernel the engine's optimizer uses)."""
    tok = load_tokenizer(model_config())
    case = CASES["sft"](tok)
    loop = one_step(groups, case, split, grad_clip=1.0, fused_adam=False)
    fused = one_step(groups, case, split, grad_clip=1.0, fused_adam=True)
    assert loop[1].abs().max() > 0
    assert_same_step(loop, fused, split)


@full_only  # compiling takes about 30 s a case on 2 cores
@pytest.mark.parametrize("name", ["sft", "ppo_critic"])
def test_compiled_model_takes_the_eager_step(groups, name):
    """`trainer.compile` changes how the forward runs, not what it computes: one clipped step
    on packed rows (sft) and on the critic, whose values are read by a hook on its head, moves
    the parameters as the eager model does, under ZeRO-2 over two workers."""
    tok = load_tokenizer(model_config())
    case = CASES[name](tok)
    split = (2, 8, 2, False)
    eager = one_step(groups, case, split, grad_clip=1.0)
    compiled = one_step(groups, case, split, grad_clip=1.0, compile=True)
    assert eager[1].abs().max() > 0
    assert_same_step(eager, compiled, split)
