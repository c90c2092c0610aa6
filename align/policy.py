"""Policy: one DeepSpeed rank of a Hugging Face model (optionally with LoRA adapters).

This is the only place that hands a model to `deepspeed.initialize`. A Policy lives inside a
Ray actor (see `align.distributed`); every method that touches ZeRO-3 partitioned weights
(`generate`, `save`, `full_state_dict`) must be called on all ranks of the group at once.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from transformers import get_scheduler

from align.config import DistributedConfig, ModelConfig, TrainerConfig
from align.data.layout import BatchLayout
from align.deepspeed_setup import skip_cpu_shm_comm_op
from align.errors import TrainingError
from align.metrics import accumulate
from align.model_loading import (
    ModelKind,
    apply_lora,
    disable_dropout,
    is_embedded,
    load_model,
    load_tokenizer,
    resolve_dtype,
)
from align.rollout.base import Generation, Sampling
from align.rollout.drafts import NgramDrafts
from align.rollout.eos import eos_token_ids
from align.rollout.hf_sampling import hf_sample
from align.rollout.kv_cache import PrefixCache

# objective(model, micro_batch, **kwargs) -> (loss, metrics). Metrics are contributions that
# combine over micro-batches and ranks by `align.metrics.combine_metric` (sums; min_/max_ keys).
Objective = Callable[..., tuple[torch.Tensor, dict[str, float]]]


def deepspeed_config(trainer: TrainerConfig, dist_cfg: DistributedConfig, world_size: int,
                     dtype: torch.dtype) -> dict[str, Any]:
    """The DeepSpeed JSON config for one trainable model. With a token budget the count of
    micro-batches varies from step to step: `Policy.train_step` marks the last one itself."""
    micro = trainer.micro_batch_size
    if trainer.max_tokens_per_micro_batch > 0:
        micro = trainer.global_batch_size // world_size
    accumulation = trainer.global_batch_size // (micro * world_size)
    zero: dict[str, Any] = {"stage": dist_cfg.zero_stage}
    # fp32 ZeRO-0 clips in Policy.train_step, measuring the norm in the same pass.
    clipping = 0.0 if clips_in_policy(dist_cfg, dtype) else trainer.grad_clip
    if dist_cfg.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu"}
    return {
        "train_batch_size": trainer.global_batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": clipping,
        "optimizer": {"type": "AdamW", "params": {
            "lr": trainer.lr, "betas": list(trainer.adam_betas), "eps": trainer.adam_eps,
            "weight_decay": trainer.weight_decay, "torch_adam": True,
            # One vectorised kernel over all tensors: 5x faster than the per-tensor loop on CPU.
            "fused": trainer.fused_adam}},
        # torch's AdamW also runs on offloaded states; DeepSpeedCPUAdam would need a C++ build.
        "zero_force_ds_cpu_optimizer": False,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "fp16": {"enabled": dtype == torch.float16},
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }


def clips_in_policy(dist_cfg: DistributedConfig, dtype: torch.dtype) -> bool:
    """Whether the Policy clips gradients itself: fp32 under ZeRO-0, where DeepSpeed would
    measure the norm in a loop over tensors and keep it from us, so it was measured twice."""
    return dist_cfg.zero_stage == 0 and dtype == torch.float32


def warmup_steps(trainer: TrainerConfig, total_steps: int) -> int:
    if trainer.warmup_steps > 0:
        return trainer.warmup_steps
    return math.ceil(trainer.warmup_ratio * total_steps)


class Policy:
    """A model, its tokenizer, optional LoRA, and (when trainable) its DeepSpeed engine."""

    def __init__(self, model_cfg: ModelConfig, trainer_cfg: TrainerConfig,
                 dist_cfg: DistributedConfig, total_steps: int, kind: ModelKind = "causal_lm",
                 trainable: bool = True, reference: bool = False) -> None:
        self.model_cfg, self.kind = model_cfg, kind
        self.zero_stage = dist_cfg.zero_stage
        self.tokenizer = load_tokenizer(model_cfg)
        self.eos_ids = eos_token_ids(model_cfg, self.tokenizer)
        self.dtype = resolve_dtype(model_cfg.dtype)
        model = load_model(model_cfg, self.tokenizer, kind)
        if model_cfg.lora.enabled:
            model = apply_lora(model, model_cfg.lora, kind)
        if model_cfg.disable_dropout:  # train-mode forwards then equal eval-mode ones
            disable_dropout(model)
        self.compiled = trainable and trainer_cfg.compile
        if self.compiled:  # in place: state-dict keys and saving are unchanged
            model.compile(dynamic=True)
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.ds_engine = None
        # Keys and values of the rows `generate` ran, for the next call's rows that extend
        # them (an episode's next turn); cleared whenever the weights change.
        self.prefix_cache = PrefixCache(0)
        self.drafts: NgramDrafts | None = None  # guesses from earlier text (hf_decode)
        skip_cpu_shm_comm_op()  # deepspeed.initialize may start the comm backend itself
        if trainable:
            ds_cfg = deepspeed_config(trainer_cfg, dist_cfg, self.world_size, self.dtype)
            scheduler = _scheduler_factory(trainer_cfg, total_steps)
            params = [p for p in model.parameters() if p.requires_grad]
            self.ds_engine, *_ = deepspeed.initialize(model=model, model_parameters=params,
                                                   config=ds_cfg, lr_scheduler=scheduler)
            self.model = self.ds_engine.module
            if self.world_size == 1 and self.zero_stage == 0:
                # One rank has nothing to reduce: skip DeepSpeed's flatten-reduce-unflatten of
                # every gradient after backward (a quarter of the backward's time on CPU).
                self.ds_engine.enable_backward_allreduce = False
        else:
            self.model = self._frozen(model, dist_cfg)
        self.grad_clip = trainer_cfg.grad_clip
        self.by_tokens = trainer_cfg.max_tokens_per_micro_batch > 0
        self.clips_itself = trainable and clips_in_policy(dist_cfg, self.dtype)
        # The reference: with LoRA, the same weights with the adapter off (no second copy).
        self.has_reference = reference
        self.reference_model = None
        if reference and not model_cfg.lora.enabled:
            self.reference_model = self._frozen(load_model(model_cfg, self.tokenizer, kind),
                                                dist_cfg)
            if self.compiled:
                self.reference_model.compile(dynamic=True)

    def _frozen(self, model: torch.nn.Module, dist_cfg: DistributedConfig) -> torch.nn.Module:
        """An inference-only model: under ZeRO-3 partitioned like the trained one; under ZeRO
        0-2 where DeepSpeed put the trained one (see `place_like`), or without a trained one on
        this rank's accelerator (the CPU where there is none)."""
        model = model.eval().requires_grad_(False)
        if dist_cfg.zero_stage != 3:
            if self.ds_engine is not None:
                place_like(model, self.ds_engine.module)
            else:
                model.to(get_accelerator().current_device_name())
            return model
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 1,
               "zero_optimization": {"stage": 3},
               "bf16": {"enabled": self.dtype == torch.bfloat16},
               "fp16": {"enabled": self.dtype == torch.float16}}
        engine, *_ = deepspeed.initialize(model=model, config=cfg)
        return engine

    # ------------------------------------------------------------------ training

    def train_step(self, objective: Objective, micro_batches: list[dict[str, torch.Tensor]],
                   with_reference: tuple[str, Callable[..., Any], dict[str, Any]] | None = None,
                   **kwargs: Any) -> dict[str, dict[str, float]]:
        """One optimizer step over this rank's micro-batches.

        `with_reference` (key, fn, fn_kwargs) adds `fn(reference, micro_batch, **fn_kwargs)`,
        computed without gradients, to each micro-batch as `key` before the objective runs: the
        reference's part of the step on the very batch the update trains on, shipped and packed
        once (PPO's reference log-probs when nothing before the update needs them).

        Returns `{"sums": additive metrics summed over micro-batches, "shared": values that
        are the same on every rank (grad_norm, lr)}`.

        Objectives normalise their loss by the whole global batch, so the rank average and the
        accumulation average DeepSpeed applies are undone here: the update is then identical
        however the global batch is split over workers and micro-batches. With a token budget
        (`trainer.max_tokens_per_micro_batch`) their count varies by step (the same on every
        rank), and the last one is marked as the accumulation boundary here.
        """
        self.prefix_cache.clear()  # the step changes the weights its keys were computed with
        ds_engine = self.ds_engine
        if not self.by_tokens and len(micro_batches) != ds_engine.gradient_accumulation_steps():
            raise TrainingError(f"expected {ds_engine.gradient_accumulation_steps()} micro-batches "
                                f"per rank, got {len(micro_batches)}")
        ds_engine.train()
        lr = float(ds_engine.get_lr()[0])  # the rate this step uses (the scheduler moves after)
        totals: dict[str, float] = {}
        for index, batch in enumerate(micro_batches):
            if self.by_tokens:
                ds_engine.set_gradient_accumulation_boundary(index == len(micro_batches) - 1)
            batch = self._on_device(batch)
            if with_reference is not None:
                batch = {**batch, with_reference[0]: self._reference_output(batch,
                                                                            *with_reference[1:])}
            loss, metrics = objective(ds_engine, batch, **kwargs)
            if not torch.isfinite(loss):
                raise TrainingError(f"non-finite loss ({loss.item()}) on rank {self.rank}; "
                                    "lower trainer.lr or check the data")
            # The loss is already this micro-batch's share of the global mean: undo the
            # rank average (x world size) and skip backward()'s division by accumulation.
            ds_engine.backward(loss * self.world_size, scale_wrt_gas=False)
            if ds_engine.is_gradient_accumulation_boundary() and self.zero_stage == 0:
                # DeepSpeed's stage-0 paths do not keep the norm; fp32 clips here (one pass).
                grad_norm = _clip_grad_norm(self.model,
                                            self.grad_clip if self.clips_itself else 0.0)
            ds_engine.step()
            accumulate(totals, metrics)
        if self.zero_stage > 0:
            grad_norm = _as_float(ds_engine.get_global_grad_norm())
        # Same value on every rank: reported once, not summed.
        shared = {"grad_norm": grad_norm, "lr": lr}
        return {"sums": totals, "shared": shared}

    @torch.no_grad()
    def _reference_output(self, batch: dict[str, Any], fn: Callable[..., Any],
                          fn_kwargs: dict[str, Any]) -> Any:
        """`fn` on the frozen reference in eval mode, inside a training step (which goes on in
        train mode: with LoRA the reference is this very model, adapter off)."""
        with self.reference_view() as module:
            module.eval()
            out = fn(module, batch, **fn_kwargs)
        self.ds_engine.train()
        return out

    def advance_schedule(self, steps: int) -> None:
        """Move the learning-rate schedule on by `steps` optimizer steps that are not taken
        (PPO's dynamic sampling, when a short batch fills fewer minibatches than planned), so
        the rate stays where the run's plan has it and the schedule ends with the run."""
        scheduler = self.ds_engine.lr_scheduler
        with warnings.catch_warnings():  # torch warns when the schedule moves before a step
            warnings.filterwarnings("ignore", message=r".*lr_scheduler\.step\(\)")
            for _ in range(steps):
                scheduler.step()

    def evaluate(self, objective: Objective, micro_batches: list[dict[str, torch.Tensor]],
                 **kwargs: Any) -> dict[str, float]:
        """Run `objective` without gradients over micro-batches; returns summed metrics."""
        totals: dict[str, float] = {}
        for _, metrics in self.infer(objective, micro_batches, **kwargs):
            accumulate(totals, metrics)
        return totals

    @torch.no_grad()
    def infer(self, fn: Callable[..., Any], micro_batches: list[dict[str, torch.Tensor]],
              reference: bool = False, **kwargs: Any) -> list[Any]:
        """`fn(module, batch, **kwargs)` for each micro-batch, without gradients.

        With `reference=True` the module is the frozen reference (see `reference_view`).
        """
        self.prefix_cache.clear()  # the round's generation is over: free its keys and values
        view = self.reference_view() if reference else contextlib.nullcontext(
            self.ds_engine or self.model)
        with view as module:
            module.eval()
            return [_to_cpu(fn(module, self._on_device(batch), **kwargs))
                    for batch in micro_batches]

    def held_tensor_bytes(self) -> dict[str, int]:
        """Bytes of parameters, gradients and optimizer state this rank's engine holds (see
        `align.engine_memory`)."""
        from align.engine_memory import held_tensor_bytes

        return held_tensor_bytes(self.ds_engine)

    def check_packing(self) -> dict[str, Any]:
        """Whether packed forwards of this model equal separate ones (see
        `align.packed_forward.check_packing`); call on every rank at once."""
        from align.packed_forward import check_packing

        return check_packing(self.ds_engine or self.model, self.kind)

    def _on_device(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch's tensors, its layout's included, on this rank's device."""
        device = self.device
        return {k: v.to(device) if torch.is_tensor(v) or isinstance(v, BatchLayout) else v
                for k, v in batch.items()}

    @contextlib.contextmanager
    def reference_view(self) -> Iterator[torch.nn.Module]:
        """The frozen reference: with LoRA, this model with its adapter disabled."""
        if not self.has_reference:
            raise TrainingError("this policy was set up without a reference model")
        if self.reference_model is not None:
            yield self.reference_model
            return
        with self.model.disable_adapter():
            yield self.ds_engine or self.model

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], sampling: Sampling,
                 prefix_cache_bytes: int = 0, draft_tokens: int = 0) -> Generation:
        """Complete token-id prompts (the `hf` rollout engine; see align.rollout.hf_sampling):
        new tokens only, cut after the first EOS, with their sampling log-probs if asked.

        `prefix_cache_bytes`: keys and values this rank keeps of the rows it ran, for later
        calls whose prompts extend them (`rollout.prefix_cache_mb`); 0 keeps none.
        `draft_tokens`: tokens guessed from earlier text that each decoding step checks
        (`rollout.draft_tokens`); 0 guesses none."""
        self.prefix_cache.max_bytes = prefix_cache_bytes
        if not prefix_cache_bytes:
            self.prefix_cache.clear()
        if not draft_tokens:
            self.drafts = None
        elif self.drafts is None or self.drafts.k != draft_tokens:
            self.drafts = NgramDrafts(draft_tokens)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed + self.rank)  # ranks sample different streams
        if not prompts:
            with self.gathered_parameters():  # ZeRO-3: still join the collective gather
                return Generation([], [] if sampling.logprobs else None)
        self.model.eval()
        # Decoding steps run eagerly: each grows the KV cache by one, which would recompile.
        eager = (torch.compiler.set_stance("force_eager") if self.compiled
                 else contextlib.nullcontext())
        try:
            with self.gathered_parameters(), eager:
                tokens, logprobs = hf_sample(self.model, prompts, sampling, self.eos_ids,
                                             self.tokenizer.pad_token_id, self.device,
                                             synced=self.zero_stage == 3 and self.world_size > 1,
                                             prefix=self.prefix_cache if prefix_cache_bytes
                                             else None, drafts=self.drafts)
        except RuntimeError as exc:
            if "probability tensor" not in str(exc):
                raise
            raise TrainingError(f"rank {self.rank}: the policy's next-token distribution is not "
                                "finite (the weights diverged); lower trainer.lr") from None
        return Generation(tokens, logprobs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def gathered_parameters(self) -> contextlib.AbstractContextManager:
        """Under ZeRO-3, materialise the full weights on every rank for the block."""
        if self.zero_stage == 3 and self.ds_engine is not None:
            return deepspeed.zero.GatheredParameters(list(self.model.parameters()))
        return contextlib.nullcontext()

    # ------------------------------------------------------------------ saving

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """The whole model's weights on rank 0 (CPU tensors); None on other ranks."""
        if self.zero_stage == 3 and self.ds_engine is not None:
            state = self.ds_engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.model.state_dict()
        if self.rank != 0:
            return None
        return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}

    def save(self, path: str | Path, merged: bool | None = None) -> None:
        """Write Hugging Face format to `path` (rank 0): full model, or peft adapter, + tokenizer.

        With LoRA the adapter alone is written unless `merged` (default: model.lora.save_merged)
        or the base model was built from config and so exists on no disk an adapter could name.
        Unset, a sequence classifier (a reward model) is merged too: an adapter over a base whose
        config says nothing of one label loads only when the loader is told `num_labels=1`.
        """
        state = self.full_state_dict()
        if self.rank != 0:
            return
        from align.saving import save_pretrained

        lora = self.model_cfg.lora
        merge = lora.save_merged if merged is None else merged
        if merge is None:
            merge = self.kind == "sequence_classification"
        merge = merge or (lora.enabled and is_embedded(self.model_cfg.name_or_path))
        save_pretrained(self.model, state, self.tokenizer, Path(path), merge_lora=merge)

    def save_checkpoint(self, path: str | Path, tag: str = "engine") -> None:
        """DeepSpeed's own checkpoint (weights, optimizer and scheduler states, all ranks)."""
        self.ds_engine.save_checkpoint(str(path), tag=tag, save_latest=False)

    def load_checkpoint(self, path: str | Path, tag: str = "engine") -> None:
        """Load `save_checkpoint`'s files with `weights_only=True`: DeepSpeed's own engine
        would unpickle anything, so a file that needs code to load is refused instead.

        Raises:
            CheckpointError: a file needs a type outside plain tensors and values.
        """
        from align.checkpoint import SafeCheckpointEngine

        self.prefix_cache.clear()
        ds_engine = self.ds_engine
        if not isinstance(ds_engine.checkpoint_engine, SafeCheckpointEngine):
            ds_engine.checkpoint_engine = SafeCheckpointEngine(ds_engine.checkpoint_engine)
        load_path, _ = ds_engine.load_checkpoint(str(path), tag=tag)
        if load_path is None:
            raise TrainingError(f"could not load the DeepSpeed checkpoint in {path}")


def place_like(model: torch.nn.Module, twin: torch.nn.Module) -> None:
    """Move `model` in place to the device of `twin`, and give each parameter the dtype of
    `twin`'s parameter of the same name.

    `twin` is a model DeepSpeed has set up under ZeRO 0-2: moved to the rank's accelerator and,
    with bf16 or fp16 on, its parameters cast while its buffers (rotary frequencies) stay fp32.
    A frozen copy of the same architecture placed this way (the reference) computes as the
    trained model does, on the device its batches are sent to.
    """
    model.to(next(twin.parameters()).device)
    dtypes = {name: param.dtype for name, param in twin.named_parameters()}
    for name, param in model.named_parameters():
        if name in dtypes and param.dtype != dtypes[name]:
            param.data = param.data.to(dtypes[name])


def _scheduler_factory(trainer: TrainerConfig, total_steps: int):
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[
        trainer.scheduler]
    warm = warmup_steps(trainer, total_steps)

    def build(optimizer: torch.optim.Optimizer):
        return get_scheduler(name, optimizer, num_warmup_steps=warm,
                             num_training_steps=max(total_steps, 1))

    return build


def _to_cpu(value: Any) -> Any:
    """Results leave the actor on the CPU (the driver may have no GPU)."""
    if torch.is_tensor(value):
        return value.detach().cpu()
    if isinstance(value, tuple):
        return tuple(_to_cpu(v) for v in value)
    if isinstance(value, list):
        return [_to_cpu(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_cpu(v) for k, v in value.items()}
    return value


def _clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """The gradients' total norm, after scaling them by min(1, max_norm / (norm + 1e-6)); 0
    disables clipping. The arithmetic is DeepSpeed's fp32 ZeRO-0 clipping, operation for
    operation, so the update is bit for bit the one DeepSpeed would make (in one vectorised
    kernel per operation rather than a loop over tensors)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return 0.0
    total = torch.stack(torch._foreach_norm(grads)).pow(2).sum().float().pow(0.5)
    if max_norm > 0:
        coef = torch.min(torch.tensor([1.0]), torch.tensor([float(max_norm)]) / (total + 1e-6))
        torch._foreach_mul_(grads, coef.to(grads[0].device, grads[0].dtype).squeeze(0))
    return float(total)


def _as_float(value: Any) -> float:
    if value is None:
        return float("nan")
    return float(value.item() if torch.is_tensor(value) else value)
