"""Pure planning: memory budgets (`budget`), run reserves (`reserve`), the partition into
stages and tiers (`planner`), the read items of each rank (`build`) → a frozen,
JSON-serializable `LoadPlan` (`types`), and `--explain` (`explain`). Knows nothing of
files, devices or torch.distributed: numbers and names in, data out."""

from .build import make_plan, match_params_to_keys
from .partition import min_max_partition
from .types import LoadPlan, ParamSource, StagePlan, Tier

__all__ = ["LoadPlan", "StagePlan", "ParamSource", "Tier", "make_plan", "match_params_to_keys",
           "min_max_partition"]
