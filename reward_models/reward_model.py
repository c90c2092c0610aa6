"""A trained reward-model folder as a reward: ``load_reward("runs/arithmetic/rm/final")``.

Importing this module registers the folder kind with ``register_spec_kind``, so any spec that
names a folder holding ``config.json`` (a full model) or ``adapter_config.json`` (a LoRA
adapter) is scored by a ``RewardModelScorer``. Torch, Ray and the model are loaded only when
such a spec is loaded.

The scorer starts a Ray actor group of its own (``align.distributed.WorkerGroup``): each actor
holds a frozen copy of the model and scores its share of every batch. Options, as spec
``kwargs``::

    - spec: runs/arithmetic/rm/final
      kwargs: {num_workers: 2, cpus_per_worker: 0.5, batch_size: 128}

``num_workers: 0`` scores in the calling process, without Ray.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any

from align.errors import ConfigError, ModelError, RewardError
from reward_models.function_loader import resolve_path
from reward_models.loading import is_model_folder, register_spec_kind
from reward_models.spec import RewardSpec


class RewardModelScorer:
    """Scores (prompt, completion) pairs with a trained reward model; a Reward.

    Args:
        path: the model folder (``final/`` of an ``align rm`` run, or any one-label Hugging
            Face sequence classifier, or a LoRA adapter for one).
        num_workers: Ray actors, each with a full copy, scoring in parallel; 0: in this
            process, no Ray.
        cpus_per_worker: CPUs each actor reserves (fractional values share a core with other
            roles); its torch threads follow it.
        gpus_per_worker: GPUs each actor reserves; None: 1 when the cluster has GPUs, else 0.
        batch_size: sequences per forward pass.
        max_length: longest sequence scored (longer completions are cut); None: the model's
            ``max_position_embeddings``.
        dtype: ``auto`` (bf16 on a GPU that supports it, else fp32), ``float32``, ``bfloat16``
            or ``float16``.
        ray_address: Ray cluster to join when none is running; None starts a local one.

    Raises:
        ModelError: the folder does not hold a reward model.
    """

    def __init__(self, path: str | Path, num_workers: int = 1, cpus_per_worker: float = 1.0,
                 gpus_per_worker: float | None = None, batch_size: int = 64,
                 max_length: int | None = None, dtype: str = "auto",
                 ray_address: str | None = None) -> None:
        self.path = Path(path)
        self.group = None
        if num_workers == 0:
            from reward_models.scorer import load_reward_model

            self.model, self.tokenizer = load_reward_model(self.path, dtype)
            self.batch_size, self.max_length = batch_size, max_length
            return
        from align.config import DistributedConfig
        from align.distributed import WorkerGroup
        from reward_models.model_worker import RewardModelWorker

        dist = DistributedConfig(num_workers=num_workers, cpus_per_worker=cpus_per_worker,
                                 gpus_per_worker=gpus_per_worker, ray_address=ray_address)
        self.group = WorkerGroup(RewardModelWorker, dist, role=f"reward model {self.path}")
        try:
            self.group.call("load", str(self.path), dtype, batch_size, max_length)
        except BaseException:  # Ctrl-C included: the actors must not outlive a failed start
            self.close()
            raise

    @classmethod
    def from_spec(cls, spec: RewardSpec, base_dir: Path) -> RewardModelScorer:
        """Build from a config entry: ``spec`` is the folder, ``kwargs`` the options above.

        Raises:
            ConfigError: an unknown or ill-typed option (the closest valid one suggested).
            RewardError: the folder does not hold a reward model.
        """
        _check_options(spec)
        path = resolve_path(spec.spec, base_dir)
        from reward_models.scorer import check_reward_model_config

        try:
            if not (path / "adapter_config.json").is_file():
                check_reward_model_config(path)  # fail before any actor starts
            return cls(path, **spec.kwargs)
        except ModelError as err:
            raise RewardError(f"reward {spec.label!r}: {err}") from None

    def __call__(self, prompts: list[Any], completions: list[Any], **columns: Any) -> list[float]:
        """One score per sample; other columns are accepted and ignored."""
        if self.group is None:
            from reward_models.scorer import score_texts

            return score_texts(self.model, self.tokenizer, prompts, completions,
                               self.batch_size, self.max_length)
        n, size = len(prompts), self.group.size
        bounds = [n * rank // size for rank in range(size + 1)]
        shards = [(list(prompts[a:b]), list(completions[a:b]))
                  for a, b in zip(bounds, bounds[1:])]
        return [score for part in self.group.call_each("score", shards) for score in part]

    def close(self) -> None:
        """Stop the actors and free their resources (safe to call twice). Trainers call it
        when a run ends; `__del__` is only a fallback."""
        if self.group is not None:
            self.group.shutdown()
            self.group = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown; Ray may already be gone
            pass


def is_reward_model_folder(spec: RewardSpec, base_dir: Path) -> bool:
    """Whether ``spec`` names a folder with a full model or a LoRA adapter in it."""
    if is_model_folder(spec, base_dir):
        return True
    if spec.spec.startswith(("http://", "https://")):
        return False
    return (resolve_path(spec.spec, base_dir) / "adapter_config.json").is_file()


def _check_options(spec: RewardSpec) -> None:
    params = inspect.signature(RewardModelScorer.__init__).parameters
    valid = [name for name in params if name not in ("self", "path")]
    for key in spec.kwargs:
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; options: {valid}"
            raise ConfigError(f"reward {spec.label!r}: unknown reward-model option {key!r}{hint}")
    workers = spec.kwargs.get("num_workers", 1)
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise ConfigError(f"reward {spec.label!r}: num_workers must be an integer >= 0, got "
                          f"{workers!r}")
    batch = spec.kwargs.get("batch_size", 1)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ConfigError(f"reward {spec.label!r}: batch_size must be an integer >= 1, got "
                          f"{batch!r}")


register_spec_kind("reward model folder", is_reward_model_folder, RewardModelScorer.from_spec)
