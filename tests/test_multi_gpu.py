"""A model split over 2 and 4 GPUs (one process per GPU, NCCL) against one GPU: the same greedy tokens for 64 steps
and logits within float32-accumulation tolerance, under both expert placements, on the bundled model and on two
layers of Qwen3-30B-A3B's real shapes; and a rank that dies stops the group with an error instead of a hang.

Needs a machine with at least 2 NVIDIA GPUs (run on 4 H100s); elsewhere every test is skipped with the reason.
"""

import multiprocessing
import os
import signal
import threading
import time

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache, backends
from qwen3moe.bench import QWEN3_30B_A3B
from qwen3moe.errors import RankFailure
from qwen3moe.layers import RoutingOverride
from qwen3moe.model import Request
from qwen3moe.synthetic import write_large_synthetic_checkpoint


def gpu_count() -> int:
    if backends.unavailable_reason("cupy") is not None:
        return 0
    import cupy
    return cupy.cuda.runtime.getDeviceCount()


GPUS = gpu_count()
pytestmark = pytest.mark.skipif(GPUS < 2, reason=f"needs 2 or more NVIDIA GPUs, this machine has {GPUS}")
SPLITS = [(n, e) for n in (2, 4) if n <= GPUS for e in ("ep", "etp")]
RTOL = 1e-4  # every rank accumulates in float32; the all-reduce only changes the order of the sums
os.environ.setdefault("NCCL_NVLS_ENABLE", "0")


def greedy_tokens(model, prompt: list[int], steps: int) -> list[int]:
    """64 greedy tokens through generate's path: the prefill, then the captured decode graph."""
    task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[], max_new_tokens=steps)
    task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(prompt) + steps))
    model.batch_infer_one_round([task])
    decoder = (model._ranks.greedy_decoder(task.kvcache, task.pos, task.tokens[-1]) if model._ranks else
               model._ops.GreedyDecoder(model._state, task.kvcache, task.pos, task.tokens[-1]))
    for _ in range(steps - 1):
        task.accept(decoder.step(), [])
    return task.generated


def all_logits(model, prompt: list[int]) -> np.ndarray:
    (logits,) = model.forward([Request(prompt, 0, Qwen3MoeKVCache(model, max_tokens=len(prompt)))], all_logits=True)
    return logits


@pytest.fixture(scope="module")
def model_30b(tmp_path_factory):
    """Two (MoE) layers of Qwen3-30B-A3B's shapes: 2.5 GB of bf16 on disk."""
    config = dict(QWEN3_30B_A3B, num_hidden_layers=2)
    return write_large_synthetic_checkpoint(tmp_path_factory.mktemp("q30b") / "m", config, seed=3)


def prompt_for(model) -> list[int]:
    return model.tokenizer.encode("The sea, the ships and the sailors who go out on them")


@pytest.fixture(scope="module", params=["bundled", "30b"])
def single(request, model_30b):
    folder = None if request.param == "bundled" else model_30b
    m = Qwen3MoeForCausalLM(folder, device="nvidia")
    prompt = prompt_for(m)
    result = dict(folder=folder, prompt=prompt, tokens=greedy_tokens(m, prompt, 64), logits=all_logits(m, prompt))
    m.destroy_model_instance()
    return result


@pytest.mark.parametrize("all_reduce", ["peer", "nccl"])
@pytest.mark.parametrize("ndev, experts", SPLITS)
def test_split_model_matches_one_gpu(single, ndev, experts, all_reduce, monkeypatch):
    """The logits of a prompt and 64 greedy tokens (the prefill, then every rank's captured decode graph) of one GPU.
    "nccl": every all-reduce on NCCL (``QWEN3MOE_ALL_REDUCE``, which every rank inherits), the path of ranks on
    several machines, where the peer kernel cannot reach (moe_combine then adds a rank's picks before the all-reduce
    and the next block normalises after it)."""
    monkeypatch.setenv("QWEN3MOE_ALL_REDUCE", all_reduce)
    m = Qwen3MoeForCausalLM(single["folder"], device="nvidia", ndev=ndev, experts=experts)
    try:
        logits = all_logits(m, single["prompt"])
        scale = float(np.abs(single["logits"]).max())
        np.testing.assert_allclose(logits, single["logits"], rtol=RTOL, atol=RTOL * scale)
        assert greedy_tokens(m, single["prompt"], 64) == single["tokens"]
    finally:
        m.destroy_model_instance()


@pytest.mark.parametrize("experts", ["ep", "etp"])
def test_a_split_model_prefills_at_bf16_precision(model_30b, experts):
    """precision="bf16" on 2 GPUs (every rank prepares its part with it): the last logits of a 200-token prompt, whose
    products run on bf16 activations, agree with one GPU's float32 logits to bf16 rounding (2e-2 of the largest;
    ~5e-3 is seen on one GPU) but not to 1e-5 (so the rounding took place). Every token takes all 128 experts
    (RoutingOverride): with 8, bf16 rounding flips the choice between two near-tied experts for a token now and then,
    and its logits then differ by more than rounding (5 of 151936 logits past the tolerance, once in ~10 runs)."""
    prompt = np.random.default_rng().integers(0, 150000, 200).tolist()
    every_expert = RoutingOverride(top_k=QWEN3_30B_A3B["num_experts"])
    one = Qwen3MoeForCausalLM(model_30b, device="nvidia")
    one.routing_override = every_expert
    try:
        expected = all_logits(one, prompt)[-1]
    finally:
        one.destroy_model_instance()
    m = Qwen3MoeForCausalLM(model_30b, device="nvidia", ndev=2, experts=experts, precision="bf16")
    m.routing_override = every_expert
    try:
        logits = all_logits(m, prompt)[-1]
    finally:
        m.destroy_model_instance()
    scale = float(np.abs(expected).max())
    np.testing.assert_allclose(logits, expected, rtol=0, atol=2e-2 * scale)
    assert np.abs(logits - expected).max() > 1e-5 * scale


def test_generate_and_batch_rounds_on_a_split_model():
    """Greedy and seeded sampled generate, and batch rounds, on 2 GPUs (each decoded in captured steps on both ranks)
    give one GPU's text and tokens."""
    sampled = dict(temperature=0.8, topk=20, topp=0.9, seed=5)
    one = Qwen3MoeForCausalLM(device="nvidia")
    text, _ = one.generate("Tell me about the sea", max_steps=40, temperature=0)
    sampled_text, _ = one.generate("Tell me about the sea", max_steps=40, **sampled)
    tasks_one = [Qwen3MoeInferTask(one.tokenizer.encode(p), temperature=0, end_tokens=[], max_new_tokens=6)
                 for p in ("ROMEO:", "What light through yonder window breaks?")]
    m = Qwen3MoeForCausalLM(device="nvidia", ndev=2, experts="etp")
    try:
        assert m.generate("Tell me about the sea", max_steps=40, temperature=0)[0] == text
        assert m._ranks.rank.decoder is not None  # the decode ran as captured graphs on both ranks
        m._ranks.rank.decoder = None
        assert m.generate("Tell me about the sea", max_steps=40, **sampled)[0] == sampled_text
        assert m._ranks.rank.decoder.sampling is not None  # sampled in the captured graphs
        tasks = [Qwen3MoeInferTask(t.tokens, temperature=0, end_tokens=[], max_new_tokens=6) for t in tasks_one]
        for model, ts in ((one, tasks_one), (m, tasks)):
            for t in ts:
                t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=64))
            while not all(t.finished for t in ts):
                model.batch_infer_one_round(ts)
        assert [t.generated for t in tasks] == [t.generated for t in tasks_one]
        assert sum(load.slots.sum() for load in m.get_rank_loads().values()) > 0
    finally:
        m.destroy_model_instance()
        one.destroy_model_instance()


PASSAGE = ("ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun. Arise, "
           "fair sun, and kill the envious moon, who is already sick and pale with grief.")


SAMPLED = [(0.0, 1, 1.0), (0.8, 20, 0.9), (1.0, 0, 1.0), (1.2, 5, 0.8)]  # (temperature, topk, topp) by turns


def batch_graph_tokens(model, prompts: list[list[int]], steps: int, sampled: bool = False) -> list[list[int]]:
    """Tokens of several sequences: one batch round for the prompts, then the captured graph of the batch; greedy,
    or with the SAMPLED settings by turns and fixed seeds."""
    settings = [SAMPLED[j % len(SAMPLED)] if sampled else (0.0, 1, 1.0) for j in range(len(prompts))]
    tasks = [Qwen3MoeInferTask(p, *settings[j], end_tokens=[], max_new_tokens=steps, seed=j)
             for j, p in enumerate(prompts)]
    for t in tasks:
        t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(t.tokens) + steps))
    firsts = model.batch_infer_one_round(tasks)
    args = ([t.kvcache for t in tasks], [t.pos for t in tasks], firsts,
            [(t.temperature, t.topk, t.topp, t.rng) for t in tasks] if sampled else None)
    decoder = (model._ranks.batch_decoder(*args) if model._ranks else
               model._ops.BatchDecoder(model._state, *args))
    out = [[f] for f in firsts]
    for _ in range(steps - 1):
        for row, token in zip(out, decoder.step()):
            row.append(token)
    return out


@pytest.mark.parametrize("ndev, experts", SPLITS)
def test_batch_graph_decoding_on_a_split_model(ndev, experts):
    """20 sequences of different lengths decoded through every rank's captured graph of the batch give one GPU's
    tokens (at 20 tokens a step the projections and experts take the tensor-core paths inside the graph): greedy, and
    sampled on the device from rank 0's seeded draws over the logits gathered from every rank's vocabulary rows."""
    one = Qwen3MoeForCausalLM(device="nvidia")
    words = PASSAGE.split()
    prompts = [one.tokenizer.encode(" ".join(words[:n])) for n in range(2, 22)]
    try:
        expected = {sampled: batch_graph_tokens(one, prompts, 16, sampled) for sampled in (False, True)}
    finally:
        one.destroy_model_instance()
    m = Qwen3MoeForCausalLM(device="nvidia", ndev=ndev, experts=experts)
    try:
        for sampled in (False, True):
            assert batch_graph_tokens(m, prompts, 16, sampled) == expected[sampled], f"sampled={sampled}"
    finally:
        m.destroy_model_instance()


ALL_REDUCE_ROWS = [1, 64, 128, 129]  # batch 1 and 64 of a 2048-wide hidden state, the peer path's limit, past it


def all_reduce_inputs(rank: int, replay: int, rows: int) -> np.ndarray:
    return np.random.default_rng([rank, replay, rows]).standard_normal((rows, 2048)).astype(np.float32)


FUSED_CASES = {"moe": (40, 3), "dense": (3, 1)}  # (rows, picks a row) of the block whose picks the all-reduce sums
FUSED_EXPERTS = 8


def fused_inputs(rank: int, ndev: int, case: str) -> dict:
    """One rank's inputs to ``reduce_over_ranks`` after an MLP/MoE block: the hidden state and norm weight (the same
    on every rank), the routing, and the rank's weighted outputs of its picks -- of its own block of experts under
    expert parallelism, NaN where the pick is another rank's (rows a rank never writes)."""
    T, K = FUSED_CASES[case]
    shared = np.random.default_rng([17, T])
    x = shared.standard_normal((T, 2048)).astype(np.float32)
    weight = shared.uniform(0.5, 1.5, 2048).astype(np.float32)
    ids = shared.integers(0, FUSED_EXPERTS, (T, K)).astype(np.int32) if case == "moe" else None
    lo, hi = (rank * FUSED_EXPERTS // ndev, (rank + 1) * FUSED_EXPERTS // ndev) if case == "moe" else (0, 1)
    out = np.random.default_rng([rank, T]).standard_normal((T * K, 2048)).astype(np.float32)
    if ids is not None:
        out[~((ids >= lo) & (ids < hi)).reshape(-1)] = np.nan
    return dict(x=x, weight=weight, ids=ids, lo=lo, hi=hi, out=out)


def fused_expected(ndev: int, case: str) -> tuple[np.ndarray, np.ndarray]:
    """The float64 sum over ranks (rank 0's x plus every rank's own picks) and its RMSNorm."""
    parts = [fused_inputs(r, ndev, case) for r in range(ndev)]
    total = parts[0]["x"].astype(np.float64)
    for p in parts:
        T, K = FUSED_CASES[case]
        picks = np.nan_to_num(p["out"].astype(np.float64), nan=0.0).reshape(T, K, -1)
        total = total + picks.sum(axis=1)
    xn = parts[0]["weight"] * total / np.sqrt(np.mean(total ** 2, axis=-1, keepdims=True) + 1e-6)
    return total, xn


def all_reduce_rank(rank: int, ndev: int, unique_id: str, mode: str, results) -> None:
    """One rank of test_all_reduce_sums_over_ranks (its own process): one all-reduce per size, then a captured graph
    of two all-reduces in a row, replayed 5 times with new inputs."""
    os.environ["QWEN3MOE_ALL_REDUCE"] = mode
    import cupy as cp
    from fastpath import nccl_comm

    nccl_comm.bind_device(rank)
    comm = nccl_comm.NcclComm(rank, ndev, unique_id, alive=lambda: None)
    out = {"peer": comm.peer is not None, "odd": comm.all_reduce(cp.full(6, rank + 1.0, cp.float32)).get()}
    for rows in ALL_REDUCE_ROWS:
        out[rows] = comm.all_reduce(cp.asarray(all_reduce_inputs(rank, 0, rows))).get()
    src, x, y = cp.zeros((64, 2048), cp.float32), cp.zeros((64, 2048), cp.float32), cp.zeros((64, 2048), cp.float32)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        x[...] = src
        comm.all_reduce(x)
        cp.multiply(x, np.float32(rank + 1), out=y)  # depends on the first sum, differs by rank
        comm.all_reduce(y)
        graph = stream.end_capture()
        for replay in range(5):
            src.set(all_reduce_inputs(rank, replay + 1, 64))
            graph.launch(stream)
            stream.synchronize()
            out[f"graph{replay}"] = (x.get(), y.get())
    from types import SimpleNamespace
    from fastpath import cupy_backend

    for case in FUSED_CASES:  # the MoE block's sum of picks and the next block's norm, around the all-reduce
        a = fused_inputs(rank, ndev, case)
        s = SimpleNamespace(expert_lo=a["lo"], expert_hi=a["hi"], residual=rank == 0,
                            config=SimpleNamespace(rms_norm_eps=1e-6, num_experts=FUSED_EXPERTS))
        picks = SimpleNamespace(out=cp.asarray(a["out"]), topk_ids=None if a["ids"] is None else cp.asarray(a["ids"]))
        x, xn = cp.asarray(a["x"]), cp.full(a["x"].shape, np.nan, cp.float32)
        normed = cupy_backend.reduce_over_ranks(s, comm, x, (cp.asarray(a["weight"]), xn), picks)
        out[case] = (normed, x.get(), xn.get())
    results.put((rank, out))
    results.close()
    results.join_thread()
    comm._sum_int(1)  # no rank exits while another may still read its buffer
    os._exit(0)  # at once: tearing CUDA and NCCL down takes up to a minute


@pytest.mark.parametrize("ndev", [n for n in (2, 4) if n <= GPUS])
@pytest.mark.parametrize("mode", ["peer", "nccl"])
def test_all_reduce_sums_over_ranks(ndev, mode):
    """Every rank gets the float64 sum of every rank's numbers to float32 rounding, with the same bits on every rank:
    through the peer-memory kernel for decode-sized messages (its limit included) and NCCL past it and for sizes
    that are not a whole number of float4s; and inside a captured graph replayed with new inputs, where each replay
    moves the kernel's epochs on and alternates its slots. After an MLP/MoE block (``reduce_over_ranks``) each rank
    adds only its own picks (the others' rows are NaN) and only rank 0 the residual; the peer kernel also writes the
    RMSNorm of the sum, and NCCL leaves it to the next block."""
    from fastpath import nccl_comm

    spawn = multiprocessing.get_context("spawn")
    results, unique_id = spawn.Queue(), nccl_comm.new_id()
    procs = [spawn.Process(target=all_reduce_rank, args=(r, ndev, unique_id, mode, results)) for r in range(ndev)]
    for p in procs:
        p.start()
    outs = dict(results.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert [outs[r]["peer"] for r in range(ndev)] == [mode == "peer"] * ndev, "peer memory between these GPUs?"
    close = lambda got, want: np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    for r in range(ndev):
        close(outs[r]["odd"], np.full(6, ndev * (ndev + 1) / 2))
        for rows in ALL_REDUCE_ROWS:
            want = sum(all_reduce_inputs(q, 0, rows).astype(np.float64) for q in range(ndev))
            close(outs[r][rows], want)
            assert np.array_equal(outs[r][rows], outs[0][rows]), f"rank {r} differs from rank 0 at {rows} rows"
        for replay in range(5):
            x, y = outs[r][f"graph{replay}"]
            want = sum(all_reduce_inputs(q, replay + 1, 64).astype(np.float64) for q in range(ndev))
            close(x, want)
            close(y, want * ndev * (ndev + 1) / 2)
            assert np.array_equal(x, outs[0][f"graph{replay}"][0]) and np.array_equal(y, outs[0][f"graph{replay}"][1])
        for case in FUSED_CASES:
            normed, x, xn = outs[r][case]
            want, want_xn = fused_expected(ndev, case)
            close(x, want)
            assert np.array_equal(x, outs[0][case][1]), f"rank {r} differs from rank 0 ({case})"
            assert normed == (mode == "peer")
            if normed:  # float32 sums of squares and a float32 root: a few ulps more than the sum itself
                np.testing.assert_allclose(xn, want_xn, rtol=1e-5, atol=1e-5 * np.abs(want_xn).max())


def test_a_rank_that_dies_mid_generation_stops_the_group_with_its_name():
    """The worker is killed while rank 0 waits on the GPU for a step's collectives: rank 0 must notice, abort NCCL
    and raise, not wait forever."""
    m = Qwen3MoeForCausalLM(device="nvidia", ndev=2)
    worker = m._ranks.procs[1]
    m.generate("warm up", max_steps=4, temperature=0)
    killer = threading.Timer(0.3, os.kill, (worker.pid, signal.SIGKILL))
    killer.start()
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1 failed: its process was killed by signal 9"):
        greedy_tokens(m, prompt_for(m), 2000)  # no end token: runs until the kill
    assert time.monotonic() - start < 10
    with pytest.raises(RankFailure):
        m.generate("again", max_steps=4)
