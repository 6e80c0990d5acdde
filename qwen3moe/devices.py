"""Which device and backend serve a model, and a clear sentence when the answer is "none here".

The guide's API names devices with a ``DeviceType`` enum; strings ("cpu", "nvidia") work too. This build runs on
the CPU, with the backends of ``backends.py``.
"""

import enum

from . import backends
from .errors import DeviceError


class DeviceType(enum.Enum):
    DEVICE_TYPE_CPU = "cpu"
    DEVICE_TYPE_NVIDIA = "nvidia"
    DEVICE_TYPE_CAMBRICON = "cambricon"
    DEVICE_TYPE_ASCEND = "ascend"



def resolve_backend(device, ndev: int, backend: str) -> str:
    """Return the backend name that will run the model, or raise DeviceError saying what to do instead."""
    try:
        device = device if isinstance(device, DeviceType) else DeviceType(str(device).lower())
    except ValueError:
        names = ", ".join(d.value for d in DeviceType)
        raise DeviceError(f"unknown device {device!r}; use one of: {names}") from None
    if device in (DeviceType.DEVICE_TYPE_ASCEND, DeviceType.DEVICE_TYPE_CAMBRICON):
        raise DeviceError(f"{device.value} devices are not supported by qwen3moe; run on the CPU (--cpu)")
    if device is DeviceType.DEVICE_TYPE_NVIDIA:
        raise DeviceError("this build of qwen3moe has no CUDA backend yet, so it cannot use NVIDIA GPUs; "
                          "run on the CPU (--cpu)")
    if ndev != 1:
        raise DeviceError(f"ndev={ndev}: splitting a model over several devices needs GPUs; on the CPU use ndev=1")
    return backends.choose("cpu", backend)
