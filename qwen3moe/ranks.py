"""Ranks: a model split over ``ndev`` devices runs as ``ndev`` processes, one per device, rank 0 driving the others.

Rank 0 is the user's process (``Qwen3MoeForCausalLM(..., ndev=N)``). It listens at MASTER_ADDR:MASTER_PORT (by
default 127.0.0.1 and a free port), starts ranks 1..N-1 as ``python -m qwen3moe`` processes on this machine,
and waits for each to say hello. Where a launcher starts every rank itself (torchrun, mpirun, srun, or one launch per
host), RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT come from the environment: rank 0 then starts
nobody, and every other rank runs ``python -m qwen3moe`` (any command: with RANK > 0 it serves as that rank).
LOCAL_RANK picks the rank's GPU.

Rank 0 sends every rank the same plan (the model's config, the expert placement, how to load), and each rank loads
only its own part of the weights (``sharding.shard_weights``). Then rank 0 sends each step -- the requests of a
forward pass, a KV cache to open or drop, a decoder step -- and every rank runs the same model loop
(``model.forward``) on its part; the backend's communicator (``Backend.comm``) adds the ranks' activations up
(all-reduce) and joins their logits (all-gather) inside the loop (``ShardedOps``).

Failure: a rank that reports an error, closes its connection or exits stops the whole group; rank 0 raises a
``RankFailure`` that names the rank and the cause. Rank 0 checks while it waits for a step, so nothing hangs, and the
other ranks exit when rank 0 goes. Messages carry JSON and numbers only (``messages.py``).
"""

import atexit
import dataclasses
import importlib
import os
import select
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import weakref
from typing import NoReturn

from tqdm import tqdm

from . import backends, messages
from .config import Qwen3MoeConfig
from .debug import Debugger
from .errors import RankFailure, fits_in_memory, size
from .layers import RoutingOverride
from .model import KVCache, Request, check_requests, forward
from .router_stats import RouterStats
from .sharding import RankShard, plan_sharding, rank_config, shard_weights
from .weights import Qwen3MoeWeights, load_weights

START_TIMEOUT_S = float(os.environ.get("QWEN3MOE_RANK_TIMEOUT", 120))  # to connect, and to load the weights
WORKER_COMMAND = [sys.executable, "-m", "qwen3moe"]  # how rank 0 starts the other ranks (RANK > 0 in their environment)


class ShardedOps:
    """A backend's block operations on one rank's part of the model, made whole by the communicator.

    The blocks of a rank return its part of the update (rank 0's also carries the residual), and one all-reduce
    adds them: the hidden state is whole again on every rank. lm_head gives each rank its rows of the vocabulary,
    and an all-gather joins them; only rank 0 keeps the logits, as only rank 0 samples.
    """

    def __init__(self, ops, comm, rank: int, vocab_size: int):
        self.ops, self.comm, self.rank, self.vocab_size = ops, comm, rank, vocab_size
        self.xp = ops.xp

    def embed(self, s, token_ids):
        return self.ops.embed(s, token_ids)

    def attention_block(self, s, i, x, cos, sin, segments):
        return self.comm.all_reduce(self.ops.attention_block(s, i, x, cos, sin, segments))

    def feed_forward_block(self, s, i, x, top_k, disabled):
        y, routing = self.ops.feed_forward_block(s, i, x, top_k, disabled)
        self.comm.all_reduce(y)
        self.comm.wait()  # the routing is read on the host next: never wait on the device without watching the ranks
        return y, routing

    def final_logits(self, s, x):
        logits = self.comm.all_gather(self.ops.final_logits(s, x), self.vocab_size)  # (T, V)
        self.comm.wait()
        return logits if self.rank == 0 else logits[:, :0]


class Rank:
    """One rank's part of the model and the state it keeps between steps: KV caches by id, a whole-step decoder."""

    def __init__(self, spec: dict, rank: int, links: dict[int, socket.socket], fail, alive,
                 weights: Qwen3MoeWeights | None = None):
        """``weights``: the whole model's weights where this process has them open already (rank 0), else None."""
        self.spec, self.rank, self.links, self.fail, self.alive = spec, rank, links, fail, alive
        self.weights = weights
        self.config = Qwen3MoeConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in spec["config"].items()})
        self.plan = plan_sharding(self.config, spec["ndev"], spec["experts"])
        self.shard: RankShard = self.plan.ranks[rank]
        self.shard_config = rank_config(self.plan, rank)
        self.ops = backends.load(spec["backend"])  # until connect() wraps it in ShardedOps
        module, function = spec["loader"].split(":")
        self.state = getattr(importlib.import_module(module), function)(spec, self, self.ops)
        self.comm_module = importlib.import_module(backends.BACKENDS[spec["backend"]].comm)
        self.caches: dict[int, KVCache] = {}
        self.decoder = None

    def connect(self) -> None:
        """Join the communicator (a collective call: every rank makes it at the same time)."""
        comm = self.comm_module.connect(self.rank, self.spec["ndev"], self.spec["comm_id"], self.links, self.fail,
                                        self.alive)
        self.ops = ShardedOps(self.ops, comm, self.rank, self.config.vocab_size)

    def new_cache(self, capacity: int) -> KVCache:
        return KVCache(self.shard_config, capacity, xp=self.ops.xp)

    def forward(self, requests: list[Request], all_logits: bool, override: RoutingOverride | None,
                stats: RouterStats | None, debug: Debugger) -> list:
        return forward(self.ops, self.state, self.config, requests, stats, debug, all_logits, override)

    def start_decoder(self, caches: list[KVCache], positions: list[int], tokens: list[int], sampling: list | None):
        self.decoder = self.ops.ops.BatchDecoder(self.state, caches, positions, tokens, sampling, comm=self.ops.comm)
        return self.decoder

    def time_all_reduces(self, rows: int, count: int, reps: int) -> float:
        """Seconds that ``count`` all-reduces of a (rows, hidden_size) hidden state take, alone (benchmarks)."""
        return self.ops.comm.time_all_reduces(rows, self.config.hidden_size, count, reps)

    def serve(self, header: dict) -> None:
        """Run one step that rank 0 sent (on ranks 1..N-1)."""
        for cache_id in header.get("drop", []):
            self.caches.pop(cache_id, None)
        if header["op"] not in STEPS:
            raise ValueError(f"unknown step {header['op']!r} from rank 0")
        STEPS[header["op"]](self, header)

    def _open_cache(self, h: dict) -> None:
        self.caches[h["id"]] = self.new_cache(h["capacity"])

    def _forward(self, h: dict) -> None:
        requests = [Request(r["tokens"], r["pos"], self.caches[r["cache"]]) for r in h["requests"]]
        self.forward(requests, h["all_logits"], override_from_json(h["override"]), None, Debugger(enabled=False))


STEPS = {  # what rank 0 can ask the other ranks to do, by the name in its message
    "open_cache": Rank._open_cache,
    "forward": Rank._forward,
    "decoder": lambda rank, h: rank.start_decoder(  # rank 0 draws the uniform numbers: no generators here
        [rank.caches[i] for i in h["caches"]], h["positions"], h["tokens"],
        h["sampling"] and [(*row, None) for row in h["sampling"]]),
    "step": lambda rank, h: rank.decoder.step(),
    "time_all_reduces": lambda rank, h: rank.time_all_reduces(h["rows"], h["count"], h["reps"]),
}


def load_folder(spec: dict, rank: Rank, ops):
    """The rank's part of the Hugging Face folder ``spec["model_dir"]`` (memory-mapped: only that part is read),
    prepared with ``spec["options"]`` (backends.prepare_options)."""
    weights = rank.weights or load_weights(spec["model_dir"], rank.config)
    part = shard_weights(weights, rank.plan, rank.rank)
    with fits_in_memory(f"rank {rank.rank}'s part of the weights ({size(sum(a.nbytes for a in part.arrays()))}) "
                        "does not fit", "split the model over more devices (ndev)"):
        return ops.prepare(part, rank.shard_config, rank.shard, **spec.get("options", {}))


# ---- rank 0 ----------------------------------------------------------------------------------------------------------

class RankGroup:
    """Rank 0's side: the other ranks' processes and connections, and its own ``Rank``."""

    def __init__(self, ndev: int, backend: str, config: Qwen3MoeConfig, experts: str, loader: str,
                 weights: Qwen3MoeWeights | None = None, **load_args):
        """``loader``: "module:function" every rank calls to make its part; ``weights``: rank 0's open checkpoint,
        if it has one (the loader uses it instead of opening the folder again); ``load_args`` go to every rank."""
        plan_sharding(config, ndev, experts)  # refuses a split that cannot work, before any process starts
        comm_module = importlib.import_module(backends.BACKENDS[backend].comm)
        self.ndev, self.procs, self.links, self.logs = ndev, {}, {}, {}
        self.failure: str | None = None
        self.teardown = threading.Event()
        self.dropped: list[int] = []
        self.next_cache_id = 0
        self.vocab_size = config.vocab_size
        launched = "WORLD_SIZE" in os.environ
        if launched and int(os.environ["WORLD_SIZE"]) != ndev:
            raise RankFailure(f"ndev={ndev} but the launcher started WORLD_SIZE={os.environ['WORLD_SIZE']} ranks; "
                              "ask for as many devices as ranks")
        host = os.environ.get("MASTER_ADDR", "127.0.0.1")
        self.server = socket.create_server(("" if launched else host, int(os.environ.get("MASTER_PORT", 0))))
        self.closed = False
        atexit.register(self.close)
        spec = dict(load_args, config=dataclasses.asdict(config), ndev=ndev, experts=experts, backend=backend,
                    loader=loader, comm_id=comm_module.new_id())
        try:
            if not launched:
                for r in range(1, ndev):
                    self._spawn(r, host, self.server.getsockname()[1])
            self._accept()
            for link in self.links.values():
                messages.send(link, dict(op="load", **spec))
            comm_module.bind_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.rank = Rank(spec, 0, self.links, self._fail, self.check, weights)
            self._await_loaded()
            for link in self.links.values():
                messages.send(link, {"op": "connect"})
            self.rank.connect()
            threading.Thread(target=_abort_when_set, args=(self.teardown, self.rank.ops.comm), daemon=True,
                             name="qwen3moe-comm-teardown").start()
        except BaseException:
            self.close()
            raise

    # -- steps
    def send(self, op: str, **fields) -> None:
        """Tell every other rank to run a step (rank 0 then runs it too)."""
        self.check()
        header = dict(fields, op=op, drop=self.dropped)
        self.dropped = []
        for r, link in self.links.items():
            try:
                messages.send(link, header)
            except OSError:
                self._fail(r)

    def open_cache(self, cache: KVCache) -> None:
        """Give ``cache`` (rank 0's part of it) an id and open the other ranks' parts; they are dropped with it."""
        cache.rank_id, self.next_cache_id = self.next_cache_id, self.next_cache_id + 1
        cache.rank_group = self  # ids are this group's: another model's ranks must not take it
        self.send("open_cache", id=cache.rank_id, capacity=cache.capacity)
        weakref.finalize(cache, self.dropped.append, cache.rank_id)

    def forward(self, requests: list[Request], all_logits: bool, override: RoutingOverride | None,
                stats: RouterStats, debug: Debugger) -> list:
        check_requests(requests, self.vocab_size)  # a request refused here leaves the group untouched
        for r in requests:
            if getattr(r.cache, "rank_group", None) is not self:
                raise ValueError("a model split over ranks needs KV caches made by Qwen3MoeKVCache(model) for this "
                                 "very model")
        self.send("forward", requests=[dict(tokens=[int(t) for t in r.tokens], pos=int(r.pos), cache=r.cache.rank_id)
                                       for r in requests], all_logits=all_logits, override=override_to_json(override))
        return self._guarded(self.rank.forward, requests, all_logits, override, stats, debug)

    def greedy_decoder(self, cache: KVCache, pos: int, token: int) -> "GroupDecoder":
        """Greedy decoding of one sequence in whole steps: its ``step()`` returns one token."""
        return self.batch_decoder([cache], [pos], [token], one=True)

    def batch_decoder(self, caches: list[KVCache], positions: list[int], tokens: list[int],
                      sampling: list | None = None, one: bool = False) -> "GroupDecoder":
        """Decoding of several sequences in whole steps (every rank's ``BatchDecoder``): ``step()`` returns a token
        per sequence (one: an int). ``sampling``: None (greedy) or per sequence (temperature, topk, topp, rng); only
        rank 0 draws from the generators, and its numbers reach the other ranks inside the step."""
        settings = sampling and [[float(t), int(k), float(p)] for t, k, p, _ in sampling]
        self.send("decoder", caches=[c.rank_id for c in caches], positions=[int(p) for p in positions],
                  tokens=[int(t) for t in tokens], sampling=settings)
        return GroupDecoder(self, self._guarded(self.rank.start_decoder, caches, positions, tokens, sampling), one)

    @property
    def can_decode_in_whole_steps(self) -> bool:
        ops = self.rank.ops.ops
        return getattr(getattr(ops, "BatchDecoder", None), "SHARDS", False)

    def _guarded(self, run, *args):
        """Run rank 0's part of a step; if it fails half-way the other ranks are left inside it, so stop them all."""
        try:
            return run(*args)
        except RankFailure:
            raise
        except BaseException as e:
            self.failure = f"rank 0 failed in the middle of a step ({type(e).__name__}: {e})"
            self.close()
            raise

    # -- failures
    def check(self) -> None:
        """Raise RankFailure if a rank has failed: it sent an error, closed its connection or exited."""
        if self.failure:
            raise RankFailure(f"the group of {self.ndev} ranks has stopped: {self.failure}; create the model again")
        for r, p in self.procs.items():
            if p.poll() is not None:
                self._fail(r)
        ready = select.select(list(self.links.values()), [], [], 0)[0]
        for r, link in self.links.items():
            if link in ready:
                if messages.closed(link):
                    self._fail(r)
                header, _ = messages.recv(link)
                self._fail(r, header.get("error", f"it sent {header.get('op')!r} unasked"))

    def _fail(self, rank: int, cause: str | None = None):
        """Stop the group because of rank ``rank``; ``cause`` None: its connection broke (we say how it ended)."""
        cause = cause or self._gone(rank) + self._log_tail(rank)
        if not self.failure:
            self.failure = f"rank {rank} failed: {cause}"
        self.close()
        raise RankFailure(f"the group of {self.ndev} ranks has stopped: {self.failure}")

    # -- start and stop
    def _spawn(self, r: int, host: str, port: int) -> None:
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(self.ndev), LOCAL_RANK=str(r), MASTER_ADDR=host,
                   MASTER_PORT=str(port))
        self.logs[r] = tempfile.TemporaryFile()
        self.procs[r] = subprocess.Popen(WORKER_COMMAND, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=self.logs[r])

    def _accept(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        self.server.settimeout(0.1)
        while len(self.links) < self.ndev - 1:
            self.check()
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.ndev)) - set(self.links))
                raise RankFailure(f"ranks {missing} did not connect to {self.server.getsockname()} within "
                                  f"{START_TIMEOUT_S:.0f} s (QWEN3MOE_RANK_TIMEOUT); were they started?")
            try:
                link, _ = self.server.accept()
            except TimeoutError:
                continue
            link.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # small messages go at once
            link.settimeout(START_TIMEOUT_S)
            header, _ = messages.recv(link)
            link.settimeout(None)
            if header.get("ndev") != self.ndev or not 0 < header.get("rank", -1) < self.ndev:
                link.close()
                raise RankFailure(f"a process joined as rank {header.get('rank')} of {header.get('ndev')}, but this "
                                  f"group has {self.ndev} ranks; check RANK and WORLD_SIZE")
            self.links[header["rank"]] = link

    def _await_loaded(self) -> None:
        waiting = set(self.links)
        with tqdm(total=self.ndev, desc="ranks loaded", unit="rank", file=sys.stderr, initial=1) as bar:
            while waiting:
                for p_rank, p in self.procs.items():
                    if p.poll() is not None:
                        self._fail(p_rank)
                ready = select.select([self.links[r] for r in waiting], [], [], 0.2)[0]
                for r in [r for r in waiting if self.links[r] in ready]:
                    try:
                        header, _ = messages.recv(self.links[r])
                    except ConnectionError:
                        self._fail(r)
                    if header["op"] != "loaded":
                        self._fail(r, header.get("error", f"it sent {header['op']!r} instead of loading"))
                    waiting.discard(r)
                    bar.update()

    def _gone(self, r: int) -> str:
        """Why rank r's connection broke: how its process ended, if this rank started it (it may take a moment
        to be reaped), else that the connection closed."""
        if r in self.procs:
            try:
                return _exit_cause(self.procs[r].wait(timeout=1))
            except subprocess.TimeoutExpired:
                pass
        return "its connection closed"

    def _log_tail(self, r: int) -> str:
        log = self.logs.get(r)
        if log is None:
            return ""
        log.seek(0)
        lines = [l for l in log.read().decode(errors="replace").splitlines() if l.strip()]
        return f"; its last output: {' | '.join(lines[-3:])}" if lines else ""

    def close(self) -> None:
        """Stop every rank: ask the others to exit, end the processes this rank started, and let the teardown
        thread drop this rank's communicator. Runs at exit too, for a program that never destroys its model."""
        if self.closed:
            return
        self.closed = True
        atexit.unregister(self.close)
        for link in self.links.values():
            try:
                messages.send(link, {"op": "stop"})
            except OSError:
                pass
        self.teardown.set()
        deadline = time.monotonic() + 5
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for link in self.links.values():
            link.close()
        self.server.close()
        self.links = {}
        self.failure = self.failure or "the model was destroyed"


class GroupDecoder:
    """Rank 0's decoder of a split model: each step, every rank replays its captured step in lockstep."""

    def __init__(self, group: RankGroup, local, one: bool):
        self.group, self.local, self.one = group, local, one  # one: a single sequence, step() returns an int

    def step(self) -> int | list[int]:
        self.group.send("step")
        tokens = self.group._guarded(self.local.step)
        return tokens[0] if self.one else tokens

    def flush_stats(self, stats: RouterStats) -> None:
        self.local.flush_stats(stats)  # every rank routed the same tokens the same way: rank 0's counts are all


def _abort_when_set(closed: threading.Event, comm) -> None:
    """Hold a communicator until its group closes, then abort it, off the main thread: NCCL's teardown can wait for
    ranks that have exited and must never hang the program (nor run from a destructor at exit). Aborting also ends
    work still waiting on a rank that has gone."""
    closed.wait()
    comm.abort()


def _exit_cause(code: int) -> str:
    return f"its process was killed by signal {-code}" if code < 0 else f"its process exited with code {code}"


def override_to_json(o: RoutingOverride | None) -> dict | None:
    return None if o is None else {"top_k": o.top_k, "disabled": {str(k): sorted(v) for k, v in o.disabled.items()}}


def override_from_json(d: dict | None) -> RoutingOverride | None:
    return None if d is None else RoutingOverride(d["top_k"], {int(k): frozenset(v) for k, v in d["disabled"].items()})


# ---- ranks 1..N-1 ----------------------------------------------------------------------------------------------------

def serve() -> NoReturn:
    """The life of a rank other than 0: connect, load its part, run the steps rank 0 sends until it says stop. The
    process then ends from inside this function (``_end``), while everything the rank made is still referenced:
    returning would destroy its objects first, and an NCCL communicator's destructor waits for ranks that have
    already gone (seen as a rank that never exited after a launcher-started run)."""
    rank, ndev = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    address = (os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ["MASTER_PORT"]))
    link = _connect(address)
    messages.send(link, {"op": "hello", "rank": rank, "ndev": ndev})
    links = {0: link}

    def fail(r: int, cause: str | None):
        raise RankFailure(f"rank {r} failed: {cause or 'its connection broke'}")

    def alive() -> None:
        if messages.closed(link):
            raise RankFailure("rank 0 has gone")

    try:
        spec, _ = messages.recv(link)
        if spec["op"] == "stop":
            _end(0)
        importlib.import_module(backends.BACKENDS[spec["backend"]].comm).bind_device(
            int(os.environ.get("LOCAL_RANK", rank)))
        me = Rank(spec, rank, links, fail, alive)
        messages.send(link, {"op": "loaded"})
        while True:
            header, _ = messages.recv(link)
            if header["op"] == "stop":
                _end(0)
            if header["op"] == "connect":
                me.connect()
            else:
                me.serve(header)
    except (ConnectionError, RankFailure):
        _end(1)  # rank 0 has gone, or stopped the group: nothing left to do
    except BaseException as e:
        print(traceback.format_exc(), file=sys.stderr)
        try:
            messages.send(link, {"op": "error", "error": f"{type(e).__name__}: {e}"})
        except OSError:
            pass
        _end(1)


def _end(code: int) -> NoReturn:
    """End this process now, without tearing anything down: the driver frees what it held."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _connect(address: tuple[str, int]) -> socket.socket:
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            link = socket.create_connection(address, timeout=None)
            link.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return link
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)

