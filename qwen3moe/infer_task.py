"""Batch inference objects in the user guide's shape: a task is one conversation being generated, with its own
tokens, sampling settings, random generator and KV cache.

    task = Qwen3MoeInferTask(tokens, temperature=0.7, topk=50, topp=0.8, task_id=0)
    task.bind_kvcache(Qwen3MoeKVCache(model))
    while not task.finished:
        model.batch_infer_one_round([task, ...])   # one new token per task, appended to task.tokens

A task finishes with ``finish_reason`` "stop" (it sampled one of its end tokens) or "length" (it reached
``max_new_tokens`` or its cache is full: the next token would have no slot). Nothing is ever written past the cache.
"""

import numpy as np

from .errors import fits_in_memory, size
from .model import KVCache
from .sampling import check_sampling


class Qwen3MoeKVCache(KVCache):
    """A KV cache sized for ``model``: ``max_tokens`` positions (default: the model's ``max_tokens``)."""

    def __init__(self, model, max_tokens: int | None = None):
        capacity = model.max_tokens if max_tokens is None else int(max_tokens)
        if not 0 < capacity <= model.config.max_position_embeddings:
            raise ValueError(f"a KV cache needs 1..{model.config.max_position_embeddings} positions "
                             f"(max_position_embeddings), got {capacity}")
        c = model.shard_config  # a split model's rank 0: its kv heads only
        nbytes = 2 * 4 * int(np.prod(KVCache.shape(c, capacity)))  # float32 keys and values
        with fits_in_memory(f"a KV cache of {capacity} positions ({size(nbytes)}) does not fit",
                            "ask for fewer positions (Qwen3MoeKVCache(model, max_tokens=...), --max-tokens), or drop "
                            "the caches of finished tasks"):
            super().__init__(c, capacity, xp=model.xp)
        if model._ranks:
            model._ranks.open_cache(self)  # and the other ranks open their parts


class Qwen3MoeInferTask:
    def __init__(self, tokens, temperature: float = 1.0, topk: int = 1, topp: float = 1.0, task_id=0,
                 end_tokens=None, max_new_tokens: int | None = None, seed: int | None = None):
        """``end_tokens`` None means the model's eos ids; ``seed`` makes this task's draws reproducible, also when it
        shares rounds with other tasks (each task has its own generator)."""
        check_sampling(temperature, topk, topp)
        self.tokens = [int(t) for t in tokens]  # the prompt, then every generated token
        if not self.tokens:
            raise ValueError("a task needs at least one prompt token")
        if max_new_tokens is not None and max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 or None, got {max_new_tokens}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"seed must be a whole number >= 0 or None, got {seed!r}")
        self.prompt_len = len(self.tokens)
        self.temperature, self.topk, self.topp = temperature, topk, topp
        self.task_id = task_id
        self.end_tokens = None if end_tokens is None else {int(t) for t in end_tokens}
        self.max_new_tokens = max_new_tokens
        self.rng = np.random.default_rng(seed)
        self.kvcache: KVCache | None = None
        self.pos = 0  # tokens[:pos] are in the cache
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def generated(self) -> list[int]:
        return self.tokens[self.prompt_len:]

    @property
    def pending(self) -> list[int]:
        """Tokens the next round feeds: the whole prompt first, then the last sampled token."""
        return self.tokens[self.pos:]

    def bind_kvcache(self, kvcache: KVCache) -> None:
        if len(self.tokens) > kvcache.capacity:
            raise ValueError(f"task {self.task_id}: {len(self.tokens)} tokens do not fit in a KV cache of "
                             f"{kvcache.capacity} positions; shorten the prompt or create the model/cache with "
                             "a larger max_tokens")
        self.kvcache, self.pos = kvcache, 0

    def release_kvcache(self) -> KVCache | None:
        """Detach and return the cache (to reuse it for another task)."""
        cache, self.kvcache = self.kvcache, None
        return cache

    def accept(self, token: int, eos_ids) -> None:
        """Record the token sampled for this task in a round and decide whether the task is finished."""
        self.pos = len(self.tokens)
        self.tokens.append(int(token))
        end_tokens = self.end_tokens if self.end_tokens is not None else set(eos_ids)
        if token in end_tokens:
            self.finish_reason = "stop"
        elif self.max_new_tokens is not None and len(self.generated) >= self.max_new_tokens:
            self.finish_reason = "length"
        elif len(self.tokens) > self.kvcache.capacity:  # the new token's position has no slot in the cache
            self.finish_reason = "length"
