"""Where distload keeps its own files on a node: the demo checkpoint, the default offload
directory, the hub headers it fetched. One root: `cache_dir` if given, else
``$DISTLOAD_CACHE``, else ``~/.cache/distload``. (Hub snapshots live in huggingface_hub's
own cache, ``$HF_HOME``, never here.)

Example::

    cache_root()                   # PosixPath('/home/me/.cache/distload')
    cache_root("/scratch/dl")      # PosixPath('/scratch/dl')
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root of this node (not created here)."""
    root = cache_dir or os.environ.get("DISTLOAD_CACHE") or Path.home() / ".cache" / "distload"
    return Path(root).expanduser()
