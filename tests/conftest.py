"""Shared fixtures: a private cache folder, a per-run random seed, tiny synthetic checkpoints and a logits helper.

* ``QWEN3MOE_CACHE`` points at a temporary folder for the whole session (set before any test module is imported), so
  nothing a test runs -- in this process or in a ``python -m qwen3moe`` subprocess -- writes into the user's home.
* ``test_seed`` is fresh every run (``os.urandom``) and printed in the pytest header; set ``QWEN3MOE_TEST_SEED`` to
  replay a failing run.
* ``tiny_model_dir`` is one sharded bf16 checkpoint of ``TINY_CONFIG`` (3 layers: dense, MoE, MoE; 8 experts, top-2)
  shared by the session; ``make_model_dir`` writes a folder from modified tensors and/or config into ``tmp_path``.
"""

import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

from qwen3moe.synthetic import TINY_CONFIG, random_weights, write_checkpoint

_SAVED_ENV: dict[str, str | None] = {}
_CACHE_DIR: list[str] = []


def pytest_configure(config):
    # Module level of a conftest runs once per session as well, but a hook makes the life cycle explicit and pairs it
    # with the clean-up below. It runs before collection, i.e. before any test module can touch the default model.
    # Tests run the NumPy reference unless they name a backend: the reference is what the oracle vouches for, and the
    # tests that exist for the fast backends (the ``backend_name`` fixture) choose them explicitly.
    cache = tempfile.mkdtemp(prefix="qwen3moe-test-cache-")
    _CACHE_DIR.append(cache)
    for name, value in (("QWEN3MOE_CACHE", cache), ("QWEN3MOE_BACKEND", "numpy")):
        _SAVED_ENV[name] = os.environ.get(name)
        os.environ[name] = value


def pytest_unconfigure(config):
    for name in ("QWEN3MOE_CACHE", "QWEN3MOE_BACKEND"):
        old = _SAVED_ENV.pop(name, None)
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old
    for cache in _CACHE_DIR:
        shutil.rmtree(cache, ignore_errors=True)
    _CACHE_DIR.clear()


_SEED = int(os.environ.get("QWEN3MOE_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))


def pytest_report_header(config):
    return f"qwen3moe test seed: {_SEED} (replay with QWEN3MOE_TEST_SEED={_SEED})"


@pytest.fixture(scope="session")
def test_seed() -> int:
    return _SEED


@pytest.fixture
def rng(test_seed, request) -> np.random.Generator:
    """A generator seeded from the run's seed and the test's name: fresh every run, replayable, independent per test."""
    return np.random.default_rng([test_seed, *request.node.nodeid.encode()])


@pytest.fixture(scope="session")
def _tiny_tensors(test_seed) -> dict[str, np.ndarray]:
    return random_weights(TINY_CONFIG, seed=test_seed)


@pytest.fixture
def tiny_tensors(_tiny_tensors) -> dict[str, np.ndarray]:
    """The tensors of ``tiny_model_dir`` (bf16, per-expert names). A fresh dict; do not modify the arrays in place."""
    return dict(_tiny_tensors)


@pytest.fixture
def tiny_config() -> dict:
    """A fresh copy of TINY_CONFIG to modify."""
    return {k: (list(v) if isinstance(v, list) else v) for k, v in TINY_CONFIG.items()}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, _tiny_tensors) -> Path:
    """A complete sharded (2 shards + index) bf16 checkpoint of TINY_CONFIG. Read-only: tests must not modify it."""
    return write_checkpoint(tmp_path_factory.mktemp("tiny") / "model", dict(TINY_CONFIG), _tiny_tensors, shards=2)


@pytest.fixture
def make_model_dir(tmp_path, _tiny_tensors):
    """``make(tensors=None, config=None, shards=2, name=None, **config_updates) -> Path``.

    Writes a full model folder (config, tokenizer files, weights) under ``tmp_path``. ``tensors`` defaults to the
    tensors of ``tiny_model_dir`` and ``config`` to TINY_CONFIG; keyword arguments update the config.
    ``shards=1`` writes a single ``model.safetensors`` without index.
    """
    counter = iter(range(10**6))

    def make(tensors=None, config=None, shards=2, name=None, **config_updates):
        cfg = dict(TINY_CONFIG if config is None else config) | config_updates
        tensors = dict(_tiny_tensors if tensors is None else tensors)
        return write_checkpoint(tmp_path / (name or f"model{next(counter)}"), cfg, tensors, shards=shards)

    return make


@pytest.fixture
def compute_logits():
    """``logits(model_or_dir, ids) -> (len(ids), vocab) float32``: a fresh-cache prefill returning every position."""
    from qwen3moe import Qwen3MoeForCausalLM
    from qwen3moe.model import KVCache, Request

    def logits(model, ids):
        if not isinstance(model, Qwen3MoeForCausalLM):
            model = Qwen3MoeForCausalLM(model)
        ids = [int(i) for i in ids]
        cache = KVCache(model.config, len(ids), xp=model.xp)
        (out,) = model.forward([Request(ids, 0, cache)], all_logits=True)
        return out

    return logits


@pytest.fixture(params=sorted(__import__("qwen3moe").backends.BACKENDS))
def backend_name(request) -> str:
    """Every backend in the table; one that cannot run here is skipped with its reason."""
    from qwen3moe import backends

    reason = backends.unavailable_reason(request.param)
    if reason:
        pytest.skip(f"backend {request.param} is not available here: {reason}")
    return request.param
