"""``python -m distload.load`` (and the ``distload`` command): the CLI, in `distload.cli`.

    torchrun --nproc_per_node=2 -m distload.load --model PATH|ORG/NAME|demo [--report out.json]
"""

from __future__ import annotations

import sys
import types

from .cli.main import entry, main
from .loader import load

__all__ = ["main", "entry"]


class _CallableCLIModule(types.ModuleType):
    """Importing this module makes Python set `distload.load` to it (a package attribute
    per submodule), hiding the `distload.load()` function; calling the module calls it."""

    def __call__(self, *args, **kwargs):
        return load(*args, **kwargs)


if __name__ == "__main__":
    entry()
else:
    sys.modules[__name__].__class__ = _CallableCLIModule
