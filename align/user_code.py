"""Load user code a config names as ``pkg.module:name`` or ``path/to/file.py:name``.

Reward functions (``reward_models.spec``), environment classes and tool functions
(``align.episodes.environment``) are all written this way. ``pkg.module:name`` imports the
module normally; ``path/to/file.py:name`` executes that one file (its folder is not put on
``sys.path``) as a private module, once per process, so every spec naming the file shares its
objects. ``name`` may be dotted (``module:Scorer.score``) to reach an attribute of an
attribute.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import re
import sys
import threading
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

from align.errors import ConfigError, did_you_mean

_FILE_MODULES: dict[Path, ModuleType] = {}
_FILE_LOCK = threading.Lock()


def is_function_target(target: str) -> bool:
    """Whether ``target`` has the ``location:name`` shape (both parts non-empty)."""
    location, sep, attr = target.rpartition(":")
    return bool(sep and location and attr)


def is_file_location(location: str) -> bool:
    """Whether the part before ``:`` is a file path (ends in .py or contains a slash)."""
    return location.endswith(".py") or "/" in location or "\\" in location


def resolve_path(text: str, base_dir: Path) -> Path:
    """Resolve a user-written path: ``~`` expanded, relative paths against ``base_dir``."""
    path = Path(text).expanduser()
    return (path if path.is_absolute() else base_dir / path).resolve()


def load_object(target: str, base_dir: Path, where: str,
                kind: Literal["function", "class"] = "function") -> Any:
    """Import the module or file a ``location:name`` target names and return the object.

    Args:
        target: ``pkg.module:name`` or ``path/to/file.py:name``.
        base_dir: Folder that relative file paths resolve against.
        where: What the target is and where it was written, the start of every message
            (``"reward 'f.py:score'"``, ``"environment.tools[1] 'f.py:add'"``).
        kind: ``function``: the object must be callable; ``class``: it must be a class.

    Returns:
        The object.

    Raises:
        ConfigError: When the target has no ``:``, the module or file is missing or fails to
            import, or the attribute is missing or of the wrong kind; the message starts with
            ``where``.
    """
    if not is_function_target(target):
        raise ConfigError(f"{where}: expected pkg.module:{kind} or path/to/file.py:{kind}")
    location, _, attr = target.rpartition(":")
    if is_file_location(location):
        module = _import_file(resolve_path(location, base_dir), base_dir, where)
    else:
        module = _import_module(location, where)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(f"{where}: {_missing_attribute(obj, part, kind)}")
        obj = getattr(obj, part)
    if kind == "class" and not isinstance(obj, type):
        raise ConfigError(f"{where}: {attr!r} is a {type(obj).__name__}, not a class")
    if not callable(obj):
        raise ConfigError(f"{where}: {attr!r} is a {type(obj).__name__}, not a function")
    return obj


def _import_module(name: str, where: str) -> ModuleType:
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name and (name == err.name or name.startswith(err.name + ".")):
            raise ConfigError(
                f"{where}: no module named {err.name!r} (is it installed? a file path "
                "must end in .py or contain a slash)"
            ) from err
        raise ConfigError(f"{where}: importing {name!r} failed: {err}") from err
    except Exception as err:  # user code: report it, never swallow it
        raise ConfigError(
            f"{where}: importing {name!r} failed: {type(err).__name__}: {err}"
        ) from err


def _import_file(path: Path, base_dir: Path, where: str) -> ModuleType:
    if not path.is_file():
        raise ConfigError(
            f"{where}: file {path} does not exist (relative paths resolve against {base_dir})"
        )
    with _FILE_LOCK:
        cached = _FILE_MODULES.get(path)
        if cached is not None:
            return cached
        # A private, unique module name: two files both called reward.py must not collide.
        stem = re.sub(r"\W", "_", path.stem)
        digest = hashlib.sha1(str(path).encode()).hexdigest()[:10]
        module_name = f"_user_file_{stem}_{digest}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"{where}: cannot load {path} as Python source")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module  # dataclasses and typing look the module up here
        try:
            spec.loader.exec_module(module)
        except Exception as err:  # user code: report it, never swallow it
            del sys.modules[module_name]
            raise ConfigError(
                f"{where}: executing {path} failed: {type(err).__name__}: {err}"
            ) from err
        _FILE_MODULES[path] = module
        return module


def _missing_attribute(obj: Any, part: str, kind: str) -> str:
    where = f"module {obj.__name__!r}" if isinstance(obj, ModuleType) else repr(obj)
    if isinstance(obj, ModuleType) and getattr(obj, "__file__", None):
        where = f"{where} ({obj.__file__})"
    wanted = (lambda o: isinstance(o, type)) if kind == "class" else callable
    names = [n for n in dir(obj) if not n.startswith("_") and wanted(getattr(obj, n, None))]
    return f"{where} has no {kind} {part!r}{did_you_mean(part, names)}"
