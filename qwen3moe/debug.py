"""Debug mode: per-step log lines, NaN/Inf checks that name the layer and tensor, expert choices, time per phase.

The model loop always calls these hooks; when debug mode is off they return at once, so the loop reads the same
either way and costs nothing extra.
"""

import contextlib
import sys
import time
from collections import defaultdict

import numpy as np


class NonFiniteError(FloatingPointError):
    """A NaN or Inf appeared in the forward pass (only raised in debug mode, which checks for them)."""


class Debugger:
    def __init__(self, enabled: bool = False, stream=None):
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.phase_seconds: dict[str, float] = defaultdict(float)

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[debug] {message}", file=self.stream, flush=True)

    def check(self, tensor: np.ndarray, name: str, layer: int | str) -> None:
        """Raise NonFiniteError naming the layer and tensor if ``tensor`` holds NaN or Inf."""
        if not self.enabled or np.isfinite(tensor).all():
            return
        bad = ~np.isfinite(tensor)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise NonFiniteError(
            f"{int(bad.sum())} non-finite values (first at index {first}: {tensor[first]}) in {name} of layer {layer}"
        )

    def phase(self, name: str):
        """Context manager adding the wall time of its block to ``phase_seconds[name]``."""
        return self._timed(name) if self.enabled else contextlib.nullcontext()

    @contextlib.contextmanager
    def _timed(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.phase_seconds[name] += time.perf_counter() - start

    def routing(self, layer: int, experts: np.ndarray, weights: np.ndarray, tokens: list[int]) -> None:
        if not self.enabled:
            return
        for tok, e, w in zip(tokens, experts, weights):
            self.log(f"layer {layer:>3} token {tok:>6}: experts {e.tolist()} weights {np.round(w, 3).tolist()}")

    def end_step(self, description: str) -> None:
        """One line per step with the time spent in each phase, then start counting afresh."""
        if not self.enabled:
            return
        phases = " ".join(f"{k}={v * 1e3:.2f}ms" for k, v in self.phase_seconds.items())
        self.log(f"{description}: {phases}")
        self.phase_seconds.clear()
