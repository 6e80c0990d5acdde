"""qwen3moe's fast path: backends that implement the reference's block operations on Numba (CPU) kernels.

Nothing in ``qwen3moe`` imports this package directly; ``qwen3moe/backends.py`` names its modules and imports one
only when it is chosen.
"""
