"""The samples `align eval` scores: k completions of every prompt by a saved policy, one turn
each or, with an environment, whole episodes.

The model is loaded once into a `LocalEngine` (align.rollout.local, `hf` or `vllm` in this
process) and every sample is played by the episode runner, as `align ppo` plays its rollouts
(align.episodes.runner): without an environment a one-turn episode, which is a plain
completion; with one (`--environment`, `--tool`), turns of the model and of the environment's
tools until the model answers or a budget runs out. Mining pairs for `align rm` generates with
the same engine (`generate`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from align.config import EnvironmentConfig, ModelConfig
from align.data import tokenize_prompts
from align.errors import ConfigError
from align.reward_columns import COMPLETION_IDS_COLUMN, ENVIRONMENT_REWARD_COLUMN
from align.rollout.base import Sampling

# The command-line option that sets each environment field, for messages.
ENVIRONMENT_OPTIONS = {"spec": "--environment", "tools": "--tool", "max_turns": "--max-turns",
                       "max_tokens_per_turn": "--max-tokens-per-turn",
                       "max_episode_tokens": "--max-episode-tokens"}
CHAT_TEMPLATE_OPTION = "--chat-template"


@dataclass
class EvalSettings:
    """How `align eval` generates (the CLI's options)."""

    max_new_tokens: int = 64  # tokens of one answer (of one model turn, with an environment)
    greedy: bool = True
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    batch_size: int = 64
    max_samples: int = 0  # 0: every prompt
    max_length: int = 1024  # longest prompt accepted, in tokens
    engine: str = "hf"  # hf (this process) or vllm
    split: str = "train"
    dtype: str = "auto"
    samples_per_prompt: int = 1  # k: samples of every prompt (pass@k, mean@k); > 1 samples
    chat_template: str | None = None  # replaces the model folder's chat template
    environment: EnvironmentConfig = field(default_factory=EnvironmentConfig)  # episodes

    def check(self) -> None:
        """Refuse settings that cannot work, naming the command-line option.

        Raises:
            ConfigError: naming the option and what is wrong.
        """
        if self.samples_per_prompt < 1:
            raise ConfigError(f"-k/--samples-per-prompt must be at least 1, got "
                              f"{self.samples_per_prompt}")
        if self.samples_per_prompt > 1 and self.greedy:
            raise ConfigError(f"-k/--samples-per-prompt {self.samples_per_prompt} needs "
                              "sampling: greedy decoding gives k identical samples")
        if not self.greedy and not self.temperature > 0:
            raise ConfigError(f"--temperature must be above 0 when sampling, got "
                              f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.max_samples < 0:
            raise ConfigError(f"--max-samples must be 0 (every prompt) or more, got "
                              f"{self.max_samples}")

    def sampling(self, logprobs: bool = False) -> Sampling:
        return Sampling(max_new_tokens=self.max_new_tokens, greedy=self.greedy,
                        temperature=self.temperature, top_p=self.top_p, seed=self.seed,
                        logprobs=logprobs)


@dataclass
class Samples:
    """Every sample of one model, prompt-major (prompt 0's k samples, then prompt 1's...)."""

    prompts: list[str]  # the prompt as the model saw it, per sample
    texts: list[str]  # the completion: the last model turn's text, special tokens removed
    columns: dict[str, list[Any]]  # what the rewards receive besides prompts and texts
    k: int  # samples per prompt
    episodes: list[Any] | None = None  # with an environment: align.episodes.Episode each


def load_eval_environment(settings: EvalSettings) -> Any | None:
    """The checked environment of `--environment`/`--tool` (align.episodes.environment), or
    None without one.

    Raises:
        ConfigError: naming the option (a missing class or tool, a bad budget...).
    """
    if not settings.environment.enabled:
        return None
    from align.episodes.environment import load_environment

    return load_environment(settings.environment, ENVIRONMENT_OPTIONS)


def load_eval_tokenizer(model_path: str, settings: EvalSettings, spec: Any | None) -> Any:
    """MODEL's tokenizer (with `--chat-template`), checked to render the environment's tools."""
    from align.episodes.environment import check_tool_template
    from align.model_loading import load_tokenizer

    # tokenizer= the folder itself: an adapter folder holds its tokenizer but no config.json
    tokenizer = load_tokenizer(ModelConfig(name_or_path=model_path, tokenizer=model_path,
                                           chat_template=settings.chat_template))
    check_tool_template(tokenizer, spec, CHAT_TEMPLATE_OPTION)
    return tokenizer


def open_engine(model_path: str, tokenizer: Any, settings: EvalSettings) -> Any:
    """A LocalEngine of `model_path` (the caller closes it), sized for a prompt and a whole
    episode (or answer).

    Raises:
        ConfigError: an `--engine` other than hf and vllm, or vllm where it is not installed.
    """
    from align.rollout.local import LocalEngine

    if settings.engine not in ("hf", "vllm"):
        raise ConfigError(f"--engine must be hf or vllm, got {settings.engine!r}")
    if settings.engine == "vllm":
        from align.rollout.factory import vllm_installed

        if not vllm_installed():
            raise ConfigError("--engine vllm: vLLM is not installed (`make install` adds it); "
                              "or use --engine hf")
    env = settings.environment
    after_prompt = env.max_episode_tokens if env.enabled else settings.max_new_tokens
    return LocalEngine(ModelConfig(name_or_path=model_path, dtype=settings.dtype), tokenizer,
                       settings.engine, settings.batch_size, settings.max_length + after_prompt)


def generate(model_path: str, prompts: list[list[int]], tokenizer: Any,
             settings: EvalSettings) -> list[list[int]]:
    """Completion token ids (EOS kept where generation stopped) of every prompt, in order."""
    with open_engine(model_path, tokenizer, settings) as engine:
        return engine.generate(prompts, settings.sampling()).tokens


def complete(model_path: str, rows: list[dict], source: str, settings: EvalSettings,
             spec: Any | None) -> Samples:
    """`settings.samples_per_prompt` samples of every row's prompt by `model_path`."""
    tokenizer = load_eval_tokenizer(model_path, settings, spec)
    examples = tokenize_prompts(rows, tokenizer, settings.max_length, source)
    with open_engine(model_path, tokenizer, settings) as engine:
        return play(engine, tokenizer, examples, settings, spec)


def play(engine: Any, tokenizer: Any, examples: list[Any], settings: EvalSettings,
         spec: Any | None) -> Samples:
    """Play k samples of every example on `engine` (`generate(prompts, sampling)` and
    `eos_ids`). The columns are the rewards' as `align ppo` passes them
    (reward_models.protocol): the rows' other columns, the prompts' messages where
    conversational, `completion_ids`, `completion_truncated`, and with an environment the
    episodes' messages, instances and environment reward. A TurnEnvironment's environment
    reward is the episode's return: its per-turn rewards summed (and its `get_reward()`)."""
    from align.episodes.assemble import episodes_rollout
    from align.episodes.runner import EpisodeRunner
    from align.trainers.rollout import completion_ids
    from reward_models.protocol import TRUNCATED_COLUMN

    k = settings.samples_per_prompt
    runner = EpisodeRunner(tokenizer, engine.eos_ids, settings.environment, spec,
                           settings.max_length)
    # An episode's model tokens carry the engine's log-probs (align.episodes.episode).
    sampling = settings.sampling(logprobs=runner.multi_turn)
    episodes = runner.run(engine, [e for e in examples for _ in range(k)], sampling)
    rollout = episodes_rollout(tokenizer, examples, k, episodes, engine.eos_ids,
                               runner.multi_turn)
    columns = {COMPLETION_IDS_COLUMN: completion_ids(rollout), **rollout.columns,
               TRUNCATED_COLUMN: rollout.truncated}
    if spec is not None and spec.protocol == "turns":
        columns[ENVIRONMENT_REWARD_COLUMN] = [episode_return(e) for e in episodes]
    return Samples(rollout.prompts, rollout.completions, columns, k,
                   episodes if runner.multi_turn else None)


def episode_return(episode: Any) -> float:
    """A TurnEnvironment episode's undiscounted return: every turn's reward plus the
    environment's `get_reward()` where it has one."""
    return sum(s.reward for s in episode.segments) + (episode.env_reward or 0.0)


def episode_record(episode: Any) -> dict[str, Any]:
    """What the samples file keeps of an episode: the whole conversation and its counts."""
    return {"messages": episode.messages, "turns": episode.turns,
            "tool_calls": episode.tool_calls, "tool_errors": episode.tool_errors,
            "truncated": episode.truncated, "infra_error": episode.infra_error,
            "drift": None if episode.drift is None else episode.drift.describe()}

