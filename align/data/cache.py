"""The on-disk cache of prepared (tokenised) datasets, keyed by everything they depend on.

A prepared dataset lives in `<root>/<kind>-<key>/`: Arrow files written by `datasets` and
`meta.json` (what the key was made of, rows, when). The key hashes the source (a local file's
or folder's path, sizes and modification times; a hub dataset's fingerprint), the split, the
column mapping, the tokenizer (its vocabulary and merges, special tokens and chat template),
the stage's settings (`max_length`, loss masking) and the source code of the preparation
itself, so changing any of them prepares the data again and nothing stale is ever read.

The root is `data.cache_dir`, else `$ALIGN_DATA_CACHE`, else `~/.cache/align/data`.
A folder is published by rename once complete, so a killed run never leaves a half-written
entry; clearing the cache is `rm -rf` of the root.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

META = "meta.json"


def cache_root(configured: str | None) -> Path:
    """Where prepared datasets are cached (see the module docstring)."""
    root = configured or os.environ.get("ALIGN_DATA_CACHE") or "~/.cache/align/data"
    return Path(root).expanduser()


def digest(parts: Any) -> str:
    """A short stable hash of JSON-serialisable `parts`."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def local_source_identity(source: str) -> list | None:
    """Path, size and modification time of a local file, or of every file under a local
    folder; None for anything else (a hub name)."""
    path = Path(os.path.expanduser(source))
    if path.is_file():
        stat = path.stat()
        return [str(path.resolve()), stat.st_size, stat.st_mtime_ns]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        return [str(path.resolve())] + [
            [str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
    return None


def tokenizer_identity(tokenizer: Any) -> str:
    """A hash of what decides the tokenizer's ids: its vocabulary and merges (the whole
    serialised fast tokenizer, or a slow one's vocabulary and added tokens with the flags that
    change how text around them splits), special tokens and chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    body = backend.to_str() if backend is not None else json.dumps(
        [sorted(tokenizer.get_vocab().items()),
         sorted((i, repr(t)) for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items())])
    return digest([type(tokenizer).__name__, hashlib.sha256(body.encode()).hexdigest(),
                   getattr(tokenizer, "chat_template", None), tokenizer.special_tokens_map,
                   tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.bos_token_id])


def code_identity(*objects: Any) -> str:
    """A hash of the source code of the modules of `objects` (the preparation code)."""
    sources = sorted({inspect.getsourcefile(o) or "" for o in objects})
    return digest([hashlib.sha256(Path(s).read_bytes()).hexdigest() for s in sources if s])


def lookup(folder: Path) -> list[Path] | None:
    """The Arrow files of a complete cache entry, or None when there is none."""
    meta = folder / META
    if not meta.is_file():
        return None
    files = [folder / name for name in json.loads(meta.read_text())["files"]]
    return files if all(f.is_file() for f in files) else None


def publish(tmp: Path, folder: Path, files: list[str], about: dict[str, Any]) -> Path:
    """Make the complete entry written in `tmp` the cache entry `folder` (by rename, so a
    reader sees all of it or nothing); if another run published it first, keep theirs."""
    (tmp / META).write_text(json.dumps(
        {**about, "files": files, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1,
        default=str) + "\n")
    try:
        os.replace(tmp, folder)
    except OSError:  # published meanwhile by a concurrent run: same key, same content
        shutil.rmtree(tmp, ignore_errors=True)
    return folder
