"""The one folder lmforge keeps derived data in between runs: token caches, baselines, the precision probe.

Everything there can be rebuilt from its inputs, so deleting it only costs time.
Set LMFORGE_CACHE to move it (a faster disk, a shared team cache, a test's temporary folder).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("LMFORGE_CACHE", Path.home() / ".cache" / "lmforge"))
