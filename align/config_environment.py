"""The settings of the world an RL policy acts in: multi-turn environments and their tools
(`environment.*`, align.episodes) and the sandbox that runs model-written code (`sandbox.*`,
align.sandbox). Part of the run configuration (align.config re-exports them)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class EnvironmentConfig:
    """Multi-turn episodes (align.episodes, docs/environments.md): an environment class, tool
    functions, or both. Unset (no spec, no tools): every rollout is one turn, no tools."""

    spec: str | None = None  # FILE.py:Class or module:Class, one instance per episode (TRL's
    # environment_factory class form, or an align.episodes.TurnEnvironment)
    tools: list[str] = field(default_factory=list)  # FILE.py:fn / module:fn tool functions
    max_turns: int = 8  # model turns per episode
    max_tokens_per_turn: int | None = None  # new tokens of one model turn; None: max_new_tokens
    max_episode_tokens: int = 1024  # tokens after the prompt: model + environment turns
    max_tool_output_tokens: int = 256  # a longer tool/environment turn is cut (flagged)
    tool_timeout_s: float = 30.0  # one tool call; past it: an infrastructure failure
    episode_timeout_s: float = 600.0  # one episode's wall clock; past it: infrastructure failure
    max_concurrent_tools: int = 16  # tool calls running at once, over all episodes
    max_infra_failure_fraction: float = 0.25  # stop when more of an iteration's episodes fail
    reward_weight: float = 1.0  # weight of the environment's get_reward() in the reward sum
    on_drift: Literal["report", "error"] = "report"  # re-rendered conversation != trained tokens
    tool_call_format: Literal["auto", "hermes"] = "auto"  # auto: the tokenizer's response
    # parser where it defines one, else Hermes/Qwen2.5 <tool_call>{json}</tool_call>
    on_malformed_call: Literal["respond", "end"] = "respond"  # a call that does not parse:
    # respond: its error is the tool's answer; end: the turn is the episode's last (counted)

    @property
    def enabled(self) -> bool:
        return bool(self.spec or self.tools)


@dataclass
class SandboxLimits:
    """What one execution of model-written code may use (align.sandbox, docs/sandbox.md)."""

    timeout_s: float = 10.0  # wall clock; past it every process of the execution is killed
    cpu_time_s: int = 10  # CPU seconds per process (RLIMIT_CPU)
    memory_mb: int = 1024  # address space per process (RLIMIT_AS)
    file_size_mb: int = 16  # largest file the code may write (RLIMIT_FSIZE)
    disk_mb: int = 64  # local: the private working folder and /tmp together (a tmpfs)
    open_files: int = 64  # file descriptors per process (RLIMIT_NOFILE)
    processes: int = 16  # local: processes and threads at once (RLIMIT_NPROC, per execution)
    max_output_bytes: int = 65536  # stdout and stderr each; more stops the code (cut, flagged)


@dataclass
class SandboxConfig:
    """Where model-written code runs: the python tool and reward_models.builtin:code_tests."""

    backend: Literal["local", "http"] = "local"  # local: namespaces + rlimits; http: a service
    limits: SandboxLimits = field(default_factory=SandboxLimits)
    max_concurrent: int = 8  # executions at once in one process (code_tests, tools)
    allow_network: bool = False  # local: true runs without a network namespace (code reaches it)
    python: str | None = None  # local: interpreter of the code; None: the one running align
    hide_paths: list[str] = field(default_factory=lambda: ["~"])  # local: seen empty (~: home)
    env: dict[str, str] = field(default_factory=dict)  # more variables; none are inherited
    url: str | None = None  # http: a SandboxFusion service (POST {url}/run_code)
    max_tries: int = 3  # http: attempts in all (connection errors, 429, 502, 503, 504)
    backoff_s: float = 0.5  # http: wait before the 2nd attempt; doubles for each further one
    token_env: str | None = None  # http: environment variable holding a bearer token
