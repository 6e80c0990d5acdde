"""Qwen3MoeForCausalLM: the user guide's API around the model loop.

    model = Qwen3MoeForCausalLM("path/to/model", device="cpu", max_tokens=2048)
    text, ms_per_token = model.generate("Tell me about the sea", max_steps=64)
    model.print_router_stats()
    model.destroy_model_instance()

``ndev`` > 1 splits the model over that many devices, one process per device (``ranks.py``); this object is rank 0
and drives the others, so the API is the same.

Batch inference (``batch_infer_one_round``) and perplexity go through the same ``model.forward`` step.
"""

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backends
from .bundled import default_model_dir
from .config import load_config
from .debug import Debugger
from .errors import CheckpointError, fits_in_memory, size
from .devices import resolve_backend
from .infer_task import Qwen3MoeInferTask, Qwen3MoeKVCache
from .layers import RoutingOverride
from .model import Request, forward
from .ranks import RankGroup
from .router_stats import RouterStats
from .sampling import check_sampling, is_greedy, sample
from .sharding import PLACEMENTS, format_rank_loads, plan_sharding, rank_loads
from .tokenizer import Qwen3Tokenizer, read_json
from .weights import load_weights

DEFAULT_MAX_TOKENS = 4096  # KV cache positions per task unless the caller asks otherwise


class Qwen3MoeForCausalLM:
    def __init__(self, model_dir_path: str | Path | None = None, device=None, ndev: int = 1,
                 max_tokens: int | None = None, backend: str = "auto", debug: bool = False, experts: str = "ep",
                 precision: str = "float32"):
        """Load and validate a Hugging Face model folder (default: the bundled model).

        ``device``: "cpu" or "nvidia" (or a DeviceType); None takes the device of ``backend`` (the CPU for "auto").
        ``backend``: "auto" (the fastest available, or $QWEN3MOE_BACKEND), "numpy" (the reference), "numba" (CPU)
        or "cupy" (NVIDIA GPU).
        ``ndev``: devices to split the model over; ``experts``: how they share the experts, "ep" (whole experts
        per device) or "etp" (a slice of every expert per device), see ``sharding.py``.
        ``precision``: "float32" (every backend: results within ~1e-5 of the reference) or "bf16": products take
        bf16 activations where the arithmetic bounds the time, as bf16 engines do -- on the cupy backend the
        tensor cores' prefill, on the numba backend steps of fewer than 16 tokens (decoding; AVX512-BF16, bf16
        checkpoints) -- with logits within bf16 rounding (~1e-3 to 1e-2) of the reference.
        """
        if experts not in PLACEMENTS:  # (checked before anything loads, also where ndev = 1 does not use it)
            raise ValueError(f"experts must be 'ep' or 'etp', not {experts!r}")
        self.backend = resolve_backend(device, ndev, backend)
        options = backends.prepare_options(self.backend, precision)
        self.model_dir = Path(model_dir_path) if model_dir_path is not None else default_model_dir()
        self.config = load_config(self.model_dir)
        limit = self.config.max_position_embeddings
        self.max_tokens = min(DEFAULT_MAX_TOKENS, limit) if max_tokens is None else int(max_tokens)
        if not 0 < self.max_tokens <= limit:
            raise ValueError(f"max_tokens must be in 1..{limit} (max_position_embeddings), got {max_tokens}")
        self.weights = load_weights(self.model_dir, self.config)
        self.tokenizer = Qwen3Tokenizer(self.model_dir, extra_eos_ids=self.config.eos_token_id)
        if self.tokenizer.vocab_size > self.config.vocab_size:
            raise CheckpointError(f"{self.model_dir}: tokenizer.json has {self.tokenizer.vocab_size} tokens but the "
                                  f"model's vocab_size is {self.config.vocab_size}; the tokenizer belongs to "
                                  "another model")
        self._ranks = None  # the other ranks when the model is split over devices
        if ndev > 1:
            self._ranks = RankGroup(ndev, self.backend, self.config, experts, "qwen3moe.ranks:load_folder",
                                    self.weights, model_dir=str(self.model_dir), options=options)
            self._ops, self._state = self._ranks.rank.ops, self._ranks.rank.state
            self.shard_config = self._ranks.rank.shard_config  # what this rank's part looks like (its KV caches)
        else:
            self._ops = backends.load(self.backend)
            nbytes = sum(a.nbytes for a in self.weights.arrays())
            with fits_in_memory(f"the model's weights ({size(nbytes)}) do not fit",
                                "split the model over several devices (ndev=N, --nvidia N) or use a larger device"):
                self._state = self._ops.prepare(self.weights, self.config, **options)
            self.shard_config = self.config
        self.xp = self._ops.xp  # numpy, or cupy when the KV caches live on a GPU
        self.generation_config = read_json(self.model_dir / "generation_config.json")
        self._router_stats = RouterStats(self.config)
        self.debugger = Debugger(enabled=debug)
        self._routing_override: RoutingOverride | None = None
        self._rounds: CapturedRounds | None = None  # the decode rounds being replayed from a captured step
        self._previous_round: list[Qwen3MoeInferTask] = []

    @property
    def router_stats(self) -> RouterStats:
        """The router statistics of every step so far (including the counts a captured decoder keeps on the device)."""
        if self._rounds is not None:
            self._rounds.decoder.flush_stats(self._router_stats)
        return self._router_stats

    @property
    def routing_override(self) -> RoutingOverride | None:
        """A what-if for the router (top-k, disabled experts) applied to every later step; None: normal routing."""
        return self._routing_override

    @routing_override.setter
    def routing_override(self, override: RoutingOverride | None) -> None:
        c = self.config
        if override is not None:
            if override.top_k is not None and not 1 <= override.top_k <= c.num_experts:
                raise ValueError(f"top_k must be in 1..{c.num_experts} (num_experts), got {override.top_k}")
            for layer, experts in override.disabled.items():
                if layer not in c.moe_layers:
                    raise ValueError(f"layer {layer} is not an MoE layer (MoE layers: {c.moe_layers})")
                if any(not 0 <= e < c.num_experts for e in experts):
                    raise ValueError(f"layer {layer}: expert ids must be in 0..{c.num_experts - 1}, got "
                                     f"{sorted(experts)}")
                if c.num_experts - len(set(experts)) < (override.top_k or c.num_experts_per_tok):
                    raise ValueError(f"layer {layer}: disabling {len(set(experts))} of {c.num_experts} experts "
                                     f"leaves fewer than top_k={override.top_k or c.num_experts_per_tok}")
        self._routing_override = override

    # ---- batch inference ---------------------------------------------------------------------------------

    def batch_infer_one_round(self, tasks: list[Qwen3MoeInferTask]) -> list[int]:
        """Feed every task its pending tokens (a prompt or its last token) in one step; sample one token each.

        Each task is advanced (token appended, finish_reason set when it ends). Everything is checked before any
        compute, and a task only advances once the whole step succeeded, so a failed round changes nothing.
        """
        self._check_alive()
        for t in tasks:
            if t.finished:
                raise ValueError(f"task {t.task_id} already finished ({t.finish_reason}); leave it out of the round")
            if t.kvcache is None:
                raise ValueError(f"task {t.task_id} has no KV cache; call task.bind_kvcache(Qwen3MoeKVCache(model))")
        if len({id(t.kvcache) for t in tasks}) < len(tasks):
            raise ValueError("two tasks of one round share a KV cache; give each task its own")
        rounds = self._captured_rounds(tasks)
        if rounds is not None:
            try:
                tokens = rounds.decoder.step()
            except Exception:  # the decoder's device state has moved on without the tasks: capture afresh
                self._drop_captured_rounds()
                raise
            rounds.last = tokens
        else:
            requests = [Request(t.pending, t.pos, t.kvcache, t.task_id) for t in tasks]
            logits = self.forward(requests)
            with self.debugger.phase("sampling"):
                tokens = [sample(l, t.temperature, t.topk, t.topp, t.rng) for l, t in zip(logits, tasks)]
            self.debugger.end_step(f"round of {len(tasks)} tasks, {sum(len(r.tokens) for r in requests)} tokens")
        for t, tok in zip(tasks, tokens):
            t.accept(tok, self.tokenizer.eos_token_ids)
        return tokens

    def _captured_rounds(self, tasks: list[Qwen3MoeInferTask]) -> "CapturedRounds | None":
        """The captured decode step (the backend's ``BatchDecoder``) that continues exactly these tasks, or None: the
        round goes through the model loop. A round whose tasks all decode one token, and are the tasks of the round
        before, is captured (capturing costs about as much as a few steps, so a set of tasks that changes every round
        never pays for it); the capture is replayed while the same tasks continue. Like ``generate``'s decoder it
        routes as the config says and keeps no per-token trace or debug checks, so it is not used while those are on.
        """
        if self._rounds is not None and self._rounds.continues(tasks):
            return self._rounds
        self._drop_captured_rounds()
        repeated = len(tasks) == len(self._previous_round) and all(a is b for a, b in zip(tasks, self._previous_round))
        self._previous_round = list(tasks)
        able = self._ranks is not None or hasattr(self._ops, "BatchDecoder")
        decoding = all(len(t.pending) == 1 for t in tasks)
        if not (repeated and able and decoding and self._may_decode_in_whole_steps()):
            return None
        args = ([t.kvcache for t in tasks], [t.pos for t in tasks], [t.pending[0] for t in tasks], sampling_rows(tasks))
        with fits_in_memory(f"the decode step of {len(tasks)} sequences does not fit",
                            "decode fewer tasks a round"):
            decoder = self._ranks.batch_decoder(*args) if self._ranks else self._ops.BatchDecoder(self._state, *args)
        self._rounds = CapturedRounds(list(tasks), args[0], decoder, args[2])
        return self._rounds

    def _drop_captured_rounds(self) -> None:
        if self._rounds is not None:
            self._rounds.decoder.flush_stats(self._router_stats)
            self._rounds = None

    def forward(self, requests: list[Request], all_logits: bool = False) -> list:
        """One model step (see model.forward): per request, the last token's logits, or all of them."""
        self._check_alive()
        if self._ranks:
            return self._ranks.forward(requests, all_logits, self._routing_override, self.router_stats, self.debugger)
        tokens = sum(len(r.tokens) for r in requests)
        with fits_in_memory(f"a step of {tokens} tokens does not fit",
                            "run fewer or shorter prompts at a time (fewer tasks a round); no task has advanced"):
            return forward(self._ops, self._state, self.config, requests, self.router_stats, self.debugger,
                           all_logits, self._routing_override)

    # ---- generation --------------------------------------------------------------------------------------

    def generate(self, input_content: str, max_steps: int = 128, temperature: float | None = None,
                 topk: int | None = None, topp: float | None = None, *, chat: bool = True,
                 enable_thinking: bool | None = None, seed: int | None = None, stream=None) -> tuple[str, float]:
        """Generate a reply; return (text, average milliseconds per decode step).

        Sampling settings left as None come from generation_config.json (greedy if it says nothing). With ``chat``
        the prompt goes through the model's chat template. ``stream(piece)`` is called with text as it is decoded.
        The prefill step is not counted in the average: it measures decode speed, as the guide reports it.
        """
        self._check_alive()
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        temperature, topk, topp = self.sampling_defaults(temperature, topk, topp)
        prompt = input_content
        if chat:
            prompt = self.tokenizer.apply_chat_template([{"role": "user", "content": input_content}],
                                                        enable_thinking=enable_thinking)
        task = Qwen3MoeInferTask(self.tokenizer.encode(prompt), temperature, topk, topp,
                                 max_new_tokens=max_steps, seed=seed)
        task.bind_kvcache(Qwen3MoeKVCache(self, max_tokens=min(self.max_tokens, len(task.tokens) + max_steps)))
        decoder = self.tokenizer.stream_decoder()
        pieces, decode_seconds = [], []

        def emit(piece: str) -> None:
            pieces.append(piece)
            if stream and piece:
                stream(piece)

        step = lambda: self.batch_infer_one_round([task])[0]
        whole_steps = None  # the backend's whole-step decoder, when it takes over after the prefill
        while not task.finished:
            start = time.perf_counter()
            token = step()
            if len(task.generated) > 1:  # the first round is the prefill
                decode_seconds.append(time.perf_counter() - start)
            elif not task.finished:
                whole_steps = self._whole_step_decoder(task, token)
                if whole_steps is not None:
                    step = lambda: self._whole_step(whole_steps, task)
            if task.finish_reason != "stop":  # the end token itself is not part of the reply
                emit(decoder.push(token))
        if whole_steps is not None:
            whole_steps.flush_stats(self.router_stats)
        emit(decoder.flush())
        self.last_task = task
        avg_ms = 1e3 * float(np.mean(decode_seconds)) if decode_seconds else 0.0
        return "".join(pieces), avg_ms

    def _whole_step_decoder(self, task: Qwen3MoeInferTask, token: int):
        """The backend's decoder of whole steps (one CUDA graph, or one compiled call, per token) to continue ``task``
        from ``token``, or None where it cannot take over. It routes as the config says, counts router statistics but
        keeps no per-token trace and runs no debug checks. Greedy decoding takes a backend's ``GreedyDecoder``;
        sampling its ``BatchDecoder``, or else its ``SampledDecoder`` (both draw from the task's generator as the host
        sampler would)."""
        if not self._may_decode_in_whole_steps():
            return None
        sampling, cache, pos = sampling_rows([task]), task.kvcache, task.pos
        if self._ranks:
            return self._ranks.batch_decoder([cache], [pos], [token], sampling, one=True)
        if sampling is None and hasattr(self._ops, "GreedyDecoder"):
            return self._ops.GreedyDecoder(self._state, cache, pos, token)
        if hasattr(self._ops, "BatchDecoder"):
            return OneSequence(self._ops.BatchDecoder(self._state, [cache], [pos], [token], sampling))
        if hasattr(self._ops, "SampledDecoder"):
            return self._ops.SampledDecoder(self._state, cache, pos, token, sampling[0])
        return None

    def _may_decode_in_whole_steps(self) -> bool:
        """What a whole-step decoder needs beyond the backend offering one: the config's routing, no per-token trace,
        no debug checks, and, on a split model, ranks that decode in whole steps."""
        if self._routing_override is not None or self.debugger.enabled or self._router_stats.trace_enabled:
            return False
        return not self._ranks or self._ranks.can_decode_in_whole_steps

    def _whole_step(self, whole_steps, task: Qwen3MoeInferTask) -> int:
        token = whole_steps.step()
        task.accept(token, self.tokenizer.eos_token_ids)
        return token

    def sampling_defaults(self, temperature, topk, topp) -> tuple[float, int, float]:
        """Fill unset sampling settings from generation_config.json; greedy where it is silent or do_sample=false."""
        g = self.generation_config if self.generation_config.get("do_sample") else {}
        temperature = g.get("temperature", 0.0) if temperature is None else temperature
        topk = g.get("top_k", 0) if topk is None else topk
        topp = g.get("top_p", 1.0) if topp is None else topp
        check_sampling(temperature, topk, topp)
        return temperature, topk, topp

    # ---- evaluation --------------------------------------------------------------------------------------

    def perplexity(self, texts: list[str], window: int | None = None) -> float:
        """exp(mean negative log-likelihood per predicted token) over ``texts``.

        Each text is tokenised and cut into non-overlapping windows of ``window`` tokens (default: max_tokens);
        each window is scored on its own, predicting its tokens 2..n from the ones before. Log-probabilities come
        from a float64 log-softmax of the logits.
        """
        self._check_alive()
        window = self.max_tokens if window is None else int(window)
        if not 2 <= window <= self.max_tokens:
            raise ValueError(f"window must be in 2..{self.max_tokens} (max_tokens), got {window}")
        nll, count = 0.0, 0
        cache = Qwen3MoeKVCache(self, max_tokens=window)
        for text in texts:
            ids = self.tokenizer.encode(text)
            for begin in range(0, len(ids) - 1, window):
                chunk = ids[begin:begin + window]
                if len(chunk) < 2:
                    continue
                (logits,) = self.forward([Request(chunk, 0, cache)], all_logits=True)
                nll -= float(log_softmax(logits[:-1])[np.arange(len(chunk) - 1), chunk[1:]].sum())
                count += len(chunk) - 1
        if count == 0:
            raise ValueError("perplexity needs at least one text of two or more tokens")
        return float(np.exp(nll / count))

    # ---- router statistics -------------------------------------------------------------------------------

    def get_router_stats(self, layer_idx: int) -> dict:
        return self.router_stats.layer_stats(layer_idx)

    def print_router_stats(self) -> None:
        print(self.router_stats.format_table())
        if self._ranks:
            print(format_rank_loads(self._ranks.rank.plan, rank_loads(self._ranks.rank.plan, self.router_stats.counts)))

    def get_rank_loads(self) -> dict:
        """Per MoE layer, the expert work each rank did (``sharding.RankLoad``); one rank when not split."""
        plan = self._ranks.rank.plan if self._ranks else plan_sharding(self.config, 1)
        return rank_loads(plan, self.router_stats.counts)

    def reset_router_stats(self) -> None:
        self.router_stats.reset()

    # ---- lifetime ----------------------------------------------------------------------------------------

    def destroy_model_instance(self) -> None:
        """Drop the weights (closing their memory maps) and statistics, and end the other ranks of a split model; the
        object cannot be used afterwards."""
        self._drop_captured_rounds()
        if self._ranks:
            self._ranks.close()
        self.weights = self._state = None
        self._previous_round = []
        self._router_stats.reset()

    def _check_alive(self) -> None:
        if self.weights is None:
            raise RuntimeError("this model instance was destroyed; create a new Qwen3MoeForCausalLM")
        if self._ranks:
            self._ranks.check()


def sampling_rows(tasks: list[Qwen3MoeInferTask]) -> list | None:
    """A whole-step decoder's ``sampling`` for these tasks: None when all are greedy, else (temperature, topk, topp,
    rng) per task."""
    if all(is_greedy(t.temperature, t.topk) for t in tasks):
        return None
    return [(t.temperature, t.topk, t.topp, t.rng) for t in tasks]


@dataclass
class CapturedRounds:
    """Decode rounds of one list of tasks replayed through a backend's ``BatchDecoder``."""

    tasks: list[Qwen3MoeInferTask]
    caches: list
    decoder: object
    last: list[int]  # the tokens the decoder chose last: each task's pending token while the task follows it

    def continues(self, tasks: list[Qwen3MoeInferTask]) -> bool:
        return len(tasks) == len(self.tasks) and all(
            t is mine and t.kvcache is cache and t.pending == [token]
            for t, mine, cache, token in zip(tasks, self.tasks, self.caches, self.last))


class OneSequence:
    """A batch decoder of one sequence, seen as a decoder of one: ``step()`` returns its token."""

    def __init__(self, decoder):
        self.decoder = decoder

    def step(self) -> int:
        return self.decoder.step()[0]

    def flush_stats(self, stats: RouterStats) -> None:
        self.decoder.flush_stats(stats)


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
