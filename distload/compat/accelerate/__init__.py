"""accelerate's names with the same meaning, on distload's planner, reader and offload
store: the workflow users know runs with only its import line changed::

    from distload import init_empty_weights, infer_auto_device_map, load_checkpoint_and_dispatch

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    device_map = infer_auto_device_map(model, max_memory={"cpu": "2GiB"},
                                       no_split_module_classes=["LlamaDecoderLayer"])
    model = load_checkpoint_and_dispatch(model, checkpoint=path, device_map=device_map)

`device_map.py` plans (`infer_auto_device_map`); `dispatch.py` loads
(`load_checkpoint_and_dispatch`, `load_checkpoint_in_model`); `placement.py` reads a map
(where each tensor goes, whether its devices exist here). The one place outside `distload.models` that works with
another library's models and their weight names.
"""

from .device_map import DeviceMapPlan, infer_auto_device_map, plan_device_map
from .dispatch import dispatch_checkpoint, load_checkpoint_and_dispatch, load_checkpoint_in_model
from .placement import device_for, module_devices

__all__ = ["infer_auto_device_map", "plan_device_map", "DeviceMapPlan", "load_checkpoint_and_dispatch",
           "load_checkpoint_in_model", "dispatch_checkpoint", "device_for", "module_devices"]
