"""A model split over CPU ranks (``ndev`` processes, numpy backend, all-reduce through rank 0's sockets) against the
unsplit model: the ranks' block outputs add up to the whole model's, a split model generates the same tokens and
statistics, a rank that fails stops the group with a clear error and no hang, a launcher can start the ranks, and the
message framing round-trips.

The reference is always the unsplit (ndev=1) numpy model, computed in this process; nothing compared here comes from
the split code path itself.
"""

import atexit
import fcntl
import json
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache, reference_backend
from qwen3moe import messages, ranks
from qwen3moe.config import config_from_dict
from qwen3moe.errors import DeviceError, RankFailure, UnsupportedConfigError
from qwen3moe.layers import AttentionSegment, rope_cos_sin
from qwen3moe.model import KVCache, Request
from qwen3moe.sharding import plan_sharding, rank_config, shard_weights
from qwen3moe.synthetic import TINY_CONFIG, random_weights
from qwen3moe.weights import arrange_weights

REPO = Path(__file__).resolve().parent.parent
SPLITS = [(2, "ep"), (2, "etp"), (4, "ep"), (4, "etp")]
SPLIT_IDS = [f"ndev{n}-{e}" for n, e in SPLITS]


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected| (shapes must match)."""
    assert actual.shape == expected.shape
    return float(np.abs(actual.astype(np.float64) - expected).max() / np.abs(expected).max())


# ---- 1. the ranks' parts add up to the whole model (in process, no communicator) ----------------------------------

SPLIT_CONFIGS = {
    # 4 query heads over 2 kv heads (split at ndev=2, each copied onto 2 ranks at ndev=4); head_dim 24 != 64/4;
    # layer 0 dense, layers 1-2 MoE; top-k weights renormalised
    "tiny": dict(TINY_CONFIG),
    # a single kv head, copied onto every rank
    "one-kv-head": dict(TINY_CONFIG, num_key_value_heads=1, norm_topk_prob=False),
    # 8 query heads, 2 kv heads; head_dim 16 != 48/8; dense layers 0 and 2 between MoE layers 1 and 3
    # (decoder_sparse_step 2); top-3 of 10 experts without renormalisation (blocks of 3, 3, 3, 1 over 4 ranks);
    # a vocabulary that no ndev divides; tied embeddings
    "sparse-step": dict(TINY_CONFIG, hidden_size=48, intermediate_size=96, num_hidden_layers=4, num_attention_heads=8,
                        num_key_value_heads=2, head_dim=16, decoder_sparse_step=2, mlp_only_layers=[],
                        num_experts=10, num_experts_per_tok=3, moe_intermediate_size=24, norm_topk_prob=False,
                        vocab_size=387, tie_word_embeddings=True),
}


@pytest.fixture
def split_states(request, rng):
    """(config, plan, whole state, one state per rank) of a random float32 model split as the test asks."""
    name, ndev, experts = request.param
    raw = SPLIT_CONFIGS[name]
    config = config_from_dict(raw)
    assert {"dense", "moe"} <= set(config.layer_types)
    weights = arrange_weights(random_weights(raw, seed=int(rng.integers(1 << 31)), dtype=np.float32), config, name)
    plan = plan_sharding(config, ndev, experts)
    whole = reference_backend.prepare(weights, config)
    parts = [reference_backend.prepare(shard_weights(weights, plan, r), rank_config(plan, r), plan.ranks[r])
             for r in range(ndev)]
    return config, plan, whole, parts


IN_PROCESS = [(name, n, e) for name in SPLIT_CONFIGS for n, e in SPLITS]
IN_PROCESS_IDS = [f"{name}-ndev{n}-{e}" for name, n, e in IN_PROCESS]


@pytest.mark.parametrize("split_states", IN_PROCESS, ids=IN_PROCESS_IDS, indirect=True)
def test_attention_parts_add_up_over_two_steps(split_states, rng):
    """Two requests (a prefill of 5 and one of 3, then a decode of 1 and a chunk of 2 on top of their caches): the
    sum of the ranks' attention blocks is the whole block, and each rank's cache holds the whole cache's kv heads."""
    config, plan, whole, parts = split_states
    capacity = 8
    whole_caches = [KVCache(config, capacity) for _ in range(2)]
    rank_caches = [[KVCache(rank_config(plan, r), capacity) for _ in range(2)] for r in range(plan.ndev)]
    for step in ([(0, 5), (0, 3)], [(5, 1), (3, 2)]):  # (pos, new tokens) per request
        bounds = np.cumsum([0] + [n for _, n in step])
        positions = np.concatenate([np.arange(pos, pos + n) for pos, n in step])
        cos, sin = rope_cos_sin(positions, config.head_dim, config.rope_theta)

        def segments(caches, layer):
            return [AttentionSegment(int(bounds[j]), int(bounds[j + 1]), pos, caches[j].k[layer], caches[j].v[layer])
                    for j, (pos, _) in enumerate(step)]

        for i in range(config.num_hidden_layers):
            x = rng.standard_normal((int(bounds[-1]), config.hidden_size), dtype=np.float32)
            expected = reference_backend.attention_block(whole, i, x.copy(), cos, sin, segments(whole_caches, i))
            outs = [reference_backend.attention_block(s, i, x.copy(), cos, sin, segments(rank_caches[r], i))
                    for r, s in enumerate(parts)]
            assert relative_error(sum(outs[1:], outs[0]), expected) < 1e-5, f"layer {i}"
            # only rank 0 carries the residual: the others' parts alone are far from x + attention
            assert relative_error(outs[0], expected) > 1e-3
    group = config.num_attention_heads // config.num_key_value_heads
    for r in range(plan.ndev):
        heads_per_rank = config.num_attention_heads // plan.ndev
        kv = sorted({h // group for h in range(r * heads_per_rank, (r + 1) * heads_per_rank)})  # what its q heads read
        for mine, full in zip(rank_caches[r], whole_caches):
            for a, b in ((mine.k, full.k), (mine.v, full.v)):
                np.testing.assert_allclose(a, b[:, :, kv], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split_states", IN_PROCESS, ids=IN_PROCESS_IDS, indirect=True)
def test_feed_forward_parts_add_up_and_every_rank_routes_alike(split_states, rng):
    """Dense and MoE layers, with the config's routing and with a what-if (top_k + 1, one expert disabled)."""
    config, plan, whole, parts = split_states
    T = 9
    for i in range(config.num_hidden_layers):
        disabled = np.zeros(config.num_experts, dtype=bool)
        disabled[int(rng.integers(config.num_experts))] = True
        for top_k, mask in ((config.num_experts_per_tok, None), (config.num_experts_per_tok + 1, disabled)):
            x = rng.standard_normal((T, config.hidden_size), dtype=np.float32)
            expected, routing = reference_backend.feed_forward_block(whole, i, x.copy(), top_k, mask)
            outs = [reference_backend.feed_forward_block(s, i, x.copy(), top_k, mask) for s in parts]
            total = sum((y for y, _ in outs[1:]), outs[0][0])
            assert relative_error(total, expected) < 1e-5, f"layer {i}, top_k {top_k}"
            if not config.is_moe_layer(i):
                assert routing is None and all(r is None for _, r in outs)
                continue
            for _, r in outs:
                np.testing.assert_array_equal(r.experts, routing.experts)
                np.testing.assert_allclose(r.weights, routing.weights, rtol=1e-6)
            if mask is not None:
                assert not np.isin(routing.experts, np.flatnonzero(mask)).any()


@pytest.mark.parametrize("split_states", IN_PROCESS, ids=IN_PROCESS_IDS, indirect=True)
def test_logits_parts_join_along_the_vocabulary(split_states, rng):
    config, plan, whole, parts = split_states
    x = rng.standard_normal((6, config.hidden_size), dtype=np.float32)
    expected = reference_backend.final_logits(whole, x)
    pieces = [reference_backend.final_logits(s, x) for s in parts]
    assert sum(p.shape[1] for p in pieces) == config.vocab_size
    assert relative_error(np.concatenate(pieces, axis=-1), expected) < 1e-6


# ---- 2. the bundled model split over processes against the unsplit model -------------------------------------------

PROMPT = "To be or not to be"  # without the chat template the bundled model runs all 64 greedy steps on this
STEPS = 64


def greedy(model) -> tuple[str, list[int]]:
    text, _ = model.generate(PROMPT, max_steps=STEPS, temperature=0, chat=False)
    return text, model.last_task.generated


def all_logits(model, ids: list[int]) -> np.ndarray:
    (logits,) = model.forward([Request(ids, 0, Qwen3MoeKVCache(model, max_tokens=len(ids) + 3))], all_logits=True)
    return logits


def batch_tokens(model, rounds: int = 6) -> list[list[int]]:
    """Two greedy tasks with prompts of different lengths; the second joins a round later, so its prefill shares a
    step with the first one's decode."""
    prompts = [model.tokenizer.encode("ROMEO:\nBut soft, what light through yonder window breaks?"),
               model.tokenizer.encode("JULIET:\nO")]
    assert len(prompts[0]) != len(prompts[1])
    tasks = [Qwen3MoeInferTask(p, temperature=0, task_id=k, end_tokens=[], max_new_tokens=rounds)
             for k, p in enumerate(prompts)]
    for t in tasks:
        t.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=len(t.tokens) + rounds))
    model.batch_infer_one_round(tasks[:1])
    while not all(t.finished for t in tasks):
        model.batch_infer_one_round([t for t in tasks if not t.finished])
    return [t.generated for t in tasks]


def heldout_text() -> str:
    text = (REPO / "data" / "qwen3-moe-shakespeare" / "heldout.txt").read_text(encoding="utf-8")
    return text[5000:6500]


LOGIT_TEXT = "KING HENRY:\nOnce more unto the breach, dear friends, once more;"


@pytest.fixture(scope="module")
def reference():
    """Everything the split models are compared with, from the unsplit numpy model."""
    model = Qwen3MoeForCausalLM(backend="numpy")
    try:
        assert model.config.num_attention_heads == 8 and model.config.num_key_value_heads == 2
        model.reset_router_stats()
        text, tokens = greedy(model)
        assert len(tokens) == STEPS and model.last_task.finish_reason == "length"
        counts = {layer: c.copy() for layer, c in model.router_stats.counts.items()}
        routed = dict(model.router_stats.tokens)
        ids = model.tokenizer.encode(LOGIT_TEXT)
        return dict(text=text, tokens=tokens, counts=counts, routed=routed, logit_ids=ids,
                    logits=all_logits(model, ids), batch=batch_tokens(model),
                    perplexity=model.perplexity([heldout_text()], window=128), config=model.config)
    finally:
        model.destroy_model_instance()


@pytest.fixture(scope="module", params=SPLITS, ids=SPLIT_IDS)
def split(request):
    """The bundled model split over ndev processes; shared by the tests of this module that leave it usable."""
    ndev, experts = request.param
    model = Qwen3MoeForCausalLM(backend="numpy", ndev=ndev, experts=experts)
    yield model
    model.destroy_model_instance()


def test_greedy_generation_matches_one_device(split, reference):
    text, tokens = greedy(split)
    assert tokens == reference["tokens"]
    assert text == reference["text"]


def test_all_logits_match_one_device(split, reference):
    logits = all_logits(split, reference["logit_ids"])
    assert relative_error(logits, reference["logits"]) < 1e-4


def test_batch_rounds_match_one_device(split, reference):
    assert batch_tokens(split) == reference["batch"]


def test_perplexity_matches_one_device(split, reference):
    assert split.perplexity([heldout_text()], window=128) == pytest.approx(reference["perplexity"], rel=1e-6)


def test_router_stats_and_rank_loads(split, reference, capsys):
    split.reset_router_stats()
    greedy(split)
    assert list(split.router_stats.counts) == list(reference["counts"])
    for layer, counts in reference["counts"].items():
        np.testing.assert_array_equal(split.router_stats.counts[layer], counts)
    assert split.router_stats.tokens == reference["routed"]

    ndev, experts = split._ranks.ndev, split._ranks.rank.plan.experts
    loads = split.get_rank_loads()
    assert sorted(loads) == sorted(reference["counts"])
    for layer, counts in reference["counts"].items():
        slots = np.asarray(loads[layer].slots)
        assert slots.shape == (ndev,)
        if experts == "ep":  # 16 experts in ndev contiguous blocks: each rank did the picks of its block
            assert slots.tolist() == [int(b.sum()) for b in np.split(counts, ndev)]
            assert slots.sum() == counts.sum()
        else:  # every rank computed its slice of every pick
            assert slots.tolist() == [int(counts.sum())] * ndev
        assert np.asarray(loads[layer].work).sum() == pytest.approx(counts.sum())

    split.print_router_stats()
    out = capsys.readouterr().out
    assert "expert work per rank" in out
    assert f"rank {ndev - 1}" in out and f"rank {ndev}" not in out


def test_a_request_that_does_not_fit_leaves_the_model_usable(split, reference):
    cache = Qwen3MoeKVCache(split, max_tokens=4)
    with pytest.raises(ValueError, match="does not fit"):
        split.forward([Request(list(range(10, 16)), 0, cache)])
    with pytest.raises(ValueError, match="does not fit"):
        split.forward([Request([1, 2], 3, cache)])
    assert greedy(split)[1] == reference["tokens"]


def test_a_plain_kv_cache_is_refused_and_the_model_stays_usable(split, reference):
    plain = KVCache(split.shard_config, 8)
    with pytest.raises(ValueError, match="Qwen3MoeKVCache"):
        split.forward([Request([1, 2, 3], 0, plain)])
    task = Qwen3MoeInferTask([1, 2, 3], temperature=0)
    task.bind_kvcache(plain)
    with pytest.raises(ValueError, match="Qwen3MoeKVCache"):
        split.batch_infer_one_round([task])
    assert greedy(split)[1] == reference["tokens"]


# ---- 3. failures ---------------------------------------------------------------------------------------------------


@pytest.fixture
def make_split():
    """``make(ndev=2, experts="ep")``: a split model of its own, for a test that breaks it; destroyed afterwards."""
    made = []

    def make(ndev=2, experts="ep"):
        made.append(Qwen3MoeForCausalLM(backend="numpy", ndev=ndev, experts=experts))
        return made[-1]

    yield make
    for m in made:
        m.destroy_model_instance()


@pytest.fixture
def popens(monkeypatch):
    """Every process started through subprocess.Popen during the test."""
    started = []
    real = subprocess.Popen

    class Recording(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            started.append(self)

    monkeypatch.setattr(subprocess, "Popen", Recording)
    return started


def wait_until_exited(pid: int) -> None:
    """Block until ``pid`` has exited, leaving it unreaped (its Popen still gets the exit status)."""
    os.waitid(os.P_PID, pid, os.WEXITED | os.WNOWAIT)


def assert_keeps_refusing(model) -> None:
    for call in (lambda: model.generate(PROMPT, max_steps=2, temperature=0),
                 lambda: model.forward([Request([1, 2], 0, Qwen3MoeKVCache(model, max_tokens=4))]),
                 lambda: model.perplexity(["to be or not"], window=4)):
        with pytest.raises(RankFailure, match="rank 1"):
            call()


def test_a_killed_worker_stops_the_group(make_split):
    model = make_split(ndev=2)
    pid = model._ranks.procs[1].pid
    os.kill(pid, signal.SIGKILL)
    wait_until_exited(pid)
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        model.generate(PROMPT, max_steps=8, temperature=0)
    assert time.monotonic() - start < 5
    assert "rank 1" in str(failure.value) and "signal 9" in str(failure.value)
    assert_keeps_refusing(model)


class KillingLink:
    """Rank 0's socket to rank 1, except that rank 1 is killed (and has exited) just before rank 0 writes it the
    header of a forward step: a worker that dies between rank 0's check and the step."""

    def __init__(self, link, pid: int):
        self.link, self.pid, self.armed = link, pid, True

    def __getattr__(self, name):
        return getattr(self.link, name)

    def fileno(self):
        return self.link.fileno()

    def sendall(self, data):
        if self.armed and b'"op": "forward"' in bytes(data):
            self.armed = False
            os.kill(self.pid, signal.SIGKILL)
            wait_until_exited(self.pid)
        return self.link.sendall(data)


def kill_while_sending_a_step(model) -> None:
    model._ranks.links[1] = KillingLink(model._ranks.links[1], model._ranks.procs[1].pid)


def test_a_worker_that_dies_as_a_step_is_sent_stops_the_group(make_split):
    model = make_split(ndev=2)
    kill_while_sending_a_step(model)
    start = time.monotonic()
    with pytest.raises(RankFailure, match="rank 1"):
        model.generate(PROMPT, max_steps=8, temperature=0)
    assert time.monotonic() - start < 5
    assert_keeps_refusing(model)


def test_a_worker_that_dies_as_a_step_is_sent_is_reported_with_its_signal(make_split):
    model = make_split(ndev=2)
    kill_while_sending_a_step(model)
    with pytest.raises(RankFailure, match="signal 9"):
        model.generate(PROMPT, max_steps=8, temperature=0)


def wait_for_a_whole_message(link: socket.socket, timeout: float = 10) -> None:
    """Block until a whole message (length, header and arrays) waits unread on ``link``; consume nothing."""
    deadline = time.monotonic() + timeout
    while True:
        waiting = struct.unpack("i", fcntl.ioctl(link.fileno(), termios.FIONREAD, b"\0" * 4))[0]
        if waiting >= messages.LENGTH.size:
            (n,) = messages.LENGTH.unpack(link.recv(messages.LENGTH.size, socket.MSG_PEEK))
            if waiting >= messages.LENGTH.size + n:
                header = json.loads(link.recv(messages.LENGTH.size + n, socket.MSG_PEEK)[messages.LENGTH.size:])
                size = sum(np.dtype(d).itemsize * math.prod(shape) for d, shape in header["arrays"])
                if waiting >= messages.LENGTH.size + n + size:
                    return
        assert time.monotonic() < deadline, "no whole message came"
        time.sleep(0.001)


TCP_CLOSE = 7  # tcp_info.tcpi_state of a connection the peer has reset (linux/tcp_states.h)


class KillRankOneAfterItsPart:
    """Rank 0's block operations, except that before the attention of ``layer`` it waits until rank 1 has sent its
    part of that all-reduce (all of it), then kills rank 1: a worker that dies while it waits for the sum.

    A byte written to the dead rank makes its side of the connection answer with a reset, and the wrapper waits until
    the reset has arrived, so that rank 0 meets the broken connection when it sends the sum (as it does when the
    reset arrives first by chance), not only at the next receive."""

    def __init__(self, ops, model, layer: int):
        self.ops, self.model, self.layer = ops, model, layer

    def __getattr__(self, name):
        return getattr(self.ops, name)

    def attention_block(self, s, i, *args):
        if i == self.layer:
            link = self.model._ranks.links[1]
            wait_for_a_whole_message(link)
            pid = self.model._ranks.procs[1].pid
            os.kill(pid, signal.SIGKILL)
            wait_until_exited(pid)
            link.send(b"\0")  # nobody reads it: rank 1 is gone
            deadline = time.monotonic() + 5
            while link.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 8)[0] != TCP_CLOSE:
                assert time.monotonic() < deadline, "no reset from the dead rank"
                time.sleep(0.001)
        return self.ops.attention_block(s, i, *args)


def test_a_worker_that_dies_waiting_for_the_sum_stops_the_group(make_split):
    model = make_split(ndev=2)
    model._ops.ops = KillRankOneAfterItsPart(model._ops.ops, model, layer=2)
    with pytest.raises(RankFailure, match="rank 1"):
        model.generate(PROMPT, max_steps=8, temperature=0)


def test_a_worker_that_cannot_start_fails_the_constructor(monkeypatch, popens):
    monkeypatch.setattr(ranks, "WORKER_COMMAND",
                        [sys.executable, "-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"])
    start = time.monotonic()
    with pytest.raises(RankFailure) as failure:
        Qwen3MoeForCausalLM(backend="numpy", ndev=2)
    assert time.monotonic() - start < 10
    message = str(failure.value)
    assert "rank 1" in message and "exited with code 3" in message and "boom" in message
    assert len(popens) == 1 and popens[0].poll() == 3


def test_destroy_ends_every_worker(make_split):
    model = make_split(ndev=4, experts="etp")
    procs = list(model._ranks.procs.values())
    assert len(procs) == 3 and all(p.poll() is None for p in procs)
    model.destroy_model_instance()
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(RuntimeError):
        model.generate(PROMPT, max_steps=2, temperature=0)
    with pytest.raises(RuntimeError):
        model.forward([Request([1], 0, KVCache(model.shard_config, 2))])


def test_three_ranks_are_refused_before_any_process_starts(popens):
    with pytest.raises(UnsupportedConfigError, match="ndev=3"):
        Qwen3MoeForCausalLM(backend="numpy", ndev=3)
    assert popens == []


def test_numba_cannot_split(popens):
    with pytest.raises(DeviceError, match="numba"):
        Qwen3MoeForCausalLM(backend="numba", ndev=2)
    assert popens == []


def test_an_unknown_token_leaves_the_model_usable(make_split, reference):
    model = make_split(ndev=2)
    vocab = reference["config"].vocab_size
    with pytest.raises((ValueError, IndexError)):
        model.forward([Request([1, vocab], 0, Qwen3MoeKVCache(model, max_tokens=4))])
    assert greedy(model)[1] == reference["tokens"]


def test_a_cache_of_another_split_model_is_refused(make_split):
    a, b = make_split(ndev=2), make_split(ndev=2)
    theirs = Qwen3MoeKVCache(a, max_tokens=8)
    ours = Qwen3MoeKVCache(b, max_tokens=8)  # b's own cache: the same rank id, on b's workers
    assert ours.capacity == theirs.capacity
    with pytest.raises(ValueError):
        b.forward([Request([7, 8, 9], 0, theirs)])


# ---- 4. ranks started by a launcher --------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_launcher_started_ranks(monkeypatch, reference, tmp_path):
    port = free_port()
    launch = dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    log = tmp_path / "rank1.log"
    with open(log, "wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "qwen3moe", "generate", "--cpu", "anything"], cwd=REPO,
                                  env=dict(os.environ, RANK="1", LOCAL_RANK="1", **launch), stdin=subprocess.DEVNULL,
                                  stdout=out, stderr=subprocess.STDOUT)
    try:
        monkeypatch.setattr(ranks, "START_TIMEOUT_S", 30)  # a worker that never connects fails the test, not hangs
        for name, value in dict(launch, RANK="0", LOCAL_RANK="0").items():
            monkeypatch.setenv(name, value)
        model = Qwen3MoeForCausalLM(backend="numpy", ndev=2)
        try:
            assert model._ranks.procs == {}  # rank 0 started nobody
            assert greedy(model)[1] == reference["tokens"]
        finally:
            model.destroy_model_instance()
        assert worker.wait(timeout=10) == 0, log.read_text(errors="replace")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()


@pytest.fixture
def atexit_calls(monkeypatch):
    """Functions registered with atexit during the test, kept here instead (not run at the end of the session)."""
    calls = []
    monkeypatch.setattr(atexit, "register", lambda f, *a, **k: calls.append((f, a, k)) or f)
    return calls


def test_a_launcher_with_another_world_size_is_refused(monkeypatch, popens, atexit_calls):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RankFailure, match="WORLD_SIZE=3"):
        Qwen3MoeForCausalLM(backend="numpy", ndev=2)
    assert popens == []


def test_a_refused_launch_leaves_nothing_failing_at_exit(monkeypatch, atexit_calls):
    monkeypatch.setenv("WORLD_SIZE", "3")
    with pytest.raises(RankFailure):
        Qwen3MoeForCausalLM(backend="numpy", ndev=2)
    for f, args, kwargs in atexit_calls:
        f(*args, **kwargs)


# ---- 5. message framing --------------------------------------------------------------------------------------------


@pytest.fixture
def pair():
    a, b = socket.socketpair()
    yield a, b
    a.close()
    b.close()


def test_messages_round_trip(pair, rng):
    a, b = pair
    arrays = [rng.standard_normal((3, 5)).astype(np.float32),
              rng.standard_normal((4, 2)).T,  # float64, not contiguous
              rng.integers(-10**12, 10**12, 7),  # int64
              rng.integers(0, 255, (2, 2, 2)).astype(np.uint8),
              rng.integers(-100, 100, 5).astype(np.int8),
              rng.standard_normal(3).astype(np.float16),
              rng.standard_normal(4).astype(">f4"),  # big-endian
              np.array([True, False, True])]
    header = {"op": "forward", "requests": [{"tokens": [1, 2, 3], "pos": 0}], "text": "ünïcode", "none": None}
    messages.send(a, header, arrays)
    messages.send(a, {"op": "stop"})
    got, received = messages.recv(b)
    assert got == header
    assert len(received) == len(arrays)
    for sent, back in zip(arrays, received):
        assert back.dtype == sent.dtype and back.shape == sent.shape
        np.testing.assert_array_equal(back, sent)
    assert messages.recv(b) == ({"op": "stop"}, [])


def test_a_received_object_array_is_refused(pair):
    """An object array's bytes are pointers: the receiving side refuses it (and never unpickles anything)."""
    a, b = pair
    meta = b'{"op": "part", "arrays": [["|O", [2]]]}'
    a.sendall(messages.LENGTH.pack(len(meta)) + meta + bytes(16))
    with pytest.raises(ValueError, match="only numbers"):
        messages.recv(b)
    c, d = socket.socketpair()  # (the refused message's payload is left unread on the first stream)
    with c, d:
        try:  # whatever send makes of an object array, the peer refuses it too
            messages.send(c, {"op": "part"}, [np.array([{"x": 1}, None], dtype=object)])
        except (ValueError, TypeError):
            return
        with pytest.raises(ValueError, match="only numbers"):
            messages.recv(d)


def test_an_object_array_is_refused_before_anything_is_sent(pair):
    a, b = pair
    with pytest.raises((ValueError, TypeError)):
        messages.send(a, {"op": "part"}, [np.array([{"x": 1}, None], dtype=object)])
    b.setblocking(False)
    with pytest.raises(BlockingIOError):
        b.recv(1)


@pytest.mark.parametrize("array", [np.full((), 2.5, dtype=np.float32), np.zeros((3, 0), dtype=np.float32)],
                         ids=["0-d", "empty"])
def test_scalars_and_empty_arrays_round_trip(pair, array):
    a, b = pair
    messages.send(a, {"op": "part"}, [array])
    _, (back,) = messages.recv(b)
    assert back.shape == array.shape and back.dtype == array.dtype


def test_closed_sees_the_peer_go_without_consuming_data(pair):
    a, b = pair
    assert not messages.closed(b)  # nothing pending, peer open: no wait, no
    messages.send(a, {"op": "part"}, [np.arange(3)])
    assert not messages.closed(b)  # pending data is not a close
    header, (data,) = messages.recv(b)  # and closed() consumed none of it
    assert header == {"op": "part"} and data.tolist() == [0, 1, 2]
    assert b.gettimeout() is None  # left blocking
    a.close()
    assert messages.closed(b)
    with pytest.raises(ConnectionError):
        messages.recv(b)


def test_a_message_cut_short_is_a_connection_error(pair):
    a, b = pair
    meta = b'{"op": "part", "arrays": [["<f4", [4]]]}'
    a.sendall(messages.LENGTH.pack(len(meta)) + meta + bytes(7))  # 16 bytes announced, 7 sent
    a.close()
    with pytest.raises(ConnectionError):
        messages.recv(b)
