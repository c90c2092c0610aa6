"""Typed run configuration: dataclass schemas, YAML + dotted `key=value` overrides, validation.

Every setting has one default, here. `load_config` merges a YAML file and command-line
overrides into a schema; an unknown key or a value of the wrong type fails before any work
starts, naming the key and suggesting the closest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from align.errors import ConfigError

T = TypeVar("T")

EMBEDDED = "embedded"  # model/data source name for the built-in arithmetic task


@dataclass
class LoraConfig:
    enabled: bool = False  # wrap the model with peft LoRA adapters
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: str | list[str] = "all-linear"  # peft target; all-linear suits any arch
    save_merged: bool = False  # write final/ as a full model with the adapter merged in


@dataclass
class EmbeddedModelConfig:
    """Shape of the small Llama built from scratch when `model.name_or_path` is `embedded`."""

    hidden_size: int = 128  # model width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads
    intermediate_size: int = 512  # MLP width
    max_position_embeddings: int = 64  # longest sequence the model accepts
    seed: int = 0  # initialisation seed, so every rank and rerun builds the same weights


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED  # local folder or hub name; `embedded` builds a small Llama
    tokenizer: str | None = None  # tokenizer folder/name; default: same as name_or_path
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    gradient_checkpointing: bool = False  # trade compute for activation memory
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    trust_remote_code: bool = False  # allow model code from the hub (off: safer)
    lora: LoraConfig = field(default_factory=LoraConfig)
    embedded: EmbeddedModelConfig = field(default_factory=EmbeddedModelConfig)


@dataclass
class DataConfig:
    train: str = EMBEDDED  # file (jsonl/json/parquet/csv), save_to_disk folder, hub name
    eval: str | None = None  # held-out data; None: split eval_fraction off train
    split: str = "train"  # split to read from a folder/hub dataset
    eval_fraction: float = 0.0  # fraction of train held out when eval is None
    max_length: int = 64  # tokens per example (prompt + completion)
    packing: bool | None = None  # pack rows; None: where the start-up check passes; false: pad
    packing_length: int | None = None  # tokens per packed row; None: longest in micro-batch
    group_by_length: bool = False  # with padding: batch examples of similar length
    completion_only_loss: bool = True  # loss only on completion / assistant tokens


@dataclass
class TaskConfig:
    """The embedded arithmetic task (`Q: 23+58=` -> ` 81`) used when data.train is `embedded`."""

    seed: int = 1234  # generator seed (operand split, noise draws)
    num_train: int = 20000  # SFT demonstrations
    num_pairs: int = 20000  # preference pairs (reward model, DPO) from the training operands
    num_eval: int = 500  # held-out prompts for exact-match accuracy
    carry_drop_prob: float = 0.65  # chance a demonstration drops the carry (imperfect labels)


@dataclass
class EvalConfig:
    """Held-out evaluation: loss, and exact match of greedy generations with the references."""

    exact_match: bool = True  # generate greedily for held-out prompts and score exact match
    max_samples: int = 500  # held-out prompts scored for exact match (0: all)
    max_new_tokens: int = 8  # generation budget per prompt
    batch_size: int = 256  # prompts per generate call on one worker


@dataclass
class TrainerConfig:
    lr: float = 1e-4  # peak learning rate
    weight_decay: float = 0.0  # AdamW weight decay
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    adam_eps: float = 1e-8  # AdamW epsilon
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup steps (overrides warmup_ratio when > 0)
    warmup_ratio: float = 0.0  # warmup as a fraction of total steps
    max_steps: int = 0  # optimizer steps; 0: derive from epochs
    epochs: float = 1.0  # passes over the training data when max_steps is 0
    global_batch_size: int = 64  # examples per optimizer step, over all workers
    micro_batch_size: int = 64  # examples per forward pass on one worker
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    seed: int = 42  # data order and worker RNG seed
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 0  # steps between eval-loss passes; 0: only at the end
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept in output_dir/checkpoints


@dataclass
class DistributedConfig:
    num_workers: int = 1  # Ray actors (DeepSpeed ranks) for the trained model
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO optimizer state offload to CPU
    cpus_per_worker: float | None = None  # None: share this node's CPUs among the workers
    gpus_per_worker: float | None = None  # None: 1 when Ray sees GPUs, else 0
    torch_threads: int | None = None  # torch threads per worker; None: its CPU share
    ray_address: str | None = None  # join this Ray cluster; None starts a local one
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, else gloo


@dataclass
class RunConfig:
    """Settings every stage shares."""

    output_dir: str = "runs/default"  # where config, metrics, checkpoints and final/ go
    overwrite: bool = False  # allow reusing a non-empty output_dir (deletes what is there)
    resume: str | None = None  # `auto`: newest complete checkpoint in output_dir; or a path
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class SFTConfig(RunConfig):
    output_dir: str = "runs/sft"


@dataclass
class RewardModelSettings:
    """Bradley-Terry reward-model training (`align rm`)."""

    center_coef: float = 0.0  # weight of mean((r_c + r_r)^2), which centres rewards on 0; 0: off
    use_margin: bool = True  # subtract a data `margin` column from r_c - r_r when rows have one


@dataclass
class RMConfig(RunConfig):
    output_dir: str = "runs/rm"
    rm: RewardModelSettings = field(default_factory=RewardModelSettings)

    def check(self) -> None:
        if not 0.0 <= self.rm.center_coef < float("inf"):
            raise ConfigError(f"rm.center_coef must be a finite number >= 0; got "
                              f"{self.rm.center_coef}")


@dataclass
class DPOSettings:
    """Direct preference optimisation and its variants (`align dpo`); see align.losses."""

    loss_type: Literal["sigmoid", "ipo", "hinge", "simpo"] = "sigmoid"  # simpo: no reference
    beta: float = 0.1  # inverse temperature (ipo: the regulariser tau; simpo: reward scale)
    label_smoothing: float = 0.0  # conservative DPO: chance a label is flipped; sigmoid/simpo
    gamma: float = 0.5  # simpo: target reward margin
    nll_coef: float = 0.0  # weight of the NLL of chosen completions (RPO); 0: off
    precompute_reference: bool | None = None  # None: on unless LoRA (reference = adapter off)
    reference_cache_dir: str | None = None  # cached reference log-probs; None: output_dir


@dataclass
class DPOConfig(RunConfig):
    output_dir: str = "runs/dpo"
    dpo: DPOSettings = field(default_factory=DPOSettings)

    def check(self) -> None:
        d = self.dpo
        if d.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive; got {d.beta}")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must lie in [0, 0.5); got "
                              f"{d.label_smoothing}")
        if d.label_smoothing and d.loss_type in ("ipo", "hinge"):
            raise ConfigError(f"dpo.label_smoothing applies to dpo.loss_type sigmoid or simpo, "
                              f"not {d.loss_type}; set dpo.label_smoothing=0")
        if d.nll_coef < 0:
            raise ConfigError(f"dpo.nll_coef must be >= 0; got {d.nll_coef}")
        if d.loss_type == "simpo" and d.precompute_reference:
            raise ConfigError("dpo.loss_type=simpo uses no reference model: leave "
                              "dpo.precompute_reference unset (or false)")


@dataclass
class RewardConfig:
    """One entry of a weighted reward list (see reward_models.load_reward for spec forms)."""

    spec: str = ""  # module:function, path/file.py:function, reward-model folder, or http(s) URL
    weight: float = 1.0  # multiplier in the weighted sum
    name: str | None = None  # metric name (rewards/<name>/mean); default derived from spec
    style: Literal["trl", "verl", "openrlhf"] | None = None  # calling convention of the function
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound arguments / client options


@dataclass
class RolloutConfig:
    prompts_per_step: int = 32  # prompts sampled per iteration
    n_samples_per_prompt: int = 8  # completions per prompt (the group size of GRPO/RLOO)
    max_new_tokens: int = 16  # generation budget per completion
    temperature: float = 1.0  # sampling temperature (log-probs use the same temperature)
    top_p: float = 1.0  # nucleus sampling; 1 samples from the full distribution


@dataclass
class AlgorithmConfig:
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "grpo"  # advantage estimator
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 0.95  # GAE lambda
    scale_by_std: bool = True  # grpo: divide group-centred rewards by the group std
    whiten_advantages: bool = True  # gae: whiten advantages over the batch
    kl_coef: float = 0.04  # weight of the KL to the reference (initial value when adaptive)
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # per-token KL estimator
    kl_in_reward: bool | None = None  # per-token reward penalty; None: yes for gae/reinforce_pp
    adaptive_kl: bool = False  # adapt kl_coef towards kl_target (Ziegler et al. 2019)
    kl_target: float = 0.1  # adaptive KL: target per-sequence KL
    kl_horizon: int = 100  # adaptive KL: iterations to close the gap
    clip_eps: float = 0.2  # PPO ratio clip (lower side, and upper unless clip_eps_high)
    clip_eps_high: float | None = None  # upper ratio clip (DAPO clip-higher); None: clip_eps
    dual_clip: float | None = None  # dual clip c > 1 for negative advantages; None: off
    value_clip_eps: float | None = 0.2  # critic value clip; None: unclipped
    ppo_epochs: int = 1  # passes over each rollout buffer
    loss_aggregation: Literal["token", "sequence"] = "token"  # see align.losses.ppo_policy_loss
    entropy_coef: float = 0.0  # entropy bonus weight


@dataclass
class CriticConfig:
    """The value model for `estimator: gae` (a sequence-classification head on a backbone)."""

    name_or_path: str | None = None  # default: the policy's model.name_or_path
    lr: float = 1e-4  # critic learning rate
    num_workers: int | None = None  # default: distributed.num_workers
    zero_stage: int | None = None  # default: distributed.zero_stage
    cpus_per_worker: float | None = None  # default: an even share with the policy


@dataclass
class PPOConfig(RunConfig):
    output_dir: str = "runs/ppo"
    rewards: list[RewardConfig] = field(default_factory=list)  # weighted sum is the reward
    gold_rewards: list[RewardConfig] = field(default_factory=list)  # logged only (reward/gold)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)

    def check(self) -> None:
        ro, alg = self.rollout, self.algorithm
        if not self.rewards:
            raise ConfigError("rewards: give at least one reward, e.g. "
                              "rewards=[{spec: reward_models.builtin:exact_match}]")
        for i, entry in enumerate([*self.rewards, *self.gold_rewards]):
            if not entry.spec:
                raise ConfigError(f"rewards[{i}].spec is empty")
        if alg.estimator in ("grpo", "rloo") and ro.n_samples_per_prompt < 2:
            raise ConfigError(f"algorithm.estimator={alg.estimator} compares samples of one "
                              "prompt: rollout.n_samples_per_prompt must be at least 2")
        buffer = ro.prompts_per_step * ro.n_samples_per_prompt
        if buffer % self.trainer.global_batch_size:
            raise ConfigError(
                f"rollout.prompts_per_step x rollout.n_samples_per_prompt = {buffer} must be a "
                f"multiple of trainer.global_batch_size={self.trainer.global_batch_size}")
        if ro.temperature <= 0:
            raise ConfigError("rollout.temperature must be positive")
        if alg.dual_clip is not None and alg.dual_clip <= 1:
            raise ConfigError("algorithm.dual_clip must be greater than 1")


STAGES: dict[str, type[RunConfig]] = {"sft": SFTConfig, "rm": RMConfig, "dpo": DPOConfig,
                                     "ppo": PPOConfig}


# --------------------------------------------------------------------------- loading


def load_config(schema: type[T], path: str | Path | None = None,
                overrides: list[str] | None = None) -> T:
    """Build a `schema` instance from a YAML file and `a.b=value` overrides.

    Raises:
        ConfigError: unreadable YAML, unknown key, wrong type, or a failed cross-field check.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
    for item in overrides or []:
        apply_override(data, item)
    config = from_dict(schema, data)
    check = getattr(config, "check", None)
    validate_common(config)
    if callable(check):
        check()
    return config


def read_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: invalid YAML: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got "
                          f"{type(data).__name__}")
    return data


def apply_override(data: dict[str, Any], item: str) -> None:
    """Set `a.b.c=value` in a nested dict; the value is parsed as YAML (`1e-4`, `true`, `[1,2]`)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"override '{item}' must look like key=value (e.g. trainer.lr=1e-4)")
    try:
        value = yaml.safe_load(raw) if raw != "" else None
    except yaml.YAMLError:
        value = raw
    node: Any = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        if isinstance(node, list):  # `rewards.0.spec=...` addresses a list item
            node = _list_item(node, part, item)
            continue
        child = node.setdefault(part, {})
        if not isinstance(child, (dict, list)):
            raise ConfigError(f"override '{item}': '{part}' is not a section")
        node = child
    if isinstance(node, list):
        node[_index(node, parts[-1], item)] = value
    else:
        node[parts[-1]] = value


def _index(items: list, part: str, item: str) -> int:
    if not part.isdigit() or int(part) >= len(items):
        raise ConfigError(f"override '{item}': '{part}' is not an index of that list "
                          f"(it has {len(items)} items)")
    return int(part)


def _list_item(items: list, part: str, item: str) -> Any:
    child = items[_index(items, part, item)]
    if not isinstance(child, dict):
        raise ConfigError(f"override '{item}': item {part} is not a section")
    return child


def from_dict(schema: type[T], data: dict[str, Any], prefix: str = "") -> T:
    """Recursively convert a dict to dataclass `schema`, checking keys and types."""
    hints = typing.get_type_hints(schema)
    fields = {f.name: f for f in dataclasses.fields(schema) if f.init}
    kwargs = {}
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in fields:
            raise ConfigError(_unknown_key_message(full, key, list(fields), prefix))
        kwargs[key] = _convert(hints[key], value, full)
    return schema(**kwargs)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def dump_config(config: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def _unknown_key_message(full: str, key: str, valid: list[str], prefix: str) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{prefix}{close[0]}'?" if close else ""
    section = prefix.rstrip(".") or "the top level"
    return (f"unknown config key '{full}'{hint} (valid keys in {section}: "
            f"{', '.join(sorted(valid))})")


def _convert(tp: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a section (mapping), "
                              f"got {value!r}")
        return from_dict(tp, value, prefix=f"{key}.")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(option, value, key)
            except ConfigError:
                continue  # try the next type of the union
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"config key '{key}' must be one of "
                              f"{', '.join(map(str, choices))}; got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"config key '{key}' must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key '{key}' must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    return _convert_scalar(tp, value, key)


def _convert_scalar(tp: type, value: Any, key: str) -> Any:
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML reads `1e-4` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r} "
                      f"({type(value).__name__})")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(t) for t in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp)))


def validate_common(config: Any) -> None:
    """Cross-field checks shared by every stage (each names the keys involved)."""
    if not isinstance(config, RunConfig):
        return
    tr, dist = config.trainer, config.distributed
    if not 0 <= dist.zero_stage <= 3:
        raise ConfigError(f"distributed.zero_stage must be 0, 1, 2 or 3; got {dist.zero_stage}")
    if dist.num_workers < 1:
        raise ConfigError("distributed.num_workers must be at least 1")
    for name in ("global_batch_size", "micro_batch_size"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"trainer.{name} must be at least 1")
    per_step = tr.micro_batch_size * dist.num_workers
    if tr.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={tr.global_batch_size} must be a multiple of "
            f"trainer.micro_batch_size x distributed.num_workers = {per_step}")
    if tr.lr <= 0:
        raise ConfigError(f"trainer.lr must be positive; got {tr.lr}")
    if config.data.packing_length is not None and config.data.packing_length < 1:
        raise ConfigError("data.packing_length must be at least 1 (or unset)")
    if not 0 <= config.data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction must be in [0, 1)")
    if config.model.lora.enabled and config.model.lora.r < 1:
        raise ConfigError("model.lora.r must be at least 1")
    if len(tr.adam_betas) != 2:
        raise ConfigError("trainer.adam_betas must have two numbers, e.g. [0.9, 0.999]")
