"""Reward model: a Bradley-Terry scorer trained on preference pairs (`align rm CONFIG`).

The model is `AutoModelForSequenceClassification(num_labels=1)` held by the same Policy as
every stage (LoRA and ZeRO 0-3 apply). Each micro-batch holds B pairs as 2B sequences, chosen
then rejected, packed into rows of bounded length (`data.packing`) or right-padded, and scored
in one forward pass; the loss is -logsigmoid(r_c - r_r - margin)
plus an optional centring term (`align.losses.pairwise_loss`), normalised by the number of
pairs in the whole global batch so the update does not depend on how it is split over workers.
Metrics are TRL's: accuracy, margin, mean_reward, min_reward, max_reward.

With `mining.policy` set, pairs mined from that policy's own samples join the training pairs
(align.trainers.mining).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from align.config import RMConfig
from align.data import (
    PreferenceExample,
    collate_preference,
    collate_preference_packed,
    example_size,
    load_rows,
    tokenize_preference,
)
from align.data.sources import rename_columns
from align.data.tables import take
from align.losses import pairwise_loss
from align.trainers.base import Trainer
from align.trainers.batches import StepSchedule, micro_batching
from align.trainers.dispatch import evaluate_objective, train_objective
from align.trainers.mining import MinedPairs, mine
from align.trainers.stage_data import load_preference_examples, stage_rows
from reward_models.reward_model import pair_means, pair_sums, score_batch


def reward_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_pairs: float,
                     center_coef: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: the pairwise loss of one micro-batch, as its share of the global-batch mean.

    Args:
        model: the sequence classifier (DeepSpeed engine or plain module).
        batch: `collate_preference` or `collate_preference_packed` output (2B sequences,
            chosen first); `margin` (B,) when the data has one.
        num_pairs: pairs in the whole global batch (all ranks and micro-batches).
        center_coef: weight of the reward-centring term.
    """
    chosen, rejected = score_batch(model, batch).chunk(2)
    margin = batch.get("margin")
    if margin is not None:
        margin = margin.to(chosen.device)
    loss = pairwise_loss(chosen, rejected, margin, center_coef) * (len(chosen) / num_pairs)
    return loss, {"loss": loss.item(), **pair_sums(chosen, rejected)}


class RewardTrainer(Trainer[RMConfig]):
    stage = "rm"
    model_kind = "sequence_classification"

    # ---------------------------------------------------------------- data

    def prepare_data(self) -> int:
        cfg = self.cfg
        data = load_preference_examples(cfg, self.tokenizer, self.show_progress)
        self.train, self.eval = data.train, data.held_out
        self.data_metrics = data.skip_metrics()
        self.mined = None
        if cfg.mining.policy is not None:
            self.mined = self._mine()
            source = f"mined from {cfg.mining.policy}"
            mined = tokenize_preference(self.mined.rows, self.tokenizer, cfg.data.max_length,
                                        source)
            self.train = [*self.train, *mined * cfg.mining.repeat]  # mined sets are small
        self.schedule = StepSchedule(len(self.train), cfg.trainer.global_batch_size,
                                     cfg.trainer.seed)
        return len(self.train)

    def _mine(self) -> MinedPairs:
        cfg, mining = self.cfg, self.cfg.mining
        if mining.prompts is None:
            rows = stage_rows(cfg, "rl")
            prompts, source = rows.train, rows.train_name
        else:
            prompts, source = rename_columns(load_rows(mining.prompts, cfg.data.split),
                                             cfg.data.columns, mining.prompts), mining.prompts
        print(f"mining: sampling {mining.samples_per_prompt} completions for up to "
              f"{mining.num_prompts or len(prompts)} prompts from {mining.policy}", flush=True)
        mined = mine(mining, prompts, source, cfg.data.max_length, cfg.trainer.seed)
        print("mining: " + ", ".join(f"{k.split('/')[1]} {v:g}"
                                      for k, v in mined.stats.items()), flush=True)
        return mined

    def write_derived(self, out: Path) -> None:
        if self.mined is not None:
            with (out / "mined_pairs.jsonl").open("w") as f:
                f.writelines(json.dumps(row) + "\n" for row in self.mined.rows)

    def collate(self, examples: list[PreferenceExample]) -> dict[str, torch.Tensor]:
        pad, packing = self.tokenizer.pad_token_id, self.packing
        if packing is not None:
            batch = collate_preference_packed(examples, packing.row_length, pad,
                                              packing.attention, packing.share_prefix)
        else:
            batch = collate_preference(examples, pad)
        batch.pop("labels", None)  # scores need no labels; less to ship to the workers
        if not self.cfg.rm.use_margin:
            batch.pop("margin", None)
        return batch

    def _objective_kwargs(self, num_pairs: int) -> dict[str, float]:
        return {"num_pairs": float(num_pairs), "center_coef": self.cfg.rm.center_coef}

    # ---------------------------------------------------------------- steps

    def train_step(self, step: int) -> dict[str, float]:
        examples = take(self.train, self.schedule.indices(step))
        result = train_objective(self.group, reward_objective, examples, self.collate,
                                 micro_batching(self.cfg.trainer, example_size),
                                 **self._objective_kwargs(len(examples)))
        return {"loss": result.sums["loss"], **pair_means(result.sums), **result.shared,
                "epoch": step / self.schedule.steps_per_epoch}

    def evaluate(self, final: bool) -> dict[str, float]:
        sums = evaluate_objective(self.group, reward_objective, self.eval, self.collate,
                                  micro_batching(self.cfg.trainer, example_size),
                                  **self._objective_kwargs(len(self.eval)))
        if not sums:
            return {}
        metrics = {"loss": sums["loss"], **pair_means(sums), "pairs": len(self.eval)}
        out = {f"eval/{key}": value for key, value in metrics.items()}
        if final and self.mined is not None:
            out.update(self.mined.stats)
        return out
