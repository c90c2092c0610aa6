"""DPO and its variants on preference pairs, and KTO on unpaired rows (`align dpo CONFIG`).

Each micro-batch holds B pairs as 2B sequences, the B chosen then the B rejected, run through
the policy in one forward pass: packed into one padding-free row (`data.packing`, the default)
or right-padded. Per-sequence log-probs go to `align.losses.preference_loss`, whose table
`PREFERENCE_LOSSES` holds every variant (sigmoid, ipo, hinge, conservative DPO through label
smoothing, reference-free simpo and orpo, unpaired kto), plus `nll_coef` x the NLL of the
chosen completions (RPO; ORPO always adds it with weight 1). The loss is normalised by the
number of pairs (and chosen tokens, for the NLL) in the whole global batch, so the update does
not depend on how the batch is split over workers and micro-batches.

KTO (an entry whose `data` is "unpaired", see `align.trainers.kto`) trains on B rows, each a
completion labelled desirable or not. Before each step the policy scores every row's
mismatched completion (another row's, after this row's prompt) without gradient; with the
reference's log-probs of the same sequences they give the batch's reference point z0
(`kto_kl_baseline`), one number for the whole global batch. Reference log-probs come in two
columns per row, as for pairs: its own completion and its mismatched one.

The reference is a frozen copy of the starting model or, with LoRA, the same weights with the
adapter disabled (`Policy.reference_view`). With `dpo.precompute_reference` (default when the
reference would be a copy) its log-probs are computed once, before the first update, by the
policy itself (identical to the reference at that point), so no copy is ever held; they are
cached on disk (see `reference_cache_path`) and reused by reruns and resumes. Otherwise each
step first runs the reference over the step's batches (`infer(reference=True)`).

Metrics carry TRL's names: rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/chosen, logps/rejected (means over pairs), loss, and nll with RPO.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import torch

from align.config import EMBEDDED, DPOConfig, DPOSettings
from align.data import (
    PreferenceExample,
    UnpairedExample,
    collate_preference,
    collate_preference_packed,
    collate_unpaired,
)
from align.distributed import WorkerGroup
from align.losses import (
    IGNORE_INDEX,
    PREFERENCE_LOSSES,
    PreferenceLogps,
    gather_logprobs,
    kto_kl_baseline,
    preference_loss,
    preference_metrics,
    rpo_nll_share,
    sequence_logps,
    shift_for_next_token,
)
from align.trainers.base import Trainer
from align.trainers.batches import (
    StepSchedule,
    load_preference_examples,
    shard,
    shard_evenly,
    sum_metrics,
)
from align.trainers.evaluation import (
    embedded_exact_match_rows,
    exact_match_set,
    final_exact_match,
)
from align.trainers.kto import fixed_batch_order, load_unpaired_examples, unpaired_means

logger = logging.getLogger(__name__)

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
# Metrics the workers return as sums over pairs; the driver divides them by the pair count.
PAIR_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected")


# ------------------------------------------------------------------------- worker side


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of the 2B completions of a preference batch.

    Args:
        model: the causal LM (DeepSpeed engine, peft or plain module).
        batch: `collate_preference` output (2B padded rows) or `collate_preference_packed`
            output (one row; `sequence_index` says which sequence each token belongs to).

    Returns:
        (logps, lengths), each (2B,): chosen sequences first, then rejected.
    """
    device = next(model.parameters()).device
    inputs = {k: batch[k].to(device) for k in MODEL_INPUTS if k in batch}
    logits = model(**inputs, use_cache=False).logits
    logits, labels = shift_for_next_token(logits, batch["labels"].to(device))
    token_logps = gather_logprobs(logits, labels)  # (rows, T-1)
    mask = labels != IGNORE_INDEX
    if "sequence_index" in batch:
        # Packed: one (2B, N-1) mask row per sequence selects its tokens from the single row.
        index = batch["sequence_index"][:, 1:].to(device)
        sequences = torch.arange(int(batch["sequence_index"].max()) + 1, device=device)
        mask = mask & (index == sequences[:, None])
    return sequence_logps(token_logps, mask), mask.sum(-1)


def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Worker side, run through `infer`: (2B,) completion log-probs, chosen then rejected."""
    return completion_logps(model, batch)[0].detach().float().cpu()


def dpo_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  settings: DPOSettings, num_pairs: float,
                  num_chosen_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: the preference loss of one micro-batch, as its share of the global mean.

    Args:
        model: the policy.
        batch: a preference batch (see `completion_logps`), with `reference_logps` (2B,)
            unless the loss is reference-free (simpo).
        settings: the `dpo` config section.
        num_pairs: pairs in the whole global batch (all ranks and micro-batches).
        num_chosen_tokens: chosen completion tokens in the global batch (the RPO divisor).

    Returns:
        (loss, metrics): metrics in PAIR_MEANS are sums over this micro-batch's pairs; `loss`
        and `nll` are shares of the global value (both add up over micro-batches and ranks).
    """
    logps, lengths = completion_logps(model, batch)
    chosen, rejected = logps.chunk(2)
    chosen_len, rejected_len = lengths.float().chunk(2)
    ref_chosen = ref_rejected = None
    if "reference_logps" in batch:
        ref_chosen, ref_rejected = batch["reference_logps"].to(logps.device).chunk(2)
    out = preference_loss(settings.loss_type,
                          PreferenceLogps(chosen, rejected, chosen_len, rejected_len,
                                          ref_chosen, ref_rejected),
                          settings.beta, settings.gamma, settings.label_smoothing)
    pairs = len(chosen)
    loss = out.losses.sum() / num_pairs
    metrics = {k: v.item() * pairs
               for k, v in preference_metrics(out.chosen_rewards, out.rejected_rewards).items()}
    nll_weight = 1.0 if PREFERENCE_LOSSES[settings.loss_type].includes_nll else settings.nll_coef
    if nll_weight:
        nll = rpo_nll_share(chosen, chosen_len, num_chosen_tokens)
        loss = loss + nll_weight * nll
        metrics["nll"] = nll.item()
    metrics.update({"loss": loss.item(), "pairs": float(pairs),
                    "logps/chosen": chosen.sum().item(),
                    "logps/rejected": rejected.sum().item()})
    return loss, metrics


def kto_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  settings: DPOSettings, num_rows: float,
                  kl_baseline: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: the KTO loss of one micro-batch of unpaired rows, as its share of the
    global mean over rows.

    Args:
        model: the policy.
        batch: `collate_unpaired` output (B rows, own completions) with `reference_logps` (B,).
        settings: the `dpo` config section.
        num_rows: rows in the whole global batch.
        kl_baseline: the global batch's reference point z0.

    Returns:
        (loss, metrics): sums over this micro-batch's desirable / undesirable rows (see
        `align.trainers.kto.unpaired_means`) and its share of the loss.
    """
    logps, lengths = completion_logps(model, batch)
    good = batch["desirable"].to(logps.device)
    ref = batch["reference_logps"].to(logps.device)
    lengths = lengths.float()
    out = preference_loss(settings.loss_type,
                          PreferenceLogps(logps[good], logps[~good], lengths[good],
                                          lengths[~good], ref[good], ref[~good],
                                          torch.tensor(kl_baseline, device=logps.device)),
                          settings.beta, desirable_weight=settings.desirable_weight,
                          undesirable_weight=settings.undesirable_weight)
    loss = out.losses.sum() / num_rows
    return loss, {"loss": loss.item(), "desirable": float(good.sum()),
                  "undesirable": float((~good).sum()),
                  "rewards/chosen": out.chosen_rewards.sum().item(),
                  "rewards/rejected": out.rejected_rewards.sum().item(),
                  "logps/chosen": logps[good].sum().item(),
                  "logps/rejected": logps[~good].sum().item()}


# ------------------------------------------------------------------------- driver side


def chosen_targets(example: PreferenceExample) -> int:
    """Chosen tokens that carry loss (the first token of a sequence never does)."""
    return len(example.chosen_ids) - (0 if example.prompt_ids else 1)


class DPOTrainer(Trainer):
    stage = "dpo"

    def __init__(self, cfg: DPOConfig, show_progress: bool = True) -> None:
        super().__init__(cfg, show_progress)
        d = cfg.dpo
        self.reference_free = not PREFERENCE_LOSSES[d.loss_type].needs_reference
        self.unpaired = PREFERENCE_LOSSES[d.loss_type].data == "unpaired"
        auto = not cfg.model.lora.enabled  # a frozen copy costs memory; adapter-off does not
        wanted = auto if d.precompute_reference is None else d.precompute_reference
        self.precompute = wanted and not self.reference_free
        # Driver-side reference log-probs per example, (N, 2) [chosen, rejected] (unpaired:
        # [own completion, mismatched completion]); None until known (precomputed, or for eval
        # computed once on first use).
        self.reference: dict[str, torch.Tensor | None] = {"train": None, "eval": None}
        self.reference_source = "none"  # "cache" or "computed" once precomputed

    def needs_reference(self) -> bool:
        # Precomputed log-probs come from the policy before its first update: no reference.
        return not self.reference_free and not self.precompute

    # ---------------------------------------------------------------- data

    def prepare_data(self) -> int:
        cfg = self.cfg
        batch, seed = cfg.trainer.global_batch_size, cfg.trainer.seed
        order_fn = None
        if self.unpaired:
            self.train, self.eval = load_unpaired_examples(cfg, self.tokenizer)
            order_fn = partial(fixed_batch_order, len(self.train), batch, seed)
        else:
            self.train, self.eval = load_preference_examples(cfg, self.tokenizer)
        # Exact match after training: the embedded task's held-out prompts and true answers.
        scored = embedded_exact_match_rows(cfg.task) if cfg.data.train == EMBEDDED else []
        self.eval_prompts, self.eval_references = exact_match_set(scored, cfg.eval.max_samples)
        self.schedule = StepSchedule(len(self.train), batch, seed, order_fn)
        return len(self.train)

    def collate(self, examples: list[PreferenceExample] | list[UnpairedExample],
                reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch; `reference` (B, 2) becomes `reference_logps` (2B,) when given
        (unpaired rows: (B,), their own completions' column)."""
        if self.unpaired:
            batch = collate_unpaired(examples, self.tokenizer.pad_token_id,
                                     self.cfg.data.packing)
            if reference is not None:
                batch["reference_logps"] = reference[:, 0]
            return batch
        if self.cfg.data.packing:
            batch = collate_preference_packed(examples)
        else:
            batch = collate_preference(examples, self.tokenizer.pad_token_id)
            batch.pop("margin", None)  # DPO has no use for a margin column
        if reference is not None:
            batch["reference_logps"] = torch.cat([reference[:, 0], reference[:, 1]])
        return batch

    def _batches(self, split: str, per_rank: list[list[list[int]]]) -> list[list[dict]]:
        """Collated micro-batches of example indices, with reference log-probs attached:
        known ones from the driver, else computed now with the reference view."""
        examples, known = (self.train, self.reference["train"]) if split == "train" else (
            self.eval, self.reference["eval"])
        batches = [[self.collate([examples[i] for i in mb], None if known is None else known[mb])
                    for mb in rank] for rank in per_rank]
        if known is None and not self.reference_free:
            results = self.group.call_each("infer", [(reference_logps, b) for b in batches],
                                           reference=True)
            for rank_batches, rank_logps in zip(batches, results):
                for batch, logps in zip(rank_batches, rank_logps):
                    batch["reference_logps"] = logps
        return batches

    def _both_columns(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        """A batch holding both log-prob columns of every example: chosen then rejected, or
        (unpaired) own completions then mismatched ones."""
        if self.unpaired:
            return collate_unpaired(examples, self.tokenizer.pad_token_id,
                                    self.cfg.data.packing, sides=("completion", "kl"))
        return self.collate(examples)

    def _run(self, method: str, split: str, per_rank: list[list[list[int]]],
             examples: list[Any]) -> tuple[dict[str, float], dict[str, Any]]:
        """`method` ("train_step" or "evaluate") on the micro-batches `per_rank` of `split`;
        returns (metrics summed over ranks, rank 0's shared metrics)."""
        batches = self._batches(split, per_rank)
        if self.unpaired:
            kl = self._kl_baseline(split, per_rank)
            kwargs = {"settings": self.cfg.dpo, "num_rows": float(len(examples)),
                      "kl_baseline": kl}
            results = self.group.call_each(method, [(kto_objective, b) for b in batches],
                                           **kwargs)
            sums, shared = _combine(results)
            return unpaired_means(sums, kl), shared
        kwargs = {"settings": self.cfg.dpo, "num_pairs": float(len(examples)),
                  "num_chosen_tokens": float(max(1, sum(map(chosen_targets, examples))))}
        results = self.group.call_each(method, [(dpo_objective, b) for b in batches], **kwargs)
        sums, shared = _combine(results)
        return pair_means(sums), shared

    def _kl_baseline(self, split: str, per_rank: list[list[list[int]]]) -> float:
        """KTO's z0 for the rows `per_rank` of `split`: the policy's log-probs of their
        mismatched completions (no gradient) against the reference's."""
        examples, known = (self.train, self.reference["train"]) if split == "train" else (
            self.eval, self.reference["eval"])
        pad, packing = self.tokenizer.pad_token_id, self.cfg.data.packing
        batches = [[collate_unpaired([examples[i] for i in mb], pad, packing, sides=("kl",))
                    for mb in rank] for rank in per_rank]
        calls = [(reference_logps, b) for b in batches]
        policy = torch.cat([x for r in self.group.call_each("infer", calls) for x in r])
        if known is not None:
            ref = known[[i for rank in per_rank for mb in rank for i in mb], 1]
        else:
            ref = torch.cat([x for r in self.group.call_each("infer", calls, reference=True)
                             for x in r])
        return kto_kl_baseline(policy, ref).item()

    # ---------------------------------------------------------------- reference

    def build_workers(self) -> WorkerGroup:
        group = super().build_workers()
        if self.precompute:
            self.group = group
            try:
                self._precompute_reference()
            except BaseException:
                group.shutdown()
                raise
        return group

    def _precompute_reference(self) -> None:
        """Reference log-probs of every train and eval pair, from the cache or computed now.

        Runs before any checkpoint is loaded, while the policy still equals the reference.
        """
        path = reference_cache_path(self.cfg, self.output_dir, self.train + self.eval)
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            self.reference = {"train": cached["train"], "eval": cached["eval"]}
            self.reference_source = "cache"
            logger.info("reference log-probs read from %s", path)
        else:
            self.reference["train"] = self._logps_of(self.train, reference=False)
            if len(self.eval) >= self.group.size:
                self.reference["eval"] = self._logps_of(self.eval, reference=False)
            self.reference_source = "computed"
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            torch.save(self.reference, tmp)
            os.replace(tmp, path)  # a killed run never leaves a half-written cache
            logger.info("reference log-probs cached in %s", path)

    def _logps_of(self, examples: list[PreferenceExample], reference: bool) -> torch.Tensor:
        """(N, 2) log-probs of every pair under the policy as it is now (or its reference
        view), computed by all workers."""
        per_rank = shard_evenly(list(range(len(examples))), self.group.size,
                                self.cfg.trainer.micro_batch_size)
        batches = [[self._both_columns([examples[i] for i in mb]) for mb in rank]
                   for rank in per_rank]
        results = self.group.call_each("infer", [(reference_logps, b) for b in batches],
                                       reference=reference)
        out = torch.zeros(len(examples), 2)
        for rank, rank_logps in zip(per_rank, results):
            for mb, logps in zip(rank, rank_logps):
                out[mb] = torch.stack(logps.chunk(2), dim=1)
        return out

    # ---------------------------------------------------------------- steps

    def train_step(self, step: int) -> dict[str, float]:
        indices = self.schedule.indices(step)
        per_rank = shard(indices, self.group.size, self.cfg.trainer.micro_batch_size)
        means, shared = self._run("train_step", "train", per_rank,
                                  [self.train[i] for i in indices])
        return {**means, **shared, "epoch": step / self.schedule.steps_per_epoch}

    def evaluate(self, final: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if len(self.eval) >= self.group.size:
            if self.reference["eval"] is None and not self.reference_free:
                # The reference never changes: its held-out log-probs are computed once.
                self.reference["eval"] = self._logps_of(self.eval, reference=True)
            # Every rank runs the same number of forward passes (ZeRO-3 gathers collectively).
            per_rank = shard_evenly(list(range(len(self.eval))), self.group.size,
                                    self.cfg.trainer.micro_batch_size)
            means, _ = self._run("evaluate", "eval", per_rank, self.eval)
            metrics = {f"eval/{k}": v for k, v in means.items()}
            metrics["eval/rows" if self.unpaired else "eval/pairs"] = len(self.eval)
        if final:
            metrics.update(final_exact_match(self.group, self.tokenizer, self.eval_prompts,
                                             self.eval_references, self.cfg.eval,
                                             self.output_dir))
        return metrics


def _combine(results: list[dict[str, Any]]) -> tuple[dict[str, float], dict[str, Any]]:
    """Per-rank results of `train_step` ({sums, shared}) or `evaluate` (sums) as (metrics
    summed over ranks, rank 0's shared metrics)."""
    if results and "sums" in results[0]:
        return sum_metrics([r["sums"] for r in results]), results[0]["shared"]
    return sum_metrics(results), {}


def pair_means(sums: dict[str, float]) -> dict[str, float]:
    """Driver side: TRL's metric names from the workers' summed contributions."""
    means = {k: sums[k] / sums["pairs"] for k in PAIR_MEANS}
    extra = {k: sums[k] for k in ("nll",) if k in sums}
    return {"loss": sums["loss"], **means, **extra}


def reference_cache_path(cfg: DPOConfig, output_dir: Path,
                         examples: list[PreferenceExample] | list[UnpairedExample]) -> Path:
    """Where precomputed reference log-probs live: `dpo.reference_cache_dir` (default
    `output_dir/reference_logps/`), in a file named by a hash of everything they depend on:
    the model (name, and for a local folder its files' sizes and times), dtype, tokenizer, data
    source, max_length, and the token ids of every pair (or unpaired row, with its mismatched
    completion)."""
    model = cfg.model
    if model.name_or_path == EMBEDDED:
        identity: Any = asdict(model.embedded)
    elif Path(model.name_or_path).is_dir():
        folder = Path(model.name_or_path).resolve()
        identity = [str(folder)] + [[f.name, f.stat().st_size, f.stat().st_mtime_ns]
                                    for f in sorted(folder.iterdir()) if f.is_file()]
    else:
        identity = model.name_or_path  # a hub name
    key = {"model": identity, "dtype": model.dtype, "attn": model.attn_implementation,
           "tokenizer": model.tokenizer or model.name_or_path,
           "data": [cfg.data.train, cfg.data.eval, cfg.data.split, cfg.data.eval_fraction],
           "max_length": cfg.data.max_length}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for e in examples:
        ids = ((e.prompt_ids, e.completion_ids, e.kl_completion_ids)
               if isinstance(e, UnpairedExample) else (e.prompt_ids, e.chosen_ids, e.rejected_ids))
        digest.update(repr(ids).encode())
    folder = Path(cfg.dpo.reference_cache_dir) if cfg.dpo.reference_cache_dir else (
        output_dir / "reference_logps")
    return folder / f"{digest.hexdigest()[:20]}.pt"
