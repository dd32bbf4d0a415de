"""Where tensors live: the accelerator this rank computes on, and the one function that moves batches there.

Every input that reaches a model (the DeepSpeed engine, a distillation teacher, the evaluation or
generation model) and every buffer handed to a collective goes through `to_device`. On CUDA a CPU batch
fed to the engine, or a CPU tensor given to NCCL, fails at the first step; on the CPU accelerator with
gloo both silently work, so the CPU test suite cannot see the mistake by running. Hence the check
mode (`SPARSEXPERT_CHECK_DEVICE=1`, set by the test harness): `to_device` marks each tensor it
returns (on the CPU `.to()` returns the very same object, so the mark survives), and `guard`ed modules
and `comm`'s collectives refuse an unmarked tensor, naming it. Outside check mode nothing is marked and
no hook is installed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, TypeVar

import torch
import torch.nn as nn

CHECK_ENV = "SPARSEXPERT_CHECK_DEVICE"
_MARK = "_sparsexpert_on_device"
M = TypeVar("M", bound=nn.Module)


class DevicePlacementError(RuntimeError):
    """A tensor reached a model or a collective without passing through `to_device`."""


def check_mode() -> bool:
    return os.environ.get(CHECK_ENV, "") == "1"


def accelerator_name() -> str:
    """DeepSpeed's accelerator: "cuda" on NVIDIA GPUs, "cpu" on the CPU accelerator (DS_ACCELERATOR=cpu)."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name()


def accelerator_device(local_rank: int | None = None) -> torch.device:
    """This process's compute device: cuda:<LOCAL_RANK> on GPUs, cpu on the CPU accelerator."""
    name = accelerator_name()
    if name == "cpu":
        return torch.device("cpu")
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device(name, local_rank)


def resolve(device: str | torch.device | None) -> torch.device:
    """A device from a command-line value; "" / None / "auto" = the accelerator when there is one."""
    if device in (None, "", "auto"):
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _map(obj: Any, fn) -> Any:
    """Apply fn to every tensor of a batch: tensors, dicts, lists, tuples and dataclasses (KnowledgeBatch)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn) for v in obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(
            obj, **{f.name: _map(getattr(obj, f.name), fn) for f in dataclasses.fields(obj)}
        )
    return obj


def pin(obj: Any) -> Any:
    """The batch in pinned (page-locked) host memory, so that a copy to a GPU can run asynchronously
    (only for batches bound for a GPU: pinning needs CUDA)."""
    return _map(obj, lambda t: t.pin_memory() if t.device.type == "cpu" and not t.is_pinned() else t)


def to_device(obj: Any, device: torch.device) -> Any:
    """The batch with every tensor on `device`; host-to-device copies are non_blocking (asynchronous
    from pinned memory, see `pin`). In check mode every returned tensor is marked as placed."""
    mark = check_mode()

    def move(t: torch.Tensor) -> torch.Tensor:
        out = t.to(device, non_blocking=True)
        if mark:
            setattr(out, _MARK, True)
        return out

    return _map(obj, move)


def _unplaced(obj: Any, path: str, device: torch.device | None, found: list[str]) -> None:
    if isinstance(obj, torch.Tensor):
        if not getattr(obj, _MARK, False):
            found.append(f"{path} (not passed through sparsexpert.distributed.device.to_device)")
        elif device is not None and obj.device.type != device.type:
            found.append(f"{path} (on {obj.device}, the model is on {device})")
    elif isinstance(obj, dict):
        for k, v in obj.items():
            _unplaced(v, f"{path}[{k!r}]", device, found)
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _unplaced(v, f"{path}[{i}]", device, found)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            _unplaced(getattr(obj, f.name), f"{path}.{f.name}", device, found)


def check_placed(obj: Any, what: str, device: torch.device | None = None) -> None:
    """Check mode: raise DevicePlacementError naming every tensor of `obj` that did not go through
    `to_device` (or sits on another device type than `device`). Outside check mode: nothing."""
    if not check_mode():
        return
    found: list[str] = []
    _unplaced(obj, what, device, found)
    if found:
        raise DevicePlacementError(
            f"{'; '.join(found)}: move inputs with sparsexpert.distributed.device.to_device(batch, device) before "
            "they reach a model or a collective (on a GPU this fails at the first step)"
        )


def guard(module: M, name: str) -> M:
    """Check mode: every call of `module` first checks that its tensor arguments were placed
    (`check_placed`). Returns the module; outside check mode it is left as it is."""
    if not check_mode():
        return module
    if getattr(module, "_sparsexpert_guarded", False):
        return module

    def hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
        param = next(mod.parameters(), None)
        device = param.device if param is not None else None
        check_placed({"args": args, "kwargs": kwargs}, f"{name} input", device)

    module.register_forward_pre_hook(hook, with_kwargs=True)
    # setattr: nn.Module.__setattr__ is typed for tensors and modules, and this is a plain flag
    setattr(module, "_sparsexpert_guarded", True)  # noqa: B010
    return module
