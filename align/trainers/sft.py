"""SFT: supervised fine-tuning on prompt/completion pairs, conversations or plain text.

The driver tokenises the data, draws each step's global batch, splits it over the workers'
micro-batches (packed without padding, or padded), and logs. Each worker runs
`sft_objective`, a next-token loss normalised by the token count of the whole global batch.
"""

from __future__ import annotations

from typing import Any

import torch

from align.config import EMBEDDED, SFTConfig
from align.data import (
    TokenizedExample,
    collate_packed,
    collate_padded,
    length_grouped_order,
    tokenize_sft,
)
from align.losses import IGNORE_INDEX, sft_loss
from align.packed_forward import model_inputs
from align.tasks import arithmetic
from align.trainers.base import Trainer
from align.trainers.batches import (
    StepSchedule,
    load_train_eval_rows,
    shard,
    shard_evenly,
    sum_metrics,
)
from align.trainers.evaluation import (
    embedded_exact_match_rows,
    exact_match_set,
    final_exact_match,
)


def sft_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: loss of one micro-batch, as its share of the global-batch mean."""
    out = model(**model_inputs(model, batch), use_cache=False)
    loss = sft_loss(out.logits, batch["labels"], num_tokens)
    tokens = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    return loss, {"loss": loss.item(), "tokens": tokens}


def target_tokens(example: TokenizedExample) -> int:
    """Tokens that carry loss (the first token never does: nothing predicts it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


class SFTTrainer(Trainer):
    stage = "sft"

    def __init__(self, cfg: SFTConfig, show_progress: bool = True) -> None:
        super().__init__(cfg, show_progress)

    # ---------------------------------------------------------------- data

    def prepare_data(self) -> int:
        cfg = self.cfg
        train_rows, eval_rows, train_name, eval_name = self._rows()
        self.train, truncated = tokenize_sft(train_rows, self.tokenizer, cfg.data.max_length,
                                             cfg.data.completion_only_loss, train_name)
        self.eval, _ = tokenize_sft(eval_rows, self.tokenizer, cfg.data.max_length,
                                    cfg.data.completion_only_loss, eval_name)
        self.truncated = truncated
        # Exact match needs a string prompt and a string reference completion.
        self.eval_prompts, self.eval_references = exact_match_set(eval_rows,
                                                                  cfg.eval.max_samples)
        order_fn = None
        if cfg.data.group_by_length and cfg.data.packing is not True:
            lengths = [len(e.input_ids) for e in self.train]

            def order_fn(epoch: int) -> list[int] | None:
                # Padded batches only; whether they are padded is known once workers are up.
                if self.packing is not None:
                    return None
                return length_grouped_order(lengths, cfg.trainer.micro_batch_size,
                                            cfg.trainer.seed + epoch)
        self.schedule = StepSchedule(len(self.train), cfg.trainer.global_batch_size,
                                     cfg.trainer.seed, order_fn)
        return len(self.train)

    def _rows(self) -> tuple[list[dict], list[dict], str, str]:
        data = self.cfg.data
        if data.train == EMBEDDED:
            held_out = embedded_exact_match_rows(self.cfg.task)
            return (arithmetic.sft_rows(self.cfg.task), held_out, "embedded:arithmetic",
                    "embedded:arithmetic(held-out)")
        return load_train_eval_rows(data, self.cfg.trainer.seed)

    def collate(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if self.packing is not None:
            return collate_packed(examples, self.packing.row_length, pad, self.packing.attention)
        return collate_padded(examples, pad)

    # ---------------------------------------------------------------- steps

    def train_step(self, step: int) -> dict[str, float]:
        cfg = self.cfg
        examples = [self.train[i] for i in self.schedule.indices(step)]
        num_tokens = float(sum(target_tokens(e) for e in examples))
        per_rank = shard(examples, self.group.size, cfg.trainer.micro_batch_size)
        batches = [[self.collate(mb) for mb in rank] for rank in per_rank]
        results = self.group.call_each("train_step", [(sft_objective, b) for b in batches],
                                       num_tokens=num_tokens)
        metrics = sum_metrics([r["sums"] for r in results])
        return {"loss": metrics["loss"], **results[0]["shared"],
                "tokens": metrics["tokens"], "epoch": step / self.schedule.steps_per_epoch}

    def evaluate(self, final: bool) -> dict[str, float]:
        metrics: dict[str, Any] = {}
        if len(self.eval) >= self.group.size:
            num_tokens = float(sum(target_tokens(e) for e in self.eval))
            per_rank = shard_evenly(self.eval, self.group.size,
                                    self.cfg.trainer.micro_batch_size)
            batches = [[self.collate(mb) for mb in rank] for rank in per_rank]
            results = self.group.call_each("evaluate", [(sft_objective, b) for b in batches],
                                           num_tokens=num_tokens)
            metrics["eval/loss"] = sum_metrics(results)["loss"]
        if final:
            metrics.update(final_exact_match(self.group, self.tokenizer, self.eval_prompts,
                                             self.eval_references, self.cfg.eval,
                                             self.output_dir))
        return metrics
