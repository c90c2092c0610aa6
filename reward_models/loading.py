"""load_reward: turn a spec (string, mapping or RewardSpec) into a checked Reward.

A spec is tried against kinds in order: kinds registered with ``register_spec_kind`` (newest
first), then the built-in ones:

1. ``http://...`` or ``https://...``: an ``HttpReward`` (``kwargs`` are its options).
2. An existing directory: a trained reward-model folder. Scoring one needs the model loader,
   which plugs in with one line from its own module::

       register_spec_kind("reward model folder", is_model_folder, RewardModelScorer.from_spec)

   Until then a folder is a RewardError: "not a reward model (no config.json)" or "needs the
   reward-model loader".
3. ``pkg.module:fn`` or ``path/to/file.py:fn``, adapted to its ``style`` (see style_adapters).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from align.errors import AlignError, ConfigError, RewardError
from reward_models.function_loader import (
    is_file_location,
    is_function_target,
    load_callable,
    resolve_path,
)
from reward_models.http_reward import HttpReward
from reward_models.loaded_reward import LoadedReward
from reward_models.spec import RewardSpec
from reward_models.style_adapters import adapt

SpecPredicate = Callable[[RewardSpec, Path], bool]
"""``matches(spec, base_dir)``: whether a kind handles this spec."""
RewardFactory = Callable[[RewardSpec, Path], Callable[..., Any]]
"""``build(spec, base_dir)``: a Reward for the spec (it is wrapped in a LoadedReward)."""


@dataclass(frozen=True)
class SpecKind:
    """A kind of spec that load_reward understands, contributed by another module."""

    name: str  # shown in messages, and the key that replaces an earlier registration
    matches: SpecPredicate
    build: RewardFactory


_REGISTERED_KINDS: list[SpecKind] = []


def register_spec_kind(name: str, matches: SpecPredicate, build: RewardFactory) -> None:
    """Teach ``load_reward`` a new kind of spec; it is tried before every built-in kind.

    Registering a name again replaces the earlier entry, so re-importing a module is harmless.

    Args:
        name: Short description, e.g. ``"reward model folder"``.
        matches: ``matches(spec, base_dir) -> bool``.
        build: ``build(spec, base_dir) -> Reward``; may raise ConfigError, RewardError or
            ModelError. The result is wrapped with output validation by ``load_reward``.
    """
    _REGISTERED_KINDS[:] = [kind for kind in _REGISTERED_KINDS if kind.name != name]
    _REGISTERED_KINDS.insert(0, SpecKind(name, matches, build))


def is_model_folder(spec: RewardSpec, base_dir: Path) -> bool:
    """Whether ``spec`` names a directory holding a Hugging Face model (``config.json``)."""
    if spec.spec.startswith(("http://", "https://")):
        return False
    path = resolve_path(spec.spec, base_dir)
    return path.is_dir() and (path / "config.json").is_file()


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
        RewardError: For a folder that is not a reward model, or when no model loader is
            registered for reward-model folders.
    """
    reward_spec = RewardSpec.coerce(spec)
    base = Path(base_dir if base_dir is not None else Path.cwd()).expanduser().resolve()
    fn = _build(reward_spec, base)
    return LoadedReward(
        fn,
        label=reward_spec.label,
        name=reward_spec.name or default_reward_name(reward_spec),
        spec=reward_spec,
        base_dir=base,
    )


def default_reward_name(spec: RewardSpec) -> str:
    """A metric name from the spec: the function name, the URL's host, or the folder's name."""
    target = spec.spec
    if target.startswith(("http://", "https://")):
        return urlparse(target).hostname or "http"
    if is_function_target(target):
        return target.rpartition(":")[2].rpartition(".")[2]
    return Path(target.rstrip("/\\")).name or target


def _build(spec: RewardSpec, base_dir: Path) -> Callable[..., Any]:
    for kind in list(_REGISTERED_KINDS):
        if kind.matches(spec, base_dir):
            return _build_registered(kind, spec, base_dir)
    target = spec.spec
    if target.startswith(("http://", "https://")):
        _refuse_style(spec, "a URL")
        options = [f.name for f in fields(HttpReward) if f.name != "url"]
        for key in spec.kwargs:
            if key not in options:
                close = difflib.get_close_matches(key, options, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; options: {options}"
                raise ConfigError(f"reward {spec.label!r}: unknown URL option {key!r}{hint}")
        return HttpReward(target, **spec.kwargs)
    path = resolve_path(target, base_dir)
    if path.is_dir():
        _refuse_style(spec, "a reward-model folder")
        raise RewardError(_folder_message(spec, path))
    if is_function_target(target):
        fn = load_callable(target, base_dir, spec.label)
        return adapt(fn, spec.style, spec.kwargs, spec.label)
    if is_file_location(target):
        raise ConfigError(
            f"reward {spec.label!r}: {path} is not a folder; a file needs the function to call "
            "after a colon (path/to/file.py:function)"
        )
    raise ConfigError(
        f"reward {spec.label!r}: cannot tell what this is; expected pkg.module:function, "
        "path/to/file.py:function, a reward-model folder, or an http(s):// URL"
    )


def _build_registered(kind: SpecKind, spec: RewardSpec, base_dir: Path) -> Callable[..., Any]:
    try:
        return kind.build(spec, base_dir)
    except AlignError:
        raise
    except Exception as err:
        raise ConfigError(
            f"reward {spec.label!r}: loading it as a {kind.name} failed: "
            f"{type(err).__name__}: {err}"
        ) from err


def _refuse_style(spec: RewardSpec, what: str) -> None:
    if spec.style not in (None, "trl"):
        raise ConfigError(
            f"reward {spec.label!r}: style {spec.style!r} applies to functions, not to {what}"
        )


def _folder_message(spec: RewardSpec, path: Path) -> str:
    if not (path / "config.json").is_file():
        return (
            f"reward {spec.label!r}: folder {path} is not a reward model (no config.json); "
            "point at the final/ folder a reward-model run saved, or at a file.py:function"
        )
    return (
        f"reward {spec.label!r}: {path} holds a model, but scoring with a reward-model folder "
        "needs the reward-model loader, and none is registered (it registers itself with "
        "reward_models.register_spec_kind when its module is imported)"
    )
