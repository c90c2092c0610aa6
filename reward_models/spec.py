"""RewardSpec: one entry of a config's weighted reward list, and how it is written.

In YAML an entry is either a bare string or a mapping::

    rewards:
      - reward_models.builtin:exact_match                 # module:function, weight 1
      - spec: rewards/mine.py:score                       # file.py:function, relative path
        weight: 0.5
        name: mine                                        # logged as rewards/mine/mean
      - spec: reward_models.builtin:length_penalty
        kwargs: {target_chars: 4, per_char: 0.05}         # bound like functools.partial
      - verl:rewards/gsm8k.py:compute_score               # a veRL-style function (prefix form)
      - {spec: rewards/orm.py:reward_func, style: openrlhf}   # an OpenRLHF one (mapping form)
      - runs/rm/final                                     # a trained reward-model folder
      - Skywork/Skywork-Reward-V2-Qwen3-0.6B              # a reward model on the hub
      - https://rm.example.com/score                      # a JSON API
      - spec: [runs/rm-0/final, runs/rm-1/final]          # an ensemble: mean - k * std
        uncertainty_penalty: 1.0
        normalize: true                                   # running mean 0, std 1
        clip: [-3, 3]                                     # then bounded

Styles name the calling convention a function was written for: ``trl`` (the default, the
Reward protocol), ``verl`` (``compute_score(data_source, solution_str, ground_truth,
extra_info)`` per sample) or ``openrlhf`` (``reward_func(queries, prompts, labels)``). The prefix
``<style>:`` is recognised only when what follows is itself a ``location:function`` target, so a
module that happens to be called ``verl`` (``verl:fn``) is still read as a module.

``load_reward`` turns a spec into a checked ``LoadedReward``; the kinds, tried in order:

1. ``http://...`` or ``https://...``: an ``HttpReward`` (``kwargs`` are its options); with
   style ``openrlhf`` (``openrlhf:http://host:5000/get_reward``) it speaks OpenRLHF's remote
   reward-model protocol.
2. An existing directory: a trained reward-model folder (``config.json``, or
   ``adapter_config.json`` for a LoRA adapter), scored by a ``RewardModelScorer``; torch and
   Ray are imported only then.
3. A hub id ``org/name`` that names nothing on this machine: a reward model on the Hugging
   Face Hub (``align.hub``: checked, then fetched into the local cache, by each process that
   loads it; offline, read from the cache), scored like a folder.
4. ``pkg.module:fn`` or ``path/to/file.py:fn``, adapted to its ``style`` (see style_adapters),
   loaded by ``align.user_code`` (a file runs once per process as a private module; ``fn`` may
   be dotted, ``module:Scorer.score``).

A list of specs is an ensemble (``reward_models.robust``); ``normalize`` and ``clip`` shape an
entry's values before its weight applies (``reward_models.robust``, done by CombinedReward).
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from align.errors import AlignError, ConfigError, RewardError, did_you_mean
from align.hub import is_repo_id
from align.user_code import is_file_location, is_function_target, load_object, resolve_path
from reward_models.http_reward import HttpReward
from reward_models.protocol import LoadedReward
from reward_models.style_adapters import adapt

STYLES = ("trl", "verl", "openrlhf")
"""Calling conventions a function reward may be written in; ``trl`` is the Reward protocol."""


@dataclass(frozen=True)
class RewardSpec:
    """One weighted reward of a config.

    A ``<style>:`` prefix on ``spec`` is moved into ``style`` when the spec is built, so
    ``RewardSpec("verl:f.py:fn")`` equals ``RewardSpec("f.py:fn", style="verl")``.

    Raises:
        ConfigError: When a field has the wrong type or value (the message names it).
    """

    spec: str | tuple[str, ...]  # module:function, path/file.py:function, a reward-model
    # folder, or http(s) URL; a list of them (reward-model folders): an ensemble
    weight: float = 1.0  # factor in the weighted sum; 0 computes and logs it without training on it
    name: str | None = None  # metric name (rewards/<name>/mean); default derived from the spec
    style: str | None = None  # calling convention of a function: trl (default), verl, openrlhf
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound to the function like
    # functools.partial; for a URL or folder, options of that loader (e.g. timeout_s)
    timeout_s: float | None = None  # seconds one call may take before the run stops; None: no limit
    uncertainty_penalty: float = 1.0  # ensemble: k in mean - k * std across members
    normalize: bool = False  # standardise with a running mean and std (reward_models.robust)
    normalize_window: int = 4096  # raw values the running statistics cover
    clip: tuple[float, float] | None = None  # [low, high] bounds applied after normalising

    def __post_init__(self) -> None:
        if isinstance(self.spec, (list, tuple)):
            self._check_members()
            return
        if not isinstance(self.spec, str) or not self.spec.strip():
            raise ConfigError(f"reward spec must be a non-empty string, got {self.spec!r}")
        prefix_style, target = split_style_prefix(self.spec.strip())
        style = self.style.lower() if isinstance(self.style, str) else self.style
        if style is not None and style not in STYLES:
            raise ConfigError(
                f"reward {self.spec!r}: unknown style {self.style!r}; choose one of "
                f"{', '.join(STYLES)}"
            )
        if prefix_style is not None and style is not None and prefix_style != style:
            raise ConfigError(
                f"reward {self.spec!r}: prefix says style {prefix_style!r} but style is "
                f"{style!r}; give one of them"
            )
        object.__setattr__(self, "spec", target)
        object.__setattr__(self, "style", prefix_style or style)
        self._check_weight_name_kwargs()

    def _check_members(self) -> None:
        members = self.spec
        if len(members) < 2 or not all(isinstance(m, str) and m.strip() for m in members):
            raise ConfigError(f"reward spec {list(members)!r}: an ensemble is a list of at "
                              "least two non-empty specs (reward-model folders)")
        if self.style not in (None, "trl"):
            raise ConfigError(f"reward {list(members)!r}: style applies to one function, "
                              "not to an ensemble")
        object.__setattr__(self, "spec", tuple(m.strip() for m in members))
        self._check_weight_name_kwargs()

    @property
    def members(self) -> tuple[str, ...]:
        """The member specs of an ensemble; () for a single reward."""
        return self.spec if isinstance(self.spec, tuple) else ()

    def _check_weight_name_kwargs(self) -> None:
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, numbers.Real):
            raise ConfigError(f"reward {self.label!r}: weight must be a number, got {weight!r}")
        if not math.isfinite(float(weight)):
            raise ConfigError(f"reward {self.label!r}: weight must be finite, got {weight!r}")
        object.__setattr__(self, "weight", float(weight))
        if self.name is not None and (not isinstance(self.name, str) or not self.name.strip()):
            raise ConfigError(
                f"reward {self.label!r}: name must be a non-empty string, got {self.name!r}"
            )
        timeout = self.timeout_s
        if timeout is not None and (isinstance(timeout, bool) or not isinstance(
                timeout, numbers.Real) or not 0 < timeout < math.inf):
            raise ConfigError(f"reward {self.label!r}: timeout_s must be a positive number of "
                              f"seconds (or null for no limit), got {timeout!r}")
        if not isinstance(self.kwargs, dict) or not all(isinstance(k, str) for k in self.kwargs):
            raise ConfigError(
                f"reward {self.label!r}: kwargs must be a mapping of names to values, "
                f"got {self.kwargs!r}"
            )
        if isinstance(self.clip, list):
            object.__setattr__(self, "clip", tuple(self.clip))

    @property
    def label(self) -> str:
        """The spec as a user would write it (style prefix included): used in every message."""
        if self.members:
            return "[" + ", ".join(self.members) + "]"
        return f"{self.style}:{self.spec}" if self.style else self.spec

    @classmethod
    def coerce(cls, value: str | dict[str, Any] | RewardSpec, where: str = "reward") -> RewardSpec:
        """Build a RewardSpec from a config value: a string, a mapping, or a RewardSpec.

        Args:
            value: A spec string (``"verl:f.py:fn"``), a mapping with the dataclass's field names,
                or an existing RewardSpec (returned as is).
            where: Where the value came from (``"rewards[2]"``), for messages.

        Returns:
            The validated spec.

        Raises:
            ConfigError: On an unknown key (the closest valid key suggested), a missing
                ``spec``, or a value of the wrong type.
        """
        if isinstance(value, RewardSpec):
            return value
        if isinstance(value, str):
            return cls(spec=value)
        if not isinstance(value, dict):
            raise ConfigError(
                f"{where}: a reward is a spec string or a mapping with a 'spec' key, "
                f"got {type(value).__name__}"
            )
        known = [f.name for f in fields(cls)]
        for key in value:
            if key not in known:
                hint = did_you_mean(key, known, otherwise=f"; valid keys: {known}")
                raise ConfigError(f"{where}: unknown key {key!r}{hint}")
        if "spec" not in value:
            raise ConfigError(f"{where}: missing 'spec' (what to load, e.g. 'pkg.module:fn')")
        kwargs = value.get("kwargs")
        return cls(**{**value, "kwargs": {} if kwargs is None else kwargs})


def split_style_prefix(text: str) -> tuple[str | None, str]:
    """Split ``"verl:f.py:fn"`` into ``("verl", "f.py:fn")``; other strings have no style.

    Args:
        text: A spec string.

    Returns:
        The style (or None) and the rest of the spec.
    """
    head, sep, rest = text.partition(":")
    if sep and head.lower() in STYLES and ":" in rest:
        return head.lower(), rest
    return None, text


# ------------------------------------------------------------------------------ loading

def load_reward(
    spec: str | dict[str, Any] | RewardSpec, base_dir: str | Path | None = None
) -> LoadedReward:
    """Load one reward from its spec.

    Args:
        spec: ``"pkg.module:fn"``, ``"path/file.py:fn"``, ``"verl:path/file.py:fn"``, a folder,
            an ``http(s)://`` URL, a mapping ``{spec, weight, name, style, kwargs}``, or a
            RewardSpec.
        base_dir: Folder that relative paths resolve against (default: the current directory,
            which is what trainers use: a config's reward paths resolve like its other paths,
            against the directory the command runs in, not the config file's folder).

    Returns:
        A LoadedReward: callable as ``fn(prompts, completions, **columns)``, validating output.

    Raises:
        ConfigError: When the spec cannot be loaded (missing module, file or function, not
            callable, a signature that does not fit the style); the message names the spec.
        RewardError: For a folder that is not a reward model.
    """
    reward_spec = RewardSpec.coerce(spec)
    base = Path(base_dir if base_dir is not None else Path.cwd()).expanduser().resolve()
    fn = _build(reward_spec, base)
    return LoadedReward(fn, label=reward_spec.label,
                        name=reward_spec.name or default_reward_name(reward_spec),
                        reload=functools.partial(load_reward, reward_spec, base),
                        timeout_s=reward_spec.timeout_s)


def default_reward_name(spec: RewardSpec) -> str:
    """A metric name from the spec: the function name, the URL's host, or the folder's name
    (`ensemble` for a list)."""
    if spec.members:
        return "ensemble"
    target = spec.spec
    if target.startswith(("http://", "https://")):
        return urlparse(target).hostname or "http"
    if is_function_target(target):
        return target.rpartition(":")[2].rpartition(".")[2]
    return Path(target.rstrip("/\\")).name or target


def holds_model(path: Path) -> bool:
    """Whether a folder holds a Hugging Face model or a peft adapter for one."""
    return (path / "config.json").is_file() or (path / "adapter_config.json").is_file()


def _build(spec: RewardSpec, base_dir: Path) -> Callable[..., Any]:
    if spec.members:
        return _ensemble(spec, base_dir)
    target = spec.spec
    if target.startswith(("http://", "https://")):
        return _http_reward(spec)
    path = resolve_path(target, base_dir)
    if path.is_dir():
        _refuse_style(spec, "a reward-model folder")
        if not holds_model(path):
            raise RewardError(
                f"reward {spec.label!r}: folder {path} is not a reward model (no config.json); "
                "point at the final/ folder a reward-model run saved, or at a file.py:function")
        return _reward_model(path, spec)
    if is_repo_id(target) and not path.exists():
        _refuse_style(spec, "a reward model")
        return _reward_model(target, spec)
    if is_function_target(target):
        fn = load_object(target, base_dir, f"reward {spec.label!r}")
        return adapt(fn, spec.style, spec.kwargs, spec.label)
    if is_file_location(target):
        raise ConfigError(
            f"reward {spec.label!r}: {path} is not a folder; a file needs the function to call "
            "after a colon (path/to/file.py:function)"
        )
    raise ConfigError(
        f"reward {spec.label!r}: cannot tell what this is; expected pkg.module:function, "
        "path/to/file.py:function, a reward-model folder, a hub id (org/name), or an "
        "http(s):// URL"
    )


def _http_reward(spec: RewardSpec) -> HttpReward:
    """A URL: align's JSON API, or with style ``openrlhf`` OpenRLHF's remote reward model."""
    if spec.style == "verl":
        _refuse_style(spec, "a URL (its protocol is align's or openrlhf's)")
    options = [f.name for f in fields(HttpReward) if f.name != "url"]
    for key in spec.kwargs:
        if key not in options:
            hint = did_you_mean(key, options, otherwise=f"; options: {options}")
            raise ConfigError(f"reward {spec.label!r}: unknown URL option {key!r}{hint}")
    kwargs = dict(spec.kwargs)
    if spec.style == "openrlhf":
        if kwargs.setdefault("protocol", "openrlhf") != "openrlhf":
            raise ConfigError(f"reward {spec.label!r}: style openrlhf speaks the openrlhf "
                              f"protocol, but kwargs.protocol is {kwargs['protocol']!r}")
    return HttpReward(spec.spec, **kwargs)


def _reward_model(path: Path | str, spec: RewardSpec) -> Callable[..., Any]:
    """A RewardModelScorer for a model folder or hub id; torch and Ray load only here."""
    from reward_models.reward_model import RewardModelScorer

    try:
        return RewardModelScorer.from_options(path, spec.label, spec.kwargs)
    except AlignError:
        raise
    except Exception as err:
        raise ConfigError(f"reward {spec.label!r}: loading the reward model in {path} failed: "
                          f"{type(err).__name__}: {err}") from err


def _ensemble(spec: RewardSpec, base_dir: Path) -> Callable[..., Any]:
    """The members loaded one by one (each with the entry's kwargs), then combined."""
    from reward_models.robust import EnsembleReward

    members: list[Callable[..., Any]] = []
    try:
        for i, member in enumerate(spec.members):
            try:
                members.append(_build(RewardSpec(member, kwargs=spec.kwargs), base_dir))
            except (ConfigError, RewardError) as err:
                raise type(err)(f"ensemble member {i}: {err}") from err
        return EnsembleReward(members, spec.uncertainty_penalty, spec.label)
    except BaseException:  # members loaded so far may hold Ray actors
        for member in members:
            close = getattr(member, "close", None)
            if callable(close):
                close()
        raise


def _refuse_style(spec: RewardSpec, what: str) -> None:
    if spec.style not in (None, "trl"):
        raise ConfigError(
            f"reward {spec.label!r}: style {spec.style!r} applies to functions, not to {what}"
        )
