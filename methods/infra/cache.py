"""On-disk cache shared by trials: content-keyed entries, built once under a file lock.

Every expensive shared artefact (second-moment statistics, converted model folders, projectors) is stored as
``<cache_dir>/<kind>/<key>`` where ``key`` is a hash of everything the artefact depends on. A process that finds
the entry missing takes ``<entry>.lock``; a second process asking for the same entry waits on the lock and then
reads what the first one wrote, so the same work is never done twice at once.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Callable

from filelock import FileLock


def default_cache_dir() -> Path:
    """``$EDITGRID_CACHE`` if set, else ``~/.cache/editgrid``."""
    return Path(os.environ.get("EDITGRID_CACHE") or Path.home() / ".cache" / "editgrid").expanduser().resolve()


def content_key(parts: dict[str, Any]) -> str:
    """A stable 16-hex-digit hash of a JSON-serialisable description."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def cached_path(cache_dir: Path, kind: str, key: str, build: Callable[[Path], None], suffix: str = "") -> Path:
    """Return ``<cache_dir>/<kind>/<key><suffix>``, calling ``build(tmp_path)`` first if it does not exist yet.

    ``build`` writes to a temporary path that is renamed into place only when complete, so a crashed build never
    leaves a half-written entry that later readers would trust.
    """
    target = Path(cache_dir) / kind / f"{key}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if target.exists():  # another process built it while we waited
            return target
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        build(tmp)
        os.replace(tmp, target)
    return target


def hub_offline() -> bool:
    """True when the Hugging Face hub must not be contacted (``HF_HUB_OFFLINE`` / ``HF_DATASETS_OFFLINE``)."""
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
