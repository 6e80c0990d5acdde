"""Which device and backend serve a model, and a clear sentence when the answer is "none here".

The guide's API names devices with a ``DeviceType`` enum; strings ("cpu", "nvidia") work too. The CPU runs the
``numpy`` and ``numba`` backends, an NVIDIA GPU the ``cupy`` backend (``backends.py``). ``ndev`` > 1 splits the
model over that many devices, one process each (``ranks.py``): GPUs, or CPU processes with the numpy backend.
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
    """Return the backend name that will run the model, or raise DeviceError saying what to do instead.

    ``device`` None: the device of the named backend (the CPU for "auto").
    """
    if device is not None:
        try:
            device = device if isinstance(device, DeviceType) else DeviceType(str(device).lower())
        except ValueError:
            names = ", ".join(d.value for d in DeviceType)
            raise DeviceError(f"unknown device {device!r}; use one of: {names}") from None
        if device in (DeviceType.DEVICE_TYPE_ASCEND, DeviceType.DEVICE_TYPE_CAMBRICON):
            raise DeviceError(f"{device.value} devices are not supported by qwen3moe; run on an NVIDIA GPU "
                              "(--nvidia) or the CPU (--cpu)")
        device = device.value
    if isinstance(ndev, bool) or not isinstance(ndev, int) or ndev < 1:
        raise DeviceError(f"ndev must be a whole number of devices >= 1, not {ndev!r}")
    return backends.choose(device, backend, split=ndev > 1)
