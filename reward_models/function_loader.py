"""Find the function a ``location:function`` spec names, in an installed module or a .py file.

``pkg.module:fn`` imports the module normally. ``path/to/file.py:fn`` executes that one file
(and nothing else: its folder is not put on ``sys.path``) as a private module, once per process.
``fn`` may be dotted (``module:Scorer.score``) to reach an attribute of an attribute.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.util
import re
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from align.errors import ConfigError

_FILE_MODULES: dict[Path, ModuleType] = {}
_FILE_LOCK = threading.Lock()


def is_function_target(target: str) -> bool:
    """Whether ``target`` has the ``location:function`` shape (both parts non-empty)."""
    location, sep, attr = target.rpartition(":")
    return bool(sep and location and attr)


def is_file_location(location: str) -> bool:
    """Whether the part before ``:`` is a file path (ends in .py or contains a slash)."""
    return location.endswith(".py") or "/" in location or "\\" in location


def resolve_path(text: str, base_dir: Path) -> Path:
    """Resolve a user-written path: ``~`` expanded, relative paths against ``base_dir``."""
    path = Path(text).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


def load_callable(target: str, base_dir: Path, label: str) -> Callable[..., Any]:
    """Import the module or file a ``location:function`` target names and return the function.

    Args:
        target: ``pkg.module:fn`` or ``path/to/file.py:fn`` (no style prefix).
        base_dir: Folder that relative file paths resolve against.
        label: The spec as the user wrote it, for messages.

    Returns:
        The callable object.

    Raises:
        ConfigError: When the module or file is missing or fails to import, or the attribute is
            missing or not callable; the message names the spec.
    """
    location, _, attr = target.rpartition(":")
    if is_file_location(location):
        module = _import_file(resolve_path(location, base_dir), base_dir, label)
    else:
        module = _import_module(location, label)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"reward {label!r}: {_missing_attribute(obj, part)}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"reward {label!r}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_module(name: str, label: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise ConfigError(
                f"reward {label!r}: no module named {err.name!r} (is it installed? a file path "
                "must end in .py or contain a slash)"
            ) from err
        raise ConfigError(f"reward {label!r}: importing {name!r} failed: {err}") from err
    except Exception as err:  # user code: report it, never swallow it
        raise ConfigError(
            f"reward {label!r}: importing {name!r} failed: {type(err).__name__}: {err}"
        ) from err


def _import_file(path: Path, base_dir: Path, label: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(
            f"reward {label!r}: file {path} does not exist (relative paths resolve against "
            f"{base_dir})"
        )
    with _FILE_LOCK:
        cached = _FILE_MODULES.get(path)
        if cached is not None:
            return cached
        # A private, unique module name: two files both called reward.py must not collide.
        stem = re.sub(r"\W", "_", path.stem)
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        module_name = f"_reward_file_{stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"reward {label!r}: cannot load {path} as Python source")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and typing look the module up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # user code: report it, never swallow it
            del sys.modules[module_name]
            raise ConfigError(
                f"reward {label!r}: executing {path} failed: {type(err).__name__}: {err}"
            ) from err
        _FILE_MODULES[path] = module
        return module


def _missing_attribute(obj: Any, part: str) -> str:
    where = f"module {obj.__name__!r}" if isinstance(obj, ModuleType) else repr(obj)
    if isinstance(obj, ModuleType) and getattr(obj, "__file__", None):
        where = f"{where} ({obj.__file__})"
    names = [n for n in dir(obj) if not n.startswith("_") and callable(getattr(obj, n, None))]
    close = difflib.get_close_matches(part, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{where} has no function {part!r}{hint}"
