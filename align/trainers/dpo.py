"""DPO and its variants on preference pairs, and KTO on unpaired rows (`align dpo CONFIG`).

Each micro-batch holds B pairs as 2B sequences, the B chosen then the B rejected, run through
the policy in one forward pass: packed into rows of bounded length (`data.packing`, see
`align.data.packing`) or right-padded. Per-sequence log-probs go to
`align.losses.preference_loss`, whose table `PREFERENCE_LOSSES` holds every variant (sigmoid,
ipo, hinge, conservative DPO through label smoothing, reference-free simpo and orpo, unpaired
kto), plus `nll_coef` x the NLL of the chosen completions (RPO; ORPO always adds it with
weight 1). The loss is normalised by the number of pairs (and chosen tokens, for the NLL) in
the whole global batch, so the update does not depend on how the batch is split over workers
and micro-batches.

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

from align.chunked_logprobs import FULL_LOGITS, logprob_source
from align.config import EMBEDDED, DPOConfig, DPOSettings
from align.data import (
    PreferenceExample,
    UnpairedExample,
    collate_preference,
    collate_preference_packed,
    collate_unpaired,
    example_size,
)
from align.data.layout import batch_layout
from align.data.tables import take
from align.distributed import WorkerGroup
from align.losses import (
    PREFERENCE_LOSSES,
    PreferenceLogps,
    kto_kl_baseline,
    preference_loss,
    preference_metrics,
    rpo_nll_share,
)
from align.packed_forward import Packing
from align.trainers.base import Trainer
from align.trainers.batches import MicroBatching, StepSchedule, micro_batching, shard, shard_evenly
from align.trainers.dispatch import (
    call_infer,
    call_objective,
    can_split,
    collated_shards,
    infer_in_chunks,
)
from align.trainers.evaluation import exact_match_set, final_exact_match
from align.trainers.kto import fixed_batch_order, load_unpaired_examples, unpaired_means
from align.trainers.stage_data import load_preference_examples, stage_evaluator, stage_rows

logger = logging.getLogger(__name__)

# Metrics the workers return as sums over pairs; the driver divides them by the pair count.
PAIR_MEANS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
              "logps/chosen", "logps/rejected")


# ------------------------------------------------------------------------- worker side


def completion_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                     logprob_chunk_size: int = FULL_LOGITS) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs and token counts of the 2B completions of a preference batch.

    Args:
        model: the causal LM (DeepSpeed engine, peft or plain module).
        batch: `collate_preference` output (2B padded rows) or `collate_preference_packed`
            output (packed rows, each pair's prompt laid out once where that pays); its layout
            (`align.data.layout`) reads each sequence's sums.
        logprob_chunk_size: tokens per chunk through the LM head (`align.chunked_logprobs`);
            0: the full logits.

    Returns:
        (logps, lengths), each (2B,): chosen sequences first, then rejected.
    """
    source = logprob_source(model, batch, logprob_chunk_size)
    return batch_layout(batch).sequence_logprobs(source, batch)


def reference_logps(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                    logprob_chunk_size: int = FULL_LOGITS) -> torch.Tensor:
    """Worker side, run through `infer`: (2B,) completion log-probs, chosen then rejected."""
    return completion_logps(model, batch, logprob_chunk_size)[0].detach().float().cpu()


def dpo_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  settings: DPOSettings, num_pairs: float, num_chosen_tokens: float,
                  logprob_chunk_size: int = FULL_LOGITS) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: the preference loss of one micro-batch, as its share of the global mean.

    Args:
        model: the policy.
        batch: a preference batch (see `completion_logps`), with `reference_logps` (2B,)
            unless the loss is reference-free (simpo).
        settings: the `dpo` config section.
        num_pairs: pairs in the whole global batch (all ranks and micro-batches).
        num_chosen_tokens: chosen completion tokens in the global batch (the RPO divisor).
        logprob_chunk_size: as `completion_logps`.

    Returns:
        (loss, metrics): metrics in PAIR_MEANS are sums over this micro-batch's pairs; `loss`
        and `nll` are shares of the global value (both add up over micro-batches and ranks).
    """
    logps, lengths = completion_logps(model, batch, logprob_chunk_size)
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
                  settings: DPOSettings, num_rows: float, kl_baseline: float,
                  logprob_chunk_size: int = FULL_LOGITS) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: the KTO loss of one micro-batch of unpaired rows, as its share of the
    global mean over rows.

    Args:
        model: the policy.
        batch: `collate_unpaired` output (B rows, own completions) with `reference_logps` (B,).
        settings: the `dpo` config section.
        num_rows: rows in the whole global batch.
        kl_baseline: the global batch's reference point z0.
        logprob_chunk_size: as `completion_logps`.

    Returns:
        (loss, metrics): sums over this micro-batch's desirable / undesirable rows (see
        `align.trainers.kto.unpaired_means`) and its share of the loss.
    """
    logps, lengths = completion_logps(model, batch, logprob_chunk_size)
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


class DPOTrainer(Trainer[DPOConfig]):
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
        # Every log-prob forward's head runs over chunks of this many tokens.
        self.chunking = {"logprob_chunk_size": cfg.trainer.logprob_chunk_size}

    def needs_reference(self) -> bool:
        # Precomputed log-probs come from the policy before its first update: no reference.
        return not self.reference_free and not self.precompute

    # ---------------------------------------------------------------- data

    def prepare_data(self) -> int:
        cfg = self.cfg
        batch, seed = cfg.trainer.global_batch_size, cfg.trainer.seed
        order_fn = None
        if self.unpaired:
            self.train, self.eval, self.data_metrics = load_unpaired_examples(
                cfg, self.tokenizer, self.show_progress)
            order_fn = partial(fixed_batch_order, len(self.train), batch, seed)
        else:
            data = load_preference_examples(cfg, self.tokenizer, self.show_progress)
            self.train, self.eval = data.train, data.held_out
            self.data_metrics = data.skip_metrics()
        # Exact match after training: the embedded task's held-out prompts and true answers.
        scored = stage_rows(cfg, "sft").held_out if cfg.data.train == EMBEDDED else []
        self.eval_prompts, self.eval_references = exact_match_set(scored, cfg.eval.max_samples)
        self.schedule = StepSchedule(len(self.train), batch, seed, order_fn)
        return len(self.train)

    def collate(self, examples: list[PreferenceExample] | list[UnpairedExample],
                reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """One micro-batch; `reference` (B, 2) becomes `reference_logps` (2B,) when given
        (unpaired rows: (B,), their own completions' column)."""
        pad, packing = self.tokenizer.pad_token_id, self.packing
        if self.unpaired:
            batch = self._unpaired(examples, ("completion",))
            if reference is not None:
                batch["reference_logps"] = reference[:, 0]
            return batch
        if packing is not None:
            batch = collate_preference_packed(examples, packing.row_length, pad,
                                              packing.attention, packing.share_prefix)
        else:
            batch = collate_preference(examples, pad)
        batch.pop("margin", None)  # DPO has no use for a margin column
        if reference is not None:
            batch["reference_logps"] = torch.cat([reference[:, 0], reference[:, 1]])
        return batch

    def _batches(self, split: str, indices: list[int], evenly: bool) -> list[list[dict]]:
        """Per rank, collated micro-batches of the examples `indices` of `split`, with
        reference log-probs attached: known ones from the driver, else computed now with the
        reference view on these very batches."""
        examples, known = (self.train, self.reference["train"]) if split == "train" else (
            self.eval, self.reference["eval"])

        def collate(mb: list[int]) -> dict[str, torch.Tensor]:
            return self.collate(take(examples, mb), None if known is None else known[mb])

        batches = collated_shards(indices, self.group, self._micro(examples), collate, evenly)
        if known is None and not self.reference_free:
            results = call_infer(self.group, reference_logps, batches, reference=True,
                                 **self.chunking)
            for rank_batches, rank_logps in zip(batches, results):
                for batch, logps in zip(rank_batches, rank_logps):
                    batch["reference_logps"] = logps
        return batches

    def _micro(self, examples: Any) -> MicroBatching:
        """How micro-batches of indices into `examples` are cut (`trainer.micro_batch_size`
        or `trainer.max_tokens_per_micro_batch`)."""
        return micro_batching(self.cfg.trainer, lambda i: example_size(examples[i]))

    def _unpaired(self, examples: list[UnpairedExample],
                  sides: tuple[str, ...]) -> dict[str, torch.Tensor]:
        packing = self.packing
        return collate_unpaired(examples, self.tokenizer.pad_token_id,
                                None if packing is None else packing.row_length,
                                None if packing is None else packing.attention, sides)

    def _both_columns(self, examples: list[Any]) -> dict[str, torch.Tensor]:
        """A batch holding both log-prob columns of every example: chosen then rejected, or
        (unpaired) own completions then mismatched ones."""
        if self.unpaired:
            return self._unpaired(examples, ("completion", "kl"))
        return self.collate(examples)

    def _run(self, method: str, split: str, indices: list[int],
             evenly: bool) -> tuple[dict[str, float], dict[str, float]]:
        """`method` ("train_step" or "evaluate") on the examples `indices` of `split`; returns
        (the TRL-named means, rank 0's shared metrics)."""
        examples = take(self.train if split == "train" else self.eval, indices)
        batches = self._batches(split, indices, evenly)
        if self.unpaired:
            kl = self._kl_baseline(split, indices, evenly)
            result = call_objective(self.group, method, kto_objective, batches,
                                    settings=self.cfg.dpo, num_rows=float(len(examples)),
                                    kl_baseline=kl, **self.chunking)
            return unpaired_means(result.sums, kl), result.shared
        result = call_objective(
            self.group, method, dpo_objective, batches, settings=self.cfg.dpo,
            num_pairs=float(len(examples)),
            num_chosen_tokens=float(max(1, sum(map(chosen_targets, examples)))),
            **self.chunking)
        return pair_means(result.sums), result.shared

    def _kl_baseline(self, split: str, indices: list[int], evenly: bool) -> float:
        """KTO's z0 for the rows `indices` of `split`: the policy's log-probs of their
        mismatched completions (no gradient) against the reference's."""
        examples, known = (self.train, self.reference["train"]) if split == "train" else (
            self.eval, self.reference["eval"])
        split_fn = shard_evenly if evenly else shard
        parts = split_fn(indices, self.group.size, self._micro(examples))
        order = [i for rank in parts for mb in rank for i in mb]
        batches = [[self._unpaired([examples[i] for i in mb], ("kl",)) for mb in rank]
                   for rank in parts]
        policy = torch.cat([x for r in call_infer(self.group, reference_logps, batches,
                                                  **self.chunking) for x in r])
        if known is not None:
            ref = known[order, 1]
        else:
            ref = torch.cat([x for r in call_infer(self.group, reference_logps, batches,
                                                   reference=True, **self.chunking) for x in r])
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
        path = reference_cache_path(self.cfg, self.output_dir, [*self.train, *self.eval],
                                    self.packing)
        if path.is_file():
            cached = torch.load(path, weights_only=True)
            self.reference = {"train": cached["train"], "eval": cached["eval"]}
            self.reference_source = "cache"
            logger.info("reference log-probs read from %s", path)
        else:
            self.reference["train"] = self._logps_of(self.train, reference=False)
            if can_split(self.group, len(self.eval)):
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
        out = torch.zeros(len(examples), 2)
        for mb, logps in infer_in_chunks(
                self.group, reference_logps, len(examples),
                lambda idx: self._both_columns(take(examples, idx)),
                self._micro(examples), reference=reference, **self.chunking):
            out[mb] = torch.stack(logps.chunk(2), dim=1)
        return out

    # ---------------------------------------------------------------- steps

    def train_step(self, step: int) -> dict[str, float]:
        indices = self.schedule.indices(step)
        means, shared = self._run("train_step", "train", indices, evenly=False)
        return {**means, **shared, "epoch": step / self.schedule.steps_per_epoch}

    def evaluate(self, final: bool) -> dict[str, float]:
        metrics: dict[str, float] = {}
        if can_split(self.group, len(self.eval)):
            if self.reference["eval"] is None and not self.reference_free:
                # The reference never changes: its held-out log-probs are computed once.
                self.reference["eval"] = self._logps_of(self.eval, reference=True)
            means, _ = self._run("evaluate", "eval", list(range(len(self.eval))), evenly=True)
            metrics = {f"eval/{k}": v for k, v in means.items()}
            metrics["eval/rows" if self.unpaired else "eval/pairs"] = len(self.eval)
        if final:
            metrics.update(final_exact_match(self.group, self.tokenizer, self.eval_prompts,
                                             self.eval_references, self.cfg.eval,
                                             self.output_dir, stage_evaluator(self.cfg)))
        return metrics


def pair_means(sums: dict[str, float]) -> dict[str, float]:
    """Driver side: TRL's metric names from the workers' summed contributions."""
    means = {k: sums[k] / sums["pairs"] for k in PAIR_MEANS}
    extra = {k: sums[k] for k in ("nll",) if k in sums}
    return {"loss": sums["loss"], **means, **extra}


def reference_cache_path(cfg: DPOConfig, output_dir: Path,
                         examples: list[PreferenceExample] | list[UnpairedExample],
                         packing: Packing | None = None) -> Path:
    """Where precomputed reference log-probs live: `dpo.reference_cache_dir` (default
    `output_dir/reference_logps/`), in a file named by a hash of everything they depend on:
    the model (name, and for a local folder its files' sizes and times), dtype, tokenizer, data
    source, max_length, the batch layout (packing), and the token ids of every pair (or
    unpaired row, with its mismatched completion)."""
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
           "max_length": cfg.data.max_length,
           "packing": None if packing is None else [packing.attention, packing.row_length]}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode())
    for e in examples:
        ids = ((e.prompt_ids, e.completion_ids, e.kl_completion_ids)
               if isinstance(e, UnpairedExample) else (e.prompt_ids, e.chosen_ids, e.rejected_ids))
        digest.update(repr(ids).encode())
    folder = Path(cfg.dpo.reference_cache_dir) if cfg.dpo.reference_cache_dir else (
        output_dir / "reference_logps")
    return folder / f"{digest.hexdigest()[:20]}.pt"
