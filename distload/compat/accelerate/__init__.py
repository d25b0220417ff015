"""accelerate's names with the same meaning, on distload's planner, reader and offload
store: the workflow users know runs with only its import line changed::

    from distload import init_empty_weights, infer_auto_device_map, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    device_map = infer_auto_device_map(model, max_memory={"cpu": "2GiB"},
                                       no_split_module_classes=["LlamaDecoderLayer"])
    model = load_checkpoint_and_dispatch(model, checkpoint=path, device_map=device_map)

`device_map.py` plans (`infer_auto_device_map`, `get_balanced_memory`; in one process
accelerate's own map, `greedy.py`); `dispatch.py` translates a map into a world-of-one
plan that `distload.loader` loads (`load_checkpoint_and_dispatch`,
`load_checkpoint_in_model`); `offload.py` places a model already in memory
(`dispatch_model`, `disk_offload`, `cpu_offload`, `get_state_dict_offloaded_model`) on
distload's streaming, `buffers.py` streams offloaded modules' buffers with them
(`offload_buffers=True`), `preload.py` streams an offloaded module of
`preload_module_classes` as one unit, `precision.py` says what stays float32 under a half
`dtype`; `placement.py` reads a map (where each tensor goes, whether its devices exist
here). The one place outside `distload.models` that works with another library's models
and their weight names.
"""

from ...meta import init_empty_weights, init_on_device
from .device_map import DeviceMapPlan, get_balanced_memory, infer_auto_device_map, plan_device_map
from .dispatch import dispatch_checkpoint, load_checkpoint_and_dispatch, load_checkpoint_in_model
from .offload import cpu_offload, disk_offload, dispatch_model, get_state_dict_offloaded_model
from .placement import device_for, module_devices

# accelerate's public names this package gives, same meaning (scripts/accelerate_suite.sh
# runs accelerate's own tests with these swapped in)
ACCELERATE_NAMES = ("init_empty_weights", "init_on_device", "infer_auto_device_map", "get_balanced_memory",
                    "load_checkpoint_and_dispatch", "load_checkpoint_in_model", "dispatch_model", "disk_offload",
                    "cpu_offload", "get_state_dict_offloaded_model")

__all__ = [*ACCELERATE_NAMES, "plan_device_map", "DeviceMapPlan", "dispatch_checkpoint", "device_for",
           "module_devices", "ACCELERATE_NAMES"]
