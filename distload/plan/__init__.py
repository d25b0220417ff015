"""Pure planning: memory budgets (`budget`), run reserves (`reserve`), the model of one
stage — which units stay resident, what streams from the CPU or disk tier, with how many
slots (`stage`) — the partition into stages (`planner`), accelerate's single-process
order behind device maps (`sequential`), the read items of each rank (`build`) → a
frozen, JSON-serializable `LoadPlan` (`types`), and `--explain` (`explain`). Knows nothing of
files, devices or torch.distributed: numbers and names in, data out."""

from .build import make_plan, match_params_to_keys
from .partition import min_max_partition
from .types import LoadPlan, ParamSource, StagePlan, Tier

__all__ = ["LoadPlan", "StagePlan", "ParamSource", "Tier", "make_plan", "match_params_to_keys",
           "min_max_partition"]
