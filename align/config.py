"""Typed run configuration: dataclass schemas, their validation, and `load_config`.

Every setting has one default, here. `load_config` merges a YAML file and command-line
overrides into a schema; an unknown key or a value of the wrong type fails before any work
starts, naming the key and suggesting the closest valid one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

# Re-exported: callers load, dump and convert configs, and name every schema, through here.
from align.config_environment import EnvironmentConfig, SandboxConfig, SandboxLimits  # noqa: F401
from align.config_loading import apply_override, dump_config, from_dict, read_yaml, to_dict  # noqa: F401
from align.config_rollout import RolloutConfig, VLLMSettings, check_vllm_settings  # noqa: F401
from align.errors import ConfigError
from align.tracker_names import check_trackers

T = TypeVar("T")

Aggregation = Literal["token", "sequence", "constant"]  # how per-token losses are reduced
PlacementStrategy = Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"]
OnUnusable = Literal["skip", "error"]  # a well-formed row that cannot be trained on
EMBEDDED = "embedded"  # model/data source name for the built-in arithmetic task


@dataclass
class LoraConfig:
    enabled: bool = False  # wrap the model with peft LoRA adapters
    r: int = 8  # adapter rank
    alpha: int = 16  # scaling numerator (scale = alpha / r)
    dropout: float = 0.0  # dropout on the adapter input
    target_modules: str | list[str] = "all-linear"  # peft target; all-linear suits any arch
    save_merged: bool | None = None  # final/ with the adapter merged in; None: rm and embedded


@dataclass
class EmbeddedModelConfig:
    """Shape of the small Llama built from scratch when `model.name_or_path` is `embedded`."""

    hidden_size: int = 128  # model width
    num_layers: int = 2  # transformer blocks
    num_heads: int = 4  # attention heads
    intermediate_size: int = 512  # MLP width
    max_position_embeddings: int = 64  # longest sequence the model accepts
    # configs/arithmetic/sft.yaml sets 0.1: at width 128 transformers' 0.02 left the sums to a
    # late, seed-dependent drop of the loss (docs/decisions.md)
    initializer_range: float = 0.02  # std of the initial weights
    seed: int = 0  # initialisation seed, so every rank and rerun builds the same weights
    chat_format: Literal["plain", "chatml"] = "plain"  # chatml: ChatML, Qwen2.5 tool calls


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED  # local folder or hub name; `embedded` builds a small Llama
    tokenizer: str | None = None  # tokenizer folder/name; default: same as name_or_path
    chat_template: str | None = None  # a Jinja chat template, or a file holding one; overrides
    # the tokenizer's (saved with every model the run writes)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: bf16 on GPU
    gradient_checkpointing: bool = False  # trade compute for activation memory
    attn_implementation: str | None = None  # e.g. sdpa, eager, flash_attention_2
    trust_remote_code: bool = False  # allow model code from the hub (off: safer)
    disable_dropout: bool | None = None  # every dropout rate 0; None: on for ppo/dpo/rm, not sft
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
    shared_prefix: bool | None = None  # pack a shared prompt once; None: where it is cheaper
    group_by_length: bool = False  # with padding: batch examples of similar length
    completion_only_loss: bool = True  # loss only on completion / assistant tokens
    columns: dict[str, str] = field(default_factory=dict)  # ours: theirs, e.g. {prompt: question}
    cache: bool = True  # keep prepared (tokenised) data on disk and reuse it while unchanged
    cache_dir: str | None = None  # prepared data; None: $ALIGN_DATA_CACHE, ~/.cache/align/data
    num_proc: int = 0  # processes preparing data; 0: one per 20k rows, at most one per core
    on_unusable: OnUnusable = "skip"  # a prompt >= max_length or chosen == rejected: skip, counted
    max_skipped_fraction: float = 0.2  # stop (exit 2) when a file has more unusable rows than this


@dataclass
class TaskConfig:
    """The built-in task used when data.train is `embedded` (see align.tasks)."""

    name: str = "arithmetic"  # a key of align.tasks.TASKS: arithmetic, products (tool use)
    seed: int = 1234  # generator seed (operand split, noise draws)
    num_train: int = 20000  # SFT demonstrations
    num_pairs: int = 20000  # preference pairs (reward model, DPO) from the training operands
    num_eval: int = 500  # held-out prompts for exact-match accuracy
    carry_drop_prob: float = 0.65  # chance a demonstration drops the carry (imperfect labels)
    tool_skip_prob: float = 0.75  # products: chance a demonstration estimates x * 10k, no tool
    # `demonstrator`: dropped carry, else off by 1-3; `symmetric`: tens off by one either way
    pair_errors: Literal["demonstrator", "symmetric"] = "demonstrator"  # rejected answers' errors


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
    fused_adam: bool = False  # torch's fused AdamW kernel (CPU and CUDA): see docs/performance.md
    compile: bool = False  # torch.compile the trained model (ZeRO 0-2): see docs/performance.md
    scheduler: Literal["constant", "linear", "cosine"] = "cosine"  # decay after warmup
    warmup_steps: int = 0  # linear warmup steps (overrides warmup_ratio when > 0)
    warmup_ratio: float = 0.0  # warmup as a fraction of total steps
    max_steps: int = 0  # optimizer steps; 0: derive from epochs
    epochs: float = 1.0  # passes over the training data when max_steps is 0
    global_batch_size: int = 64  # examples per optimizer step, over all workers
    micro_batch_size: int = 64  # examples per forward pass on one worker
    max_tokens_per_micro_batch: int = 0  # tokens per micro-batch instead of micro_batch_size; 0 off
    logprob_chunk_size: int = 1024  # tokens per LM-head chunk for log-probs; 0: full logits
    grad_clip: float = 1.0  # max gradient norm; 0 disables clipping
    seed: int = 42  # data order and worker RNG seed
    log_every: int = 10  # steps between metrics lines
    eval_every: int = 0  # steps between eval-loss passes; 0: only at the end
    save_every: int = 0  # steps between checkpoints; 0: only at the end
    keep_last: int = 2  # checkpoints kept in output_dir/checkpoints
    report_to: list[str] = field(default_factory=list)  # trackers: tensorboard, wandb, mlflow
    log_completions_every: int = 0  # RL: iterations between tables of sampled completions; 0 off


@dataclass
class WandbSettings:
    """Weights & Biases, for `trainer.report_to: [wandb]` (unset: W&B's own variables)."""

    project: str | None = None  # None: WANDB_PROJECT, else `align`
    entity: str | None = None  # team or user; None: WANDB_ENTITY, else your default entity


@dataclass
class MlflowSettings:
    """MLflow, for `trainer.report_to: [mlflow]` (unset: MLflow's own variables)."""

    experiment: str | None = None  # None: MLFLOW_EXPERIMENT_NAME or _ID, else `align`


@dataclass
class TrackingConfig:
    """Where the trackers of `trainer.report_to` file the run (see docs/tracking.md)."""

    run_name: str | None = None  # W&B and MLflow run name; None: WANDB_NAME, else output_dir's name
    wandb: WandbSettings = field(default_factory=WandbSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)


@dataclass
class DistributedConfig:
    num_workers: int = 1  # Ray actors (DeepSpeed ranks) for the trained model
    zero_stage: int = 0  # DeepSpeed ZeRO stage 0-3
    offload_optimizer: bool = False  # ZeRO optimizer state offload to CPU
    cpus_per_worker: float | None = None  # None: share this node's CPUs among the workers
    gpus_per_worker: float | None = None  # None: 1 when Ray sees GPUs, else 0
    torch_threads: int | None = None  # torch threads per worker; None: its CPU share
    ray_address: str | None = None  # cluster to join, or auto; None: RAY_ADDRESS, else local
    placement_strategy: PlacementStrategy = "PACK"  # how Ray spreads a role's bundles over nodes
    backend: Literal["auto", "gloo", "nccl"] = "auto"  # auto: nccl with GPUs, else gloo
    call_timeout_s: float | None = 3600.0  # longest one call on the workers may run; None: no limit


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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    # model.disable_dropout when unset: stages that compare the trained forward with an
    # eval-mode one (PPO ratios, DPO's reference) or rank two forwards (rm) turn dropout off.
    dropout_off_by_default: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if self.model.disable_dropout is None:
            self.model.disable_dropout = self.dropout_off_by_default
        columns = self.data.columns
        if columns:
            if self.data.train == EMBEDDED:
                raise ConfigError("data.columns renames the columns of data files; the "
                                  "embedded task's rows already have align's names")
            theirs = list(columns.values())
            if not all(isinstance(c, str) and c for c in theirs):
                raise ConfigError(f"data.columns maps align's names to your column names "
                                  f"(strings), e.g. {{prompt: question}}; got {columns!r}")
            if len(set(theirs)) < len(theirs):
                raise ConfigError(f"data.columns maps one of your columns twice: {columns!r}")
        if self.data.num_proc < 0:
            raise ConfigError(f"data.num_proc must be 0 (automatic) or a number of processes, "
                              f"got {self.data.num_proc}")
        if not 0.0 <= self.data.max_skipped_fraction <= 1.0:
            raise ConfigError(f"data.max_skipped_fraction must lie in [0, 1]; got "
                              f"{self.data.max_skipped_fraction}")


@dataclass
class SFTConfig(RunConfig):
    output_dir: str = "runs/sft"


@dataclass
class RewardModelSettings:
    """Bradley-Terry reward-model training (`align rm`)."""

    center_coef: float = 0.0  # weight of mean((r_c + r_r)^2), which centres rewards on 0; 0: off
    use_margin: bool = True  # subtract a data `margin` column from r_c - r_r when rows have one


@dataclass
class MiningSettings:
    """Hard negatives mined from a policy's own samples (align.trainers.mining)."""

    policy: str | list[str] | None = None  # model folder(s) to sample from; None: no mining
    reward: str = "reward_models.builtin:exact_match"  # verifier spec labelling the samples
    prompts: str | None = None  # RL rows {prompt, ...}; None: the task's (data.train: embedded)
    num_prompts: int = 2000  # training prompts sampled (0: all)
    samples_per_prompt: int = 8  # completions per prompt
    pairs_per_prompt: int = 2  # at most, each the best sample against a worse distinct one
    repeat: int = 1  # times each mined pair joins the training pairs (weights them up)
    max_new_tokens: int = 16  # generation budget per sample
    temperature: float = 1.0  # sampling temperature (> 0: samples must differ to be paired)
    engine: Literal["hf", "vllm"] = "hf"  # where the samples are generated (this process)
    batch_size: int = 256  # prompts per generate call


@dataclass
class RMConfig(RunConfig):
    dropout_off_by_default: ClassVar[bool] = True
    output_dir: str = "runs/rm"
    rm: RewardModelSettings = field(default_factory=RewardModelSettings)
    mining: MiningSettings = field(default_factory=MiningSettings)

    def check(self) -> None:
        if not 0.0 <= self.rm.center_coef < float("inf"):
            raise ConfigError(f"rm.center_coef must be a finite number >= 0; got "
                              f"{self.rm.center_coef}")
        mining = self.mining
        if mining.policy is None:
            return
        if mining.prompts is None and self.data.train != EMBEDDED:
            raise ConfigError("mining.prompts: give the RL rows ({prompt, ...}, with the "
                              "columns mining.reward needs) whose samples are mined")
        for key in ("num_prompts", "samples_per_prompt", "pairs_per_prompt",
                    "max_new_tokens", "batch_size", "repeat"):
            low = 0 if key == "num_prompts" else 2 if key == "samples_per_prompt" else 1
            if getattr(mining, key) < low:
                raise ConfigError(f"mining.{key} must be at least {low}; got "
                                  f"{getattr(mining, key)}")
        if not mining.temperature > 0:
            raise ConfigError(f"mining.temperature must be > 0 (samples must differ); got "
                              f"{mining.temperature}")


@dataclass
class DPOSettings:
    """Direct preference optimisation and its variants (`align dpo`); see align.losses."""

    loss_type: str = "sigmoid"  # a key of align.losses.PREFERENCE_LOSSES; simpo/orpo: no ref
    beta: float = 0.1  # inverse temperature (ipo: tau; simpo: reward scale; orpo: lambda)
    label_smoothing: float = 0.0  # conservative DPO: chance a label is flipped; sigmoid/simpo
    gamma: float = 0.5  # simpo: target reward margin
    nll_coef: float = 0.0  # weight of the NLL of chosen completions (RPO); 0: off
    desirable_weight: float = 1.0  # kto: weight of a desirable row's loss (lambda_D)
    undesirable_weight: float = 1.0  # kto: weight of an undesirable row's loss (lambda_U)
    precompute_reference: bool | None = None  # None: on unless LoRA (reference = adapter off)
    reference_cache_dir: str | None = None  # cached reference log-probs; None: output_dir


@dataclass
class DPOConfig(RunConfig):
    dropout_off_by_default: ClassVar[bool] = True
    output_dir: str = "runs/dpo"
    dpo: DPOSettings = field(default_factory=DPOSettings)

    def check(self) -> None:
        from align.losses import PREFERENCE_LOSSES

        d = self.dpo
        entry = PREFERENCE_LOSSES.get(d.loss_type)
        if entry is None:
            raise ConfigError(f"dpo.loss_type must be one of {', '.join(PREFERENCE_LOSSES)}; "
                              f"got {d.loss_type!r}")
        if d.beta <= 0:
            raise ConfigError(f"dpo.beta must be positive; got {d.beta}")
        if not 0.0 <= d.label_smoothing < 0.5:
            raise ConfigError(f"dpo.label_smoothing must lie in [0, 0.5); got "
                              f"{d.label_smoothing}")
        if d.label_smoothing and not entry.label_smoothing:
            accepting = [k for k, v in PREFERENCE_LOSSES.items() if v.label_smoothing]
            raise ConfigError(f"dpo.label_smoothing applies to dpo.loss_type "
                              f"{' or '.join(accepting)}, not {d.loss_type}; set "
                              "dpo.label_smoothing=0")
        if d.nll_coef < 0:
            raise ConfigError(f"dpo.nll_coef must be >= 0; got {d.nll_coef}")
        if d.nll_coef and (entry.includes_nll or entry.data == "unpaired"):
            why = ("adds the NLL of chosen with weight 1 itself (weight the odds-ratio term with "
                   "dpo.beta)" if entry.includes_nll else "trains on unpaired rows")
            raise ConfigError(f"dpo.loss_type={d.loss_type} {why}: set dpo.nll_coef=0")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(d, name) > 0:
                raise ConfigError(f"dpo.{name} must be positive; got {getattr(d, name)}")
        if entry.data == "unpaired" and self.trainer.global_batch_size < 2:
            raise ConfigError(f"dpo.loss_type={d.loss_type} estimates its KL term from the other "
                              "rows of a batch: trainer.global_batch_size must be at least 2")
        if not entry.needs_reference and d.precompute_reference:
            raise ConfigError(f"dpo.loss_type={d.loss_type} uses no reference model: leave "
                              "dpo.precompute_reference unset (or false)")


@dataclass
class RewardConfig:
    """One entry of a weighted reward list (see reward_models.load_reward for spec forms)."""

    spec: str | list[str] = ""  # module:function, file.py:function, reward-model folder or hub
    # id, or http(s) URL; a list of reward models: an ensemble (reward_models.robust)
    weight: float = 1.0  # multiplier in the weighted sum
    name: str | None = None  # metric name (rewards/<name>/mean); default derived from spec
    style: Literal["trl", "verl", "openrlhf"] | None = None  # calling convention of the function
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound arguments / client options
    timeout_s: float | None = 600.0  # seconds one call may take before the run stops; null: none
    uncertainty_penalty: float = 1.0  # ensemble: score mean - k * std across members
    normalize: bool = False  # standardise by a running mean/std of the latest raw values
    normalize_window: int = 4096  # raw values the running statistics cover
    clip: list[float] | None = None  # [low, high]: bounds applied after normalising


@dataclass
class AlgorithmConfig:
    estimator: Literal["gae", "grpo", "rloo", "reinforce_pp"] = "grpo"  # advantage estimator
    gamma: float = 1.0  # discount (gae, reinforce_pp)
    lam: float = 0.95  # GAE lambda
    scale_by_std: bool = True  # grpo: divide group-centred rewards by the group std
    whiten_advantages: bool = True  # gae: whiten advantages over the batch
    kl_coef: float = 0.04  # weight of the KL to the reference (initial value when adaptive)
    kl_estimator: Literal["k1", "k2", "k3"] | None = None  # None: k1 in the reward, k3 in loss
    kl_in_reward: bool | None = None  # per-token reward penalty; None: yes for gae/reinforce_pp
    adaptive_kl: bool = False  # adapt kl_coef towards kl_target (Ziegler et al. 2019)
    kl_target: float = 0.1  # adaptive KL: target per-sequence KL
    kl_horizon: int = 10000  # adaptive KL: samples; gain per iteration = its samples / horizon
    clip_eps: float = 0.2  # PPO ratio clip (lower side, and upper unless clip_eps_high)
    clip_eps_high: float | None = None  # upper ratio clip (DAPO clip-higher); None: clip_eps
    dual_clip: float | None = None  # dual clip c > 1 for negative advantages; None: off
    value_clip_eps: float | None = 0.2  # critic value clip; None: unclipped
    ppo_epochs: int = 1  # passes over each rollout buffer
    # token: DAPO; sequence: GRPO; constant: Dr. GRPO (sum / samples x max_new_tokens)
    loss_aggregation: Aggregation = "token"  # constant: Dr. GRPO; see ppo_policy_loss
    importance_sampling_level: Literal["token", "sequence"] = "token"  # sequence: GSPO's ratio
    entropy_coef: float = 0.0  # entropy bonus weight
    tis_cap: float | None = None  # truncated importance sampling cap (engine mismatch); None: off


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
    dropout_off_by_default: ClassVar[bool] = True
    output_dir: str = "runs/ppo"
    rewards: list[RewardConfig] = field(default_factory=list)  # weighted sum is the reward
    gold_rewards: list[RewardConfig] = field(default_factory=list)  # logged only (reward/gold)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    critic: CriticConfig = field(default_factory=CriticConfig)
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)  # model-written code runs here

    def check(self) -> None:
        ro, alg = self.rollout, self.algorithm
        env = None
        if self.environment.enabled:  # user code is imported and checked here, before any actor
            from align.episodes.environment import load_environment

            env = load_environment(self.environment)
        env_rewards = env is not None and (
            env.protocol == "turns" or (env.has_reward and self.environment.reward_weight))
        if not self.rewards and not env_rewards:
            raise ConfigError("rewards: give at least one reward, e.g. "
                              "rewards=[{spec: reward_models.builtin:exact_match}], or an "
                              "environment.spec class with a get_reward() method (and a "
                              "non-zero environment.reward_weight), or a TurnEnvironment "
                              "(its per-turn rewards)")
        for i, entry in enumerate([*self.rewards, *self.gold_rewards]):
            if not entry.spec:
                raise ConfigError(f"rewards[{i}].spec is empty")
            if entry.normalize or entry.clip is not None:
                from reward_models.robust import RewardShaping

                RewardShaping(entry.normalize, entry.normalize_window, entry.clip,
                              f"rewards[{i}]")
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
        for key in ("prefix_cache_mb", "draft_tokens"):
            if getattr(ro, key) < 0:
                raise ConfigError(f"rollout.{key} must be 0 (off) or more, got "
                                  f"{getattr(ro, key)}")
        if alg.dual_clip is not None and alg.dual_clip <= 1:
            raise ConfigError("algorithm.dual_clip must be greater than 1")
        if alg.adaptive_kl and alg.kl_horizon < buffer:
            raise ConfigError(
                f"algorithm.kl_horizon={alg.kl_horizon} counts samples (TRL, OpenRLHF: 10000) and "
                f"is below the {buffer} samples of one iteration: kl_coef would move by more "
                "than the whole error each iteration; raise it")
        self._check_kl()
        if alg.tis_cap is not None and alg.tis_cap < 1:
            raise ConfigError(f"algorithm.tis_cap must be at least 1 (it caps importance "
                              f"weights around 1); got {alg.tis_cap}")
        check_vllm_settings(ro.vllm, self.distributed.num_workers)
        if ro.dynamic_sampling and alg.estimator not in ("grpo", "rloo"):
            raise ConfigError("rollout.dynamic_sampling drops groups whose rewards are all equal "
                              "(they get zero advantage under grpo and rloo only): set "
                              f"algorithm.estimator to grpo or rloo, not {alg.estimator}")
        if ro.max_resample_rounds < 0:
            raise ConfigError("rollout.max_resample_rounds must be >= 0")
        self._check_async()

    def _check_async(self) -> None:
        ro = self.rollout
        if ro.async_steps < 0:
            raise ConfigError(f"rollout.async_steps must be >= 0; got {ro.async_steps}")
        if ro.timeout_s <= 0:
            raise ConfigError(f"rollout.timeout_s must be positive; got {ro.timeout_s}")
        if ro.async_steps and (ro.engine == "hf" or ro.vllm.colocate):
            raise ConfigError(
                f"rollout.async_steps={ro.async_steps} generates while the policy trains, so it "
                "needs engines of their own: set rollout.engine=vllm and "
                "rollout.vllm.colocate=false (or rollout.async_steps=0)")

    def _check_kl(self) -> None:
        """Refuse a KL estimator whose expected gradient is not that of a KL where it goes."""
        from align.advantages import kl_estimator_problem, kl_placement

        alg = self.algorithm
        in_reward, estimator = kl_placement(alg.estimator, alg.kl_in_reward, alg.kl_estimator)
        problem = kl_estimator_problem(estimator, in_reward)
        if problem and (alg.kl_coef > 0 or alg.adaptive_kl):
            where = "a per-token reward penalty" if in_reward else "a loss term"
            raise ConfigError(
                f"algorithm.kl_estimator={estimator} with the KL as {where} "
                f"(algorithm.estimator={alg.estimator}, algorithm.kl_in_reward="
                f"{str(alg.kl_in_reward).lower() if alg.kl_in_reward is not None else 'null'}): "
                f"{problem}. Leave algorithm.kl_estimator unset to get the right one")


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


def validate_common(config: Any) -> None:
    """Cross-field checks shared by every stage (each names the keys involved)."""
    if not isinstance(config, RunConfig):
        return
    tr, dist = config.trainer, config.distributed
    if not 0 <= dist.zero_stage <= 3:
        raise ConfigError(f"distributed.zero_stage must be 0, 1, 2 or 3; got {dist.zero_stage}")
    if dist.num_workers < 1:
        raise ConfigError("distributed.num_workers must be at least 1")
    if dist.call_timeout_s is not None and not dist.call_timeout_s > 0:
        raise ConfigError(f"distributed.call_timeout_s must be positive (or null for no "
                          f"limit); got {dist.call_timeout_s}")
    for name in ("global_batch_size", "micro_batch_size"):
        if getattr(tr, name) < 1:
            raise ConfigError(f"trainer.{name} must be at least 1")
    for name in ("logprob_chunk_size", "max_tokens_per_micro_batch"):
        if getattr(tr, name) < 0:
            raise ConfigError(f"trainer.{name} must be >= 0 (0: off); got {getattr(tr, name)}")
    by_tokens = tr.max_tokens_per_micro_batch > 0  # then micro_batch_size plays no part
    per_step = dist.num_workers * (1 if by_tokens else tr.micro_batch_size)
    if tr.global_batch_size % per_step:
        raise ConfigError(
            f"trainer.global_batch_size={tr.global_batch_size} must be a multiple of "
            + (f"distributed.num_workers = {per_step} (with trainer.max_tokens_per_micro_batch)"
               if by_tokens else
               f"trainer.micro_batch_size x distributed.num_workers = {per_step}"))
    if tr.lr <= 0:
        raise ConfigError(f"trainer.lr must be positive; got {tr.lr}")
    if config.data.packing_length is not None and config.data.packing_length < 1:
        raise ConfigError("data.packing_length must be at least 1 (or unset)")
    if config.data.shared_prefix and config.data.packing is False:
        raise ConfigError("data.shared_prefix=true packs shared prefixes, but data.packing=false "
                          "pads: leave data.packing unset (or true), or data.shared_prefix unset")
    if not 0 <= config.data.eval_fraction < 1:
        raise ConfigError("data.eval_fraction must be in [0, 1)")
    if config.model.lora.enabled and config.model.lora.r < 1:
        raise ConfigError("model.lora.r must be at least 1")
    check_trackers(tr.report_to)
    if tr.log_completions_every < 0:
        raise ConfigError("trainer.log_completions_every must be >= 0")
    if config.model.disable_dropout and config.model.lora.enabled and config.model.lora.dropout:
        raise ConfigError(f"model.lora.dropout={config.model.lora.dropout} would be set to 0 by "
                          "model.disable_dropout (on by default for ppo, dpo and rm): set "
                          "model.lora.dropout=0, or model.disable_dropout=false")
    if tr.compile and dist.zero_stage == 3:
        raise ConfigError("trainer.compile=true does not work with distributed.zero_stage=3 "
                          "(its parameter hooks gather weights inside the compiled forward): "
                          "use ZeRO 0-2 with trainer.compile, or turn it off")
    if len(tr.adam_betas) != 2:
        raise ConfigError("trainer.adam_betas must have two numbers, e.g. [0.9, 0.999]")
