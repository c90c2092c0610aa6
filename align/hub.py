"""Hugging Face Hub names: fail at once, with what to do, when one cannot be fetched.

A model, tokenizer or dataset that is not a local path is a hub id, fetched by transformers or
datasets wherever the hub is reachable. Where it is not, their own retries take a minute and end
in a long traceback; `require_hub` instead asks the hub once (a few seconds at most) and stops
with a message naming the config key, the name, and how to run offline. `HF_HUB_OFFLINE=1` is
the user's to set: then only what the local cache holds is used, and a name it lacks is refused
the same way, without touching the network.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from align.errors import DataError, ModelError

PROBE_TIMEOUT_S = 5.0
RepoType = Literal["model", "dataset"]
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_SKIPPED_WEIGHTS = ["*.onnx", "onnx/*", "*.h5", "*.msgpack", "*.ot", "*.tflite", "*.gguf",
                    "original/*"]  # other frameworks' copies of the weights (transformers
# reads safetensors or .bin); `original/` holds Meta's consolidated checkpoints


def is_repo_id(name: str) -> bool:
    """Whether `name` reads as a hub id `org/name` and names nothing on this machine (a
    relative path that happens to have that shape, `runs/rm`, is a path where it exists)."""
    return bool(_REPO_ID.fullmatch(name)) and not name.endswith(".py") and not Path(
        name).expanduser().exists()


def fetch_model(name: str, key: str) -> Path:
    """The local folder of hub model `name` (checked with `require_hub`, then downloaded into
    the Hugging Face cache, or read from it offline), for code that needs files on disk.

    Raises:
        ModelError: as `require_hub`.
    """
    from huggingface_hub import snapshot_download

    require_hub(name, key)
    try:
        return Path(snapshot_download(name, ignore_patterns=_SKIPPED_WEIGHTS))
    except Exception as exc:  # noqa: BLE001 - any failure of the download, said plainly
        raise ModelError(f"{key}: fetching '{name}' from the Hugging Face Hub failed: "
                         f"{type(exc).__name__}: {exc}") from None


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def cached(name: str, repo_type: RepoType) -> bool:
    """Whether the local Hugging Face cache holds `name` (any revision)."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    if repo_type == "model":
        return isinstance(try_to_load_from_cache(name, "config.json"), str) or isinstance(
            try_to_load_from_cache(name, "tokenizer_config.json"), str)
    try:
        return any(repo.repo_id == name and repo.repo_type == "dataset"
                   for repo in scan_cache_dir().repos)
    except Exception:  # noqa: BLE001 - no cache folder yet
        return False


def require_hub(name: str, key: str, repo_type: RepoType = "model") -> None:
    """Check that hub id `name` can be loaded: cached, or the hub answers for it.

    Raises:
        ModelError (models, tokenizers) or DataError (datasets): the name is neither a local
            folder nor reachable, is not on the hub, or is missing from the cache offline.
    """
    error = ModelError if repo_type == "model" else DataError
    how = (f"to run offline, download it where the hub is reachable (`hf download {name}"
           f"{' --repo-type dataset' if repo_type == 'dataset' else ''}`), then set "
           "HF_HUB_OFFLINE=1; or point at a local folder")
    if offline():
        if not cached(name, repo_type):
            raise error(f"{key}: '{name}' is not a local folder and not in the Hugging Face "
                        f"cache, and HF_HUB_OFFLINE is set: {how}")
        return
    import urllib.error
    import urllib.request

    from huggingface_hub import constants

    url = f"{constants.ENDPOINT}/api/{repo_type}s/{name}"
    request = urllib.request.Request(url, method="HEAD")
    token = os.environ.get("HF_TOKEN")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        urllib.request.urlopen(request, timeout=PROBE_TIMEOUT_S).close()
    except urllib.error.HTTPError as exc:
        if exc.code in (401, 403, 404):
            raise error(f"{key}: '{name}' is not a local folder, and the Hugging Face Hub has "
                        f"no {repo_type} of that name you can read (HTTP {exc.code}; a private "
                        "or gated one needs HF_TOKEN)") from None
    except (urllib.error.URLError, OSError) as exc:  # refused, no DNS, timed out
        if cached(name, repo_type):
            return  # the cache serves it; transformers and datasets fall back to it
        reason = getattr(exc, "reason", exc)
        raise error(f"{key}: '{name}' is neither a local folder nor reachable on the Hugging "
                    f"Face Hub ({constants.ENDPOINT}: {reason}); {how}") from None
