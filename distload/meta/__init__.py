"""Models on the meta device: building them without memory (`init_empty_weights`,
`init_on_device`, as in accelerate), describing them as data for the planner (units,
sizes, tied groups), and materializing them at the end of a load. Knows nothing of
files, checkpoints or ranks.

Example::

    with init_empty_weights():
        model = build_model(config)
    spec = describe_model(model)          # units in execution order, costs, tied groups
    materialize(model, "cuda:0"); check_materialized(model)
"""

from .describe import ModelSpec, ParamSpec, UnitSpec, describe_model
from .init import init_empty_weights, init_on_device
from .materialize import check_materialized, init_buffers, materialize
from .sizes import find_tied_parameters, module_sizes, persistent_buffers

__all__ = [
    "init_empty_weights", "init_on_device", "describe_model", "ModelSpec", "UnitSpec",
    "ParamSpec", "module_sizes", "find_tied_parameters", "persistent_buffers", "materialize",
    "check_materialized", "init_buffers",
]
