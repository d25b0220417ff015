"""The command line: one config dataclass (`config.RunConfig`) built from the flags, the
run itself (`main`), prompts in and outputs out (`prompts`), and rank 0's table and JSON
report (`table`). ``python -m distload.load`` is its entry point. Nothing else in distload
imports it.
"""

from .config import RunConfig, parse_args
from .main import main, run

__all__ = ["RunConfig", "parse_args", "main", "run"]
