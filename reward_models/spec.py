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
      - https://rm.example.com/score                      # a JSON API

Styles name the calling convention a function was written for: ``trl`` (the default, the
Reward protocol), ``verl`` (``compute_score(data_source, solution_str, ground_truth,
extra_info)`` per sample) or ``openrlhf`` (``reward_func(queries, prompts, labels)``). The prefix
``<style>:`` is recognised only when what follows is itself a ``location:function`` target, so a
module that happens to be called ``verl`` (``verl:fn``) is still read as a module.
"""

from __future__ import annotations

import difflib
import math
import numbers
from dataclasses import dataclass, field, fields
from typing import Any

from align.errors import ConfigError

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

    spec: str  # module:function, path/file.py:function, a reward-model folder, or http(s) URL
    weight: float = 1.0  # factor in the weighted sum; 0 computes and logs it without training on it
    name: str | None = None  # metric name (rewards/<name>/mean); default derived from the spec
    style: str | None = None  # calling convention of a function: trl (default), verl, openrlhf
    kwargs: dict[str, Any] = field(default_factory=dict)  # bound to the function like
    # functools.partial; for a URL or folder, options of that loader (e.g. timeout_s)
    timeout_s: float | None = None  # seconds one call may take before the run stops; None: no limit

    def __post_init__(self) -> None:
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

    @property
    def label(self) -> str:
        """The spec as a user would write it (style prefix included): used in every message."""
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
                close = difflib.get_close_matches(str(key), known, n=1)
                hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {known}"
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
