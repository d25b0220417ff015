"""Pure planning: stages, tiers and read items, as frozen JSON-serializable data."""

from .build import make_plan, match_params_to_keys
from .partition import min_max_partition
from .types import LoadPlan, ParamSource, StagePlan, Tier

__all__ = ["LoadPlan", "StagePlan", "ParamSource", "Tier", "make_plan", "match_params_to_keys",
           "min_max_partition"]
