"""``DeviceInfo``: what grouped-GEMM kernel selection knows about a device.

A plain value (device type, index, CUDA compute capability, ROCm or not), so kernel
selection (moeq/ops/registry.py) is a pure function that can be asked about any GPU
without one: ``DeviceInfo("cuda", 0, (10, 0))`` describes an SM100 GPU on a CPU machine.
``device_info(device)`` reads it from a real device.
"""
from __future__ import annotations

import dataclasses
from typing import Optional, Tuple, Union

import torch


@dataclasses.dataclass(frozen=True)
class DeviceInfo:
    """What kernel selection knows about a device: a plain value, so selection can be
    asked about any GPU without one.

    Attributes:
        type: ``torch.device.type`` ("cpu", "cuda", ...).
        index: device index (CUDA), or None.
        capability: CUDA compute capability ``(major, minor)``; None off CUDA.
        hip: True for a ROCm device (``torch.version.hip``): no NVIDIA kernels run there.
    """

    type: str
    index: Optional[int] = None
    capability: Optional[Tuple[int, int]] = None
    hip: bool = False

    @property
    def nvidia_cuda(self) -> bool:
        """An NVIDIA CUDA device with a known compute capability."""
        return self.type == "cuda" and not self.hip and self.capability is not None

    @property
    def arch(self) -> Optional[str]:
        """``"sm_90"`` style name of an NVIDIA device, else None."""
        return f"sm_{self.capability[0]}{self.capability[1]}" if self.nvidia_cuda else None

    def __str__(self) -> str:
        name = self.type if self.index is None else f"{self.type}:{self.index}"
        if self.arch is not None:
            return f"{name} ({self.arch})"
        return f"{name} (ROCm)" if self.hip else name


DeviceLike = Union[DeviceInfo, torch.device, str]


def device_info(device: DeviceLike) -> DeviceInfo:
    """The ``DeviceInfo`` of a real device (reads its CUDA capability); a DeviceInfo passes through."""
    if isinstance(device, DeviceInfo):
        return device
    dev = torch.device(device)
    if dev.type != "cuda":
        return DeviceInfo(dev.type, dev.index)
    index = torch.cuda.current_device() if dev.index is None else dev.index
    capability = tuple(torch.cuda.get_device_capability(index))
    return DeviceInfo("cuda", index, capability, torch.version.hip is not None)
