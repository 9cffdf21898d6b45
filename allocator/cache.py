"""Where allocator keeps what it computes once: ``$XDG_CACHE_HOME/allocator`` (default ``~/.cache/allocator``),
with ``models/`` (converted checkpoints), ``profiles/`` (degradation rows) and ``latency/`` (measured tables)."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$XDG_CACHE_HOME/allocator`` (default ``~/.cache/allocator``), read at each call."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "allocator"
