"""qwen3moe: Qwen3-MoE inference in readable NumPy.

Start with ``Qwen3MoeForCausalLM`` (causal_lm.py); the layers are in layers.py, the model loop in model.py.
"""

from . import backends
from .causal_lm import Qwen3MoeForCausalLM
from .config import Qwen3MoeConfig, load_config
from .devices import DeviceType
from .errors import CheckpointError, DeviceError, OutOfDeviceMemory, UnsupportedConfigError
from .infer_task import Qwen3MoeInferTask, Qwen3MoeKVCache

__all__ = [
    "Qwen3MoeForCausalLM", "Qwen3MoeConfig", "load_config", "DeviceType", "Qwen3MoeInferTask", "Qwen3MoeKVCache",
    "CheckpointError", "DeviceError", "OutOfDeviceMemory", "UnsupportedConfigError", "backends",
]
