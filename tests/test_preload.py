"""accelerate's `preload_module_classes`: an offloaded module of a listed class has its
whole subtree's weights on the device when its own forward starts (a module that reads a
child's weight directly, never calling the child, works), released after. Reference:
accelerate's own function with the same arguments, on fresh copies of the same model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import distload
from distload.offload import streamer_of

accelerate = pytest.importorskip("accelerate")


class Dense(nn.Module):
    """Uses its child's weight without calling the child (accelerate's
    `ModuleWithUnusedSubModules`)."""

    def __init__(self, i: int, o: int) -> None:
        super().__init__()
        self.linear = nn.Linear(i, o)

    def forward(self, x):
        return x @ self.linear.weight.t() + self.linear.bias


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 4)
        self.block = Dense(4, 5)
        self.last = Dense(5, 2)

    def forward(self, x):
        return self.last(torch.relu(self.block(self.first(x))))


class Head(nn.Module):
    """The model itself reads a child's weight directly."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(3, 4)
        self.proj = nn.Linear(4, 2)

    def forward(self, x):
        return torch.relu(self.body(x)) @ self.proj.weight.t()


X = torch.randn(5, 3, generator=torch.Generator().manual_seed(1))


def _fresh(cls):
    torch.manual_seed(7)
    return cls().eval()


def _out(model):
    with torch.no_grad():
        return model(X)


def _empty(lib):
    with lib.init_empty_weights():
        return Net()


def test_load_checkpoint_and_dispatch_preloads_a_listed_module(tmp_path):
    from safetensors.torch import save_file

    save_file(_fresh(Net).state_dict(), tmp_path / "model.safetensors")
    device_map = {"first": "cpu", "block": "disk", "last": "disk"}
    kw = dict(device_map=device_map, preload_module_classes=["Dense"])
    theirs = accelerate.load_checkpoint_and_dispatch(_empty(accelerate), str(tmp_path / "model.safetensors"),
                                                     offload_folder=str(tmp_path / "theirs"), **kw)
    ours = distload.load_checkpoint_and_dispatch(_empty(distload), tmp_path / "model.safetensors",
                                                 offload_folder=tmp_path / "ours", **kw)
    assert streamer_of(ours).unit_names == ["block", "last"]
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=0, atol=0)
    torch.testing.assert_close(_out(ours), _out(_fresh(Net)), rtol=0, atol=0)
    assert all(p.is_meta for p in ours.block.parameters())   # released after each forward

    # without the keyword each Linear streams around its own forward, which Dense never calls
    plain = distload.load_checkpoint_and_dispatch(_empty(distload), tmp_path / "model.safetensors",
                                                  offload_folder=tmp_path / "ours", device_map=device_map)
    assert streamer_of(plain).unit_names == ["block.linear", "last.linear"]


@pytest.mark.parametrize("how", ["dispatch_model", "disk_offload"])
def test_dispatch_model_and_disk_offload_preload(tmp_path, how):
    def place(lib, model, folder):
        if how == "disk_offload":
            return lib.disk_offload(model, str(folder), execution_device="cpu", preload_module_classes=["Dense"])
        if lib is accelerate:   # its dispatch_model reads "disk" weights from a folder offloaded before
            accelerate.utils.offload_state_dict(str(folder), model.state_dict())
        # force_hooks: accelerate refuses a map of one "disk" entry without it
        return lib.dispatch_model(model, {"": "disk"}, main_device="cpu", offload_dir=str(folder),
                                  preload_module_classes=["Dense"], force_hooks=True)

    theirs = place(accelerate, _fresh(Net), tmp_path / "theirs")
    ours = place(distload, _fresh(Net), tmp_path / "ours")
    assert streamer_of(ours).unit_names == ["first", "block", "last"]   # under "": each module, Dense whole
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=0, atol=0)
    torch.testing.assert_close(_out(ours), _out(_fresh(Net)), rtol=0, atol=0)


def test_cpu_offload_preloads_the_model_itself():
    theirs = accelerate.cpu_offload(_fresh(Head), execution_device="cpu", preload_module_classes=["Head"])
    ours = distload.cpu_offload(_fresh(Head), execution_device="cpu", preload_module_classes=["Head"])
    assert streamer_of(ours).unit_names == [""]
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=0, atol=0)
    torch.testing.assert_close(_out(ours), _out(_fresh(Head)), rtol=0, atol=0)
    assert ours.proj.weight.is_meta                          # back on its placeholder after the forward
    plain = distload.cpu_offload(_fresh(Head), execution_device="cpu")
    assert streamer_of(plain).unit_names == ["body", "proj"]


def test_load_checkpoint_and_dispatch_preloads_the_model_itself(tmp_path):
    """The whole model on disk and its own class listed: every weight is on the device
    when its forward starts (one unit, the model itself), released after."""
    from safetensors.torch import save_file

    save_file(_fresh(Head).state_dict(), tmp_path / "model.safetensors")
    # force_hooks: accelerate refuses a map of one "disk" entry without it
    kw = dict(device_map={"": "disk"}, preload_module_classes=["Head"], force_hooks=True)

    def empty(lib):
        with lib.init_empty_weights():
            return Head()

    theirs = accelerate.load_checkpoint_and_dispatch(empty(accelerate), str(tmp_path / "model.safetensors"),
                                                     offload_folder=str(tmp_path / "theirs"), **kw)
    ours = distload.load_checkpoint_and_dispatch(empty(distload), tmp_path / "model.safetensors",
                                                 offload_folder=tmp_path / "ours", **kw)
    assert streamer_of(ours).unit_names == [""]
    torch.testing.assert_close(_out(ours), _out(theirs), rtol=0, atol=0)
    torch.testing.assert_close(_out(ours), _out(_fresh(Head)), rtol=0, atol=0)
    assert ours.proj.weight.is_meta
