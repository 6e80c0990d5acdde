"""The sharding plan: which part of every weight each of ``ndev`` GPUs holds, and what they exchange per token.

``plan_sharding`` makes the plan (pure Python, no GPU) and ``shard_weights`` cuts one rank's part out of a model's
weights; ``ranks.py`` runs the ranks. The split is tensor parallelism as in the user guide's multi-device section,
with a choice for the experts:

* attention by heads: each rank computes ``num_attention_heads / ndev`` query heads and holds the kv heads they read
  (``num_key_value_heads / ndev`` of them; when ndev > num_key_value_heads, one kv head, copied onto
  ``ndev / num_key_value_heads`` ranks); q/k/v_proj are split by rows and o_proj by columns;
* dense MLP layers by ``intermediate_size`` (gate/up_proj by rows, down_proj by columns);
* experts either whole, ``"ep"`` (expert parallelism: ``ceil(num_experts / ndev)`` contiguous experts per rank, the
  guide's partition; the last rank may hold fewer), or sliced, ``"etp"`` (expert tensor parallelism: every expert
  split along ``moe_intermediate_size``);
* lm_head by vocabulary (``ceil(vocab_size / ndev)`` contiguous rows); embed_tokens, the norms and the router are
  replicated.

Every block above ends in a partial sum on each rank, so one all-reduce after attention and one after the MLP/MoE
block make the hidden state whole again on every rank: 2 per layer and token. Since every rank then holds every
token's hidden state, expert parallelism needs no all-to-all: a rank runs its own experts on the tokens routed to
them and the same all-reduce adds the results. The sampling step is the one other exchange: each rank scores its
vocabulary rows and the ranks reduce their best candidates (greedy: the best logit and its id) to one token.

``rank_loads`` turns router counts into the expert work each rank did, and how uneven it was across ranks.
"""

import dataclasses
from dataclasses import dataclass

import numpy as np

from .config import Qwen3MoeConfig
from .errors import UnsupportedConfigError
from .weights import MLP, Attention, DecoderLayer, Qwen3MoeWeights, SparseMoeBlock

PLACEMENTS = {"ep": "expert parallelism: whole experts per rank",
              "etp": "expert tensor parallelism: a slice of moe_intermediate_size of every expert per rank"}
PARTS = ("q_heads", "kv_heads", "mlp_rows", "experts", "vocab_rows")  # what fraction_held can tell


@dataclass(frozen=True)
class RankShard:
    """What one rank holds; the ranges index the whole model's heads, experts and rows."""
    rank: int
    q_heads: range
    kv_heads: range
    mlp_rows: range  # rows of intermediate_size in the dense MLP layers (empty when the model has none)
    experts: range  # experts of every MoE layer that the rank holds (a slice of each under "etp")
    expert_rows: range  # rows of moe_intermediate_size it holds of each of those experts
    vocab_rows: range  # rows of lm_head
    weight_bytes: dict[str, int]  # bytes per part: embed_tokens, norms, attention, mlp, router, experts, lm_head
    kv_cache_bytes_per_token: int  # all layers' keys and values of its kv heads, for one position

    @property
    def total_bytes(self) -> int:
        return sum(self.weight_bytes.values())


@dataclass(frozen=True)
class ShardingPlan:
    """The whole split: one RankShard per rank, in rank order, made by ``plan_sharding``."""
    config: Qwen3MoeConfig
    ndev: int
    experts: str  # "ep" or "etp"
    ranks: tuple[RankShard, ...]
    dtype_bytes: int  # bytes per weight, 2 for bf16 checkpoints

    @property
    def all_reduces_per_token(self) -> int:
        """After attention and after the MLP/MoE block of every layer; a single device exchanges nothing."""
        return 0 if self.ndev == 1 else 2 * self.config.num_hidden_layers

    def fraction_held(self, part: str) -> np.ndarray:
        """(ndev, units): how much of each unit of ``part`` (one of PARTS) each rank holds.

        Columns sum to 1 where a unit is split or placed once, to the number of copies where it is replicated (kv
        heads when ndev > num_key_value_heads). Under "etp" every rank holds 1/ndev of every expert.
        """
        if part not in PARTS:
            raise ValueError(f"part must be one of {', '.join(PARTS)}, not {part!r}")
        c = self.config
        units = {"q_heads": c.num_attention_heads, "kv_heads": c.num_key_value_heads,
                 "mlp_rows": c.intermediate_size, "experts": c.num_experts, "vocab_rows": c.vocab_size}[part]
        held = np.zeros((self.ndev, units))
        for r in self.ranks:
            held_range = getattr(r, part)
            share = len(r.expert_rows) / c.moe_intermediate_size if part == "experts" and c.num_experts else 1.0
            held[r.rank, held_range.start:held_range.stop] = share
        return held

    def format_table(self) -> str:
        """One row per rank, then what every rank shares and what the ranks exchange."""
        c = self.config
        has_dense = "dense" in c.layer_types
        lines = [f"sharding over {self.ndev} rank{'s' if self.ndev > 1 else ''}, experts by "
                 f"{PLACEMENTS[self.experts]} ({self.experts})",
                 f"{'rank':>4}  {'q heads':<9} {'kv heads':<9} " + (f"{'mlp rows':<11} " if has_dense else "")
                 + f"{'experts':<22} {'lm_head rows':<15} {'weights':>10} {'KV KiB/token':>12}"]
        for r in self.ranks:
            lines.append(f"{r.rank:>4}  {_span(r.q_heads):<9} {_span(r.kv_heads):<9} "
                         + (f"{_span(r.mlp_rows):<11} " if has_dense else "")
                         + f"{self._experts_cell(r):<22} {_span(r.vocab_rows):<15} {_size(r.total_bytes):>10} "
                         f"{r.kv_cache_bytes_per_token / 1024:>12.1f}")
        shared = self.ranks[0].weight_bytes
        lines.append(f"replicated on every rank: embed_tokens ({_size(shared['embed_tokens'])}), the norms and the "
                     f"router ({_size(shared['norms'] + shared['router'])})"
                     + (f"; each kv head on {self.ndev // c.num_key_value_heads} ranks"
                        if self.ndev > c.num_key_value_heads else ""))
        lines.append(f"per token: {self.all_reduces_per_token} all-reduces of the hidden state (after attention and "
                     f"after the MLP/MoE block of {c.num_hidden_layers} layers), then one reduction across ranks in "
                     "the sampling step" if self.ndev > 1 else "per token: no exchange (one device)")
        lines.append(f"weights at {self.dtype_bytes} bytes per parameter (GB = 1e9 bytes, MB = 1e6); the KV cache "
                     "and activations come on top")
        return "\n".join(lines)

    def _experts_cell(self, r: RankShard) -> str:
        if not self.config.num_experts:
            return "-"
        if self.experts == "ep":
            return f"{_span(r.experts)} ({len(r.experts)})"
        return f"all {len(r.experts)}, rows {_span(r.expert_rows)}"


def plan_sharding(config: Qwen3MoeConfig, ndev: int, experts: str = "ep", dtype_bytes: int = 2) -> ShardingPlan:
    """Split ``config``'s weights over ``ndev`` ranks; refuse, saying why and which ndev would work, if it can't."""
    if experts not in PLACEMENTS:
        raise ValueError(f"experts must be 'ep' or 'etp', not {experts!r}")
    if isinstance(ndev, bool) or not isinstance(ndev, int) or ndev < 1:
        raise ValueError(f"ndev must be a whole number >= 1, not {ndev!r}")
    problems = _problems(config, ndev, experts)
    if problems:
        working = [n for n in range(1, config.num_attention_heads + 1) if not _problems(config, n, experts)]
        other = "etp" if experts == "ep" else "ep"
        hint = f" (experts={other!r} would split it over {ndev})" if not _problems(config, ndev, other) else ""
        raise UnsupportedConfigError(
            f"cannot split this model over ndev={ndev} with experts={experts!r}: {'; '.join(problems)}; "
            f"ndev values that work: {', '.join(map(str, working))}{hint}")
    ranks = tuple(_rank_shard(config, ndev, experts, r, dtype_bytes) for r in range(ndev))
    return ShardingPlan(config, ndev, experts, ranks, dtype_bytes)


def _problems(c: Qwen3MoeConfig, n: int, experts: str) -> list[str]:
    """Why ``c`` cannot be split over n ranks (empty when it can)."""
    heads, kv = c.num_attention_heads, c.num_key_value_heads
    problems = []
    if heads % n:
        problems.append(f"num_attention_heads {heads} is not a multiple of {n}")
    if n <= kv and kv % n:
        problems.append(f"num_key_value_heads {kv} is not a multiple of {n}")
    if n > kv and n % kv:
        problems.append(f"{n} ranks cannot share {kv} kv heads evenly (a multiple of {kv} can)")
    if "dense" in c.layer_types and c.intermediate_size % n:
        problems.append(f"intermediate_size {c.intermediate_size} of the dense layers is not a multiple of {n}")
    if c.num_experts and experts == "ep" and (n - 1) * _ceil_div(c.num_experts, n) >= c.num_experts:
        problems.append(f"num_experts {c.num_experts} in blocks of ceil({c.num_experts}/{n}) = "
                        f"{_ceil_div(c.num_experts, n)} leaves rank {n - 1} without experts")
    if c.num_experts and experts == "etp" and c.moe_intermediate_size % n:
        problems.append(f"moe_intermediate_size {c.moe_intermediate_size} is not a multiple of {n}")
    return problems


def _rank_shard(c: Qwen3MoeConfig, n: int, experts: str, rank: int, dtype_bytes: int) -> RankShard:
    kv = c.num_key_value_heads
    # n <= kv: kv/n heads each; n > kv: the one kv head that this rank's query heads read (h // (heads / kv))
    kv_heads = _even_block(kv, n, rank) if n <= kv else range(rank // (n // kv), rank // (n // kv) + 1)
    has_dense = "dense" in c.layer_types
    shard = dict(
        q_heads=_even_block(c.num_attention_heads, n, rank),
        kv_heads=kv_heads,
        mlp_rows=_even_block(c.intermediate_size, n, rank) if has_dense else range(0),
        experts=_ceil_block(c.num_experts, n, rank) if experts == "ep" else range(c.num_experts),
        expert_rows=range(c.moe_intermediate_size) if experts == "ep" else
        _even_block(c.moe_intermediate_size, n, rank),
        vocab_rows=_ceil_block(c.vocab_size, n, rank),
    )
    return RankShard(rank=rank, **shard, weight_bytes=_weight_bytes(c, dtype_bytes, **shard),
                     kv_cache_bytes_per_token=c.num_hidden_layers * 2 * len(kv_heads) * c.head_dim * dtype_bytes)


def _weight_bytes(c: Qwen3MoeConfig, dtype_bytes: int, q_heads, kv_heads, mlp_rows, experts, expert_rows,
                  vocab_rows) -> dict[str, int]:
    """Bytes of each part a rank holds, by the checkpoint's tensor shapes (lm_head is free when tied: it is the
    replicated embedding)."""
    hidden, head_dim, kinds = c.hidden_size, c.head_dim, c.layer_types
    layers, dense, moe = len(kinds), kinds.count("dense"), kinds.count("moe")
    params = {
        "embed_tokens": c.vocab_size * hidden,
        "norms": hidden + layers * (2 * hidden + 2 * head_dim),  # final, input/post-attention, q_norm/k_norm
        "attention": layers * hidden * head_dim * (2 * len(q_heads) + 2 * len(kv_heads)),  # q, o; k, v
        "mlp": dense * 3 * hidden * len(mlp_rows),
        "router": moe * c.num_experts * hidden,
        "experts": moe * len(experts) * 3 * hidden * len(expert_rows),
        "lm_head": 0 if c.tie_word_embeddings else len(vocab_rows) * hidden,
    }
    return {part: count * dtype_bytes for part, count in params.items()}


def rank_config(plan: ShardingPlan, rank: int) -> Qwen3MoeConfig:
    """The config of the smaller model a rank runs: its heads, its rows of the dense and expert MLPs.

    num_experts stays whole: the router is replicated, so every rank routes every token over all experts. Under
    "ep" the rank's experts are a subset of them (``shard_weights`` leaves the others out).
    """
    c, r = plan.config, plan.ranks[rank]
    return dataclasses.replace(c, num_attention_heads=len(r.q_heads), num_key_value_heads=len(r.kv_heads),
                               intermediate_size=len(r.mlp_rows) or c.intermediate_size,
                               moe_intermediate_size=len(r.expert_rows))


def shard_weights(weights: Qwen3MoeWeights, plan: ShardingPlan, rank: int) -> Qwen3MoeWeights:
    """Rank ``rank``'s part of ``weights``, in the form of a whole model's weights for ``rank_config``.

    Every array is a view (a slice of rows or columns) of the original, so slicing a memory-mapped checkpoint reads
    nothing: a backend's ``prepare`` later reads only the rank's part. Under "ep" the experts the rank does not hold
    are None: it computes only its own, and its MoE output is the part of the weighted sum they make.
    """
    c, r = plan.config, plan.ranks[rank]
    D = c.head_dim
    q_rows = slice(r.q_heads.start * D, r.q_heads.stop * D)
    kv_rows = slice(r.kv_heads.start * D, r.kv_heads.stop * D)

    def mlp(m: MLP, rows: range) -> MLP:
        part = slice(rows.start, rows.stop)
        return MLP(m.gate_proj[part], m.up_proj[part], m.down_proj[:, part])

    layers = []
    for lw in weights.layers:
        a = lw.self_attn
        attn = Attention(a.q_proj[q_rows], a.k_proj[kv_rows], a.v_proj[kv_rows], a.o_proj[:, q_rows], a.q_norm,
                         a.k_norm)
        if isinstance(lw.mlp, SparseMoeBlock):
            experts = [mlp(e, r.expert_rows) if j in r.experts else None for j, e in enumerate(lw.mlp.experts)]
            ff = SparseMoeBlock(lw.mlp.gate, experts)
        else:
            ff = mlp(lw.mlp, r.mlp_rows)
        layers.append(DecoderLayer(lw.input_layernorm, attn, lw.post_attention_layernorm, ff))
    vocab = slice(r.vocab_rows.start, r.vocab_rows.stop)
    return Qwen3MoeWeights(weights.embed_tokens, layers, weights.norm, weights.lm_head[vocab])


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _ceil_block(total: int, n: int, rank: int) -> range:
    """Contiguous blocks of ceil(total/n); the last ones may be shorter."""
    size = _ceil_div(total, n)
    return range(min(rank * size, total), min((rank + 1) * size, total))


def _even_block(total: int, n: int, rank: int) -> range:
    return range(rank * total // n, (rank + 1) * total // n)


def _size(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB" if nbytes >= 1e9 else f"{nbytes / 1e6:.2f} MB"


def _span(r: range) -> str:
    """``range(0, 8)`` -> ``0-7``, a single index as itself, an empty range as ``-``."""
    return "-" if not r else str(r.start) if len(r) == 1 else f"{r.start}-{r.stop - 1}"


@dataclass(frozen=True)
class RankLoad:
    """Expert work of one MoE layer per rank; the arrays end in a rank axis ((T, E) counts give (T, ndev))."""
    slots: np.ndarray  # (token, expert) picks whose expert the rank holds: all of it ("ep") or a slice ("etp")
    work: np.ndarray  # those picks times the share of the expert the rank holds; sums over ranks to all picks

    @property
    def balance(self) -> np.ndarray:
        """max / mean of ``work`` over ranks: 1.0 is even, ndev means one rank did everything (0 with no work)."""
        mean = np.asarray(self.work.mean(axis=-1))
        return np.divide(self.work.max(axis=-1), mean, out=np.zeros_like(mean), where=mean > 0)


def rank_loads(plan: ShardingPlan, counts: dict[int, np.ndarray]) -> dict[int, RankLoad]:
    """The expert work each rank would have done for ``counts`` (``RouterStats.counts``: layer -> picks per expert,
    shape (E,); or (T, E), one row per token, to see single steps).

    Under "ep" a rank's load is the picks of its own experts, so it follows the router; under "etp" every rank
    computes its slice of every pick and the load is even by construction.
    """
    held = plan.fraction_held("experts")  # (ndev, E)
    return {layer: RankLoad(slots=np.asarray(c) @ (held > 0).T.astype(np.int64), work=np.asarray(c) @ held.T)
            for layer, c in counts.items()}


def format_rank_loads(plan: ShardingPlan, loads: dict[int, RankLoad]) -> str:
    """Per MoE layer: the expert picks each rank computed and how even the work was (max / mean over ranks)."""
    lines = [f"expert work per rank ({plan.experts}: " + ("picks of the rank's own experts" if plan.experts == "ep"
                                                          else "every rank computes a slice of every pick") + ")",
             f"{'layer':>5}  " + " ".join(f"{'rank ' + str(r):>9}" for r in range(plan.ndev)) + f"  {'max/mean':>8}"]
    for layer, load in loads.items():
        lines.append(f"{layer:>5}  " + " ".join(f"{int(v):>9}" for v in load.slots) + f"  {float(load.balance):>8.2f}")
    return "\n".join(lines)
