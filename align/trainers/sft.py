"""SFT: supervised fine-tuning on prompt/completion pairs, conversations or plain text.

The driver tokenises the data, draws each step's global batch, splits it over the workers'
micro-batches (packed without padding, or padded), and logs. Each worker runs
`sft_objective`, a next-token loss normalised by the token count of the whole global batch.
"""

from __future__ import annotations

from typing import Any

import torch

from align.chunked_logprobs import FULL_LOGITS, logprob_source
from align.config import SFTConfig
from align.data import (
    TokenizedExample,
    collate_packed,
    collate_padded,
    example_size,
    length_grouped_order,
)
from align.data.layout import row_positions
from align.data.prepare import sft_encoder
from align.data.sft import sft_examples
from align.losses import IGNORE_INDEX, sft_loss_from_logprobs
from align.trainers.base import Trainer
from align.trainers.batches import StepSchedule, micro_batching
from align.trainers.dispatch import evaluate_objective, train_objective
from align.trainers.evaluation import exact_match_set, final_exact_match
from align.trainers.stage_data import stage_evaluator, stage_examples


def sft_objective(model: torch.nn.Module, batch: dict[str, torch.Tensor], num_tokens: float,
                  logprob_chunk_size: int = FULL_LOGITS) -> tuple[torch.Tensor, dict[str, float]]:
    """Worker side: loss of one micro-batch, as its share of the global-batch mean; the LM
    head runs over chunks of `logprob_chunk_size` tokens (`align.chunked_logprobs`; 0: the
    full logits). The labels are in the batch's rows, packed or padded alike."""
    labels = batch["labels"]
    source = logprob_source(model, batch, logprob_chunk_size)
    token_logps, _ = source.logprobs(row_positions(labels), labels[:, 1:])
    loss = sft_loss_from_logprobs(token_logps, num_tokens)
    tokens = int((labels[:, 1:] != IGNORE_INDEX).sum())
    return loss, {"loss": loss.item(), "tokens": tokens}


def target_tokens(example: TokenizedExample) -> int:
    """Tokens that carry loss (the first token never does: nothing predicts it)."""
    return sum(1 for label in example.labels[1:] if label != IGNORE_INDEX)


class SFTTrainer(Trainer[SFTConfig]):
    stage = "sft"

    # ---------------------------------------------------------------- data

    def prepare_data(self) -> int:
        cfg = self.cfg
        data = stage_examples(cfg, "sft", sft_encoder(cfg.data.max_length,
                                                      cfg.data.completion_only_loss,
                                                      cfg.data.on_unusable),
                              self.tokenizer, sft_examples, self.show_progress)
        self.train, self.eval = data.train, data.held_out
        self.data_metrics = data.skip_metrics()
        self.truncated = data.truncated()
        # Exact match needs a string prompt and a string reference completion.
        self.eval_prompts, self.eval_references = exact_match_set(data.held_out_rows(),
                                                                  cfg.eval.max_samples)
        order_fn = None
        if cfg.data.group_by_length and cfg.data.packing is not True:
            lengths = self.train.column("length").tolist()

            def order_fn(epoch: int) -> list[int] | None:
                # Padded batches only; whether they are padded is known once workers are up.
                if self.packing is not None:
                    return None
                return length_grouped_order(lengths, cfg.trainer.micro_batch_size,
                                            cfg.trainer.seed + epoch)
        self.schedule = StepSchedule(len(self.train), cfg.trainer.global_batch_size,
                                     cfg.trainer.seed, order_fn)
        return len(self.train)

    def collate(self, examples: list[TokenizedExample]) -> dict[str, torch.Tensor]:
        pad = self.tokenizer.pad_token_id
        if self.packing is not None:
            return collate_packed(examples, self.packing.row_length, pad, self.packing.attention)
        return collate_padded(examples, pad)

    # ---------------------------------------------------------------- steps

    def train_step(self, step: int) -> dict[str, float]:
        examples = self.train.take(self.schedule.indices(step))
        num_tokens = float(sum(target_tokens(e) for e in examples))
        result = train_objective(self.group, sft_objective, examples, self.collate,
                                 micro_batching(self.cfg.trainer, example_size),
                                 num_tokens=num_tokens,
                                 logprob_chunk_size=self.cfg.trainer.logprob_chunk_size)
        return {"loss": result.sums["loss"], **result.shared, "tokens": result.sums["tokens"],
                "epoch": step / self.schedule.steps_per_epoch}

    def evaluate(self, final: bool) -> dict[str, float]:
        metrics: dict[str, Any] = {}
        num_tokens = float(sum(target_tokens(e) for e in self.eval))
        sums = evaluate_objective(self.group, sft_objective, self.eval, self.collate,
                                  micro_batching(self.cfg.trainer, example_size),
                                  num_tokens=num_tokens,
                                  logprob_chunk_size=self.cfg.trainer.logprob_chunk_size)
        if sums:
            metrics["eval/loss"] = sums["loss"]
        if final:
            metrics.update(final_exact_match(self.group, self.tokenizer, self.eval_prompts,
                                             self.eval_references, self.cfg.eval,
                                             self.output_dir, stage_evaluator(self.cfg)))
        return metrics
