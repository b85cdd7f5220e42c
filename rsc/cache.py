"""Where rsc keeps what it can rebuild: toy worlds and latent caches."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """``$RSC_CACHE`` if set, else ``~/.cache/rsc``."""
    return Path(os.environ.get("RSC_CACHE", Path.home() / ".cache" / "rsc")).expanduser()
