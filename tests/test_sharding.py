"""The multi-GPU sharding plan: every head, expert and row on the ranks the design says, bytes that add up, clear
refusals, and per-rank expert loads that sum to the router's totals."""

import math

import numpy as np
import pytest

from qwen3moe.bench import QWEN3_30B_A3B
from qwen3moe.config import config_from_dict
from qwen3moe.errors import UnsupportedConfigError
from qwen3moe.router_stats import RouterStats
from qwen3moe.sharding import plan_sharding, rank_loads
from qwen3moe.synthetic import TINY_CONFIG
from qwen3moe.weights import expected_shapes

CONFIGS = {"30b": config_from_dict(QWEN3_30B_A3B), "tiny": config_from_dict(TINY_CONFIG)}
SPLITS = [("30b", 1), ("30b", 2), ("30b", 4), ("30b", 8), ("tiny", 1), ("tiny", 2), ("tiny", 4)]
SPLIT_IDS = [f"{name}-ndev{n}" for name, n in SPLITS]
PLACEMENTS = ["ep", "etp"]


def concatenated(ranges) -> list[int]:
    return [i for r in ranges for i in r]


@pytest.mark.parametrize("experts", PLACEMENTS)
@pytest.mark.parametrize("name, ndev", SPLITS, ids=SPLIT_IDS)
def test_every_head_expert_and_row_is_placed_once(name, ndev, experts):
    c = CONFIGS[name]
    plan = plan_sharding(c, ndev, experts)
    ranks = plan.ranks
    assert [r.rank for r in ranks] == list(range(ndev))
    # split parts: contiguous, in rank order, covering everything exactly once
    assert concatenated(r.q_heads for r in ranks) == list(range(c.num_attention_heads))
    assert {len(r.q_heads) for r in ranks} == {c.num_attention_heads // ndev}
    assert concatenated(r.vocab_rows for r in ranks) == list(range(c.vocab_size))
    assert all(len(r.vocab_rows) == math.ceil(c.vocab_size / ndev) for r in ranks[:-1])  # the last may hold fewer
    if "dense" in c.layer_types:
        assert concatenated(r.mlp_rows for r in ranks) == list(range(c.intermediate_size))
    for part in ("q_heads", "experts", "vocab_rows"):
        assert np.allclose(plan.fraction_held(part).sum(axis=0), 1.0), part
    if experts == "ep":  # whole experts, ceil(E/N) contiguous per rank
        assert concatenated(r.experts for r in ranks) == list(range(c.num_experts))
        assert all(len(r.experts) == math.ceil(c.num_experts / ndev) for r in ranks[:-1])
        assert all(r.expert_rows == range(c.moe_intermediate_size) for r in ranks)
    else:  # every expert on every rank, its moe_intermediate rows split evenly
        assert all(r.experts == range(c.num_experts) for r in ranks)
        assert concatenated(r.expert_rows for r in ranks) == list(range(c.moe_intermediate_size))
        assert {len(r.expert_rows) for r in ranks} == {c.moe_intermediate_size // ndev}


@pytest.mark.parametrize("name, ndev", SPLITS, ids=SPLIT_IDS)
def test_each_rank_holds_the_kv_heads_its_query_heads_read(name, ndev):
    c = CONFIGS[name]
    plan = plan_sharding(c, ndev)
    group = c.num_attention_heads // c.num_key_value_heads
    for r in plan.ranks:
        assert sorted({h // group for h in r.q_heads}) == list(r.kv_heads)
    copies = plan.fraction_held("kv_heads").sum(axis=0)
    assert (copies == max(1, ndev // c.num_key_value_heads)).all()  # replicated only when ndev > kv heads
    if ndev > c.num_key_value_heads:
        assert "each kv head on" in plan.format_table()


@pytest.mark.parametrize("experts", PLACEMENTS)
@pytest.mark.parametrize("name, ndev", SPLITS, ids=SPLIT_IDS)
def test_bytes_add_up_to_the_checkpoint(name, ndev, experts):
    c = CONFIGS[name]
    whole = plan_sharding(c, 1).ranks[0]
    assert whole.total_bytes == 2 * sum(math.prod(s) for s in expected_shapes(c).values())
    ranks = plan_sharding(c, ndev, experts).ranks
    for part in ("embed_tokens", "norms", "router"):  # replicated
        assert all(r.weight_bytes[part] == whole.weight_bytes[part] for r in ranks)
    for part in ("mlp", "experts", "lm_head"):  # split
        assert sum(r.weight_bytes[part] for r in ranks) == whole.weight_bytes[part]
    kv_copies = sum(len(r.kv_heads) for r in ranks) - c.num_key_value_heads  # extra kv heads when replicated
    kv_bytes = 2 * c.num_hidden_layers * 2 * c.hidden_size * c.head_dim  # k_proj and v_proj rows of one kv head
    assert sum(r.weight_bytes["attention"] for r in ranks) == whole.weight_bytes["attention"] + kv_copies * kv_bytes


def test_qwen3_30b_a3b_on_four_80gb_cards():
    plan = plan_sharding(CONFIGS["30b"], 4)
    assert plan_sharding(CONFIGS["30b"], 1).ranks[0].total_bytes / 1e9 == pytest.approx(61.1, abs=0.05)
    assert all(15 < r.total_bytes / 1e9 < 16 for r in plan.ranks)
    assert plan.all_reduces_per_token == 96 and plan_sharding(CONFIGS["30b"], 1).all_reduces_per_token == 0
    assert all(r.kv_cache_bytes_per_token == 48 * 2 * 1 * 128 * 2 for r in plan.ranks)
    table = plan.format_table()
    assert "   0  0-7       0         0-31 (32)" in table and "15.75 GB" in table
    assert "96 all-reduces" in table
    assert "all 128, rows 576-767" in plan_sharding(CONFIGS["30b"], 4, "etp").format_table()


def test_uneven_splits_leave_the_last_rank_fewer():
    c = config_from_dict(TINY_CONFIG | {"num_experts": 10, "vocab_size": 385})
    ranks = plan_sharding(c, 4).ranks
    assert [r.experts for r in ranks] == [range(0, 3), range(3, 6), range(6, 9), range(9, 10)]
    assert [len(r.vocab_rows) for r in ranks] == [97, 97, 97, 94]
    assert [r.weight_bytes["experts"] for r in ranks][-1] < ranks[0].weight_bytes["experts"]


def test_tied_embeddings_put_no_extra_lm_head_on_any_rank():
    c = config_from_dict(TINY_CONFIG | {"tie_word_embeddings": True})
    assert all(r.weight_bytes["lm_head"] == 0 for r in plan_sharding(c, 2).ranks)


def test_a_model_without_dense_layers_splits_no_mlp_rows():
    c = config_from_dict(TINY_CONFIG | {"mlp_only_layers": [], "intermediate_size": 130})  # 130 is not split
    plan = plan_sharding(c, 4)
    assert all(not r.mlp_rows and r.weight_bytes["mlp"] == 0 for r in plan.ranks)
    assert "mlp rows" not in plan.format_table()


def test_a_dense_model_has_no_experts_to_place():
    c = config_from_dict(TINY_CONFIG | {"model_type": "qwen3"})
    plan = plan_sharding(c, 2)
    assert all(not r.experts and r.weight_bytes["experts"] == 0 for r in plan.ranks)
    assert concatenated(r.mlp_rows for r in plan.ranks) == list(range(c.intermediate_size))


# --- refusals -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("changes, ndev, experts, words", [
    ({}, 3, "ep", ["ndev=3", "num_attention_heads 32 is not a multiple of 3", "ndev values that work: 1, 2, 4, 8, "
                   "16, 32"]),
    ({"num_attention_heads": 12, "num_key_value_heads": 4}, 6, "ep",
     ["6 ranks cannot share 4 kv heads evenly", "ndev values that work: 1, 2, 4, 12"]),
    ({"num_attention_heads": 8, "num_key_value_heads": 8, "num_experts": 6, "num_experts_per_tok": 2}, 4, "ep",
     ["num_experts 6 in blocks of ceil(6/4) = 2 leaves rank 3 without experts", "experts='etp' would split it"]),
    ({"moe_intermediate_size": 100}, 8, "etp", ["moe_intermediate_size 100 is not a multiple of 8",
                                                "ndev values that work: 1, 2, 4"]),
    ({"mlp_only_layers": [0], "intermediate_size": 130}, 4, "ep",
     ["intermediate_size 130 of the dense layers is not a multiple of 4", "ndev values that work: 1, 2"]),
])
def test_unsplittable_configs_are_refused_with_the_reason(changes, ndev, experts, words):
    c = config_from_dict(QWEN3_30B_A3B | changes)
    with pytest.raises(UnsupportedConfigError) as refusal:
        plan_sharding(c, ndev, experts)
    for w in words:
        assert w in str(refusal.value)


def test_tiny_config_over_eight_ranks_is_refused():
    with pytest.raises(UnsupportedConfigError, match=r"num_attention_heads 4 is not a multiple of 8; .* 1, 2, 4$"):
        plan_sharding(CONFIGS["tiny"], 8)


@pytest.mark.parametrize("ndev, experts, words", [(0, "ep", "ndev must be"), (2.0, "ep", "ndev must be"),
                                                  (2, "tp", "experts must be 'ep' or 'etp'")])
def test_bad_arguments(ndev, experts, words):
    with pytest.raises(ValueError, match=words):
        plan_sharding(CONFIGS["tiny"], ndev, experts)


# --- per-rank loads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ndev", [1, 2, 4, 8])
def test_rank_loads_sum_to_the_router_totals(ndev, rng):
    c = CONFIGS["30b"]
    stats = RouterStats(c)
    for layer in c.moe_layers:
        counts = rng.integers(0, 50, c.num_experts)
        stats.add(layer, counts, int(counts.sum()) // c.num_experts_per_tok, 0.0, np.zeros(c.num_experts))
    ep = rank_loads(plan_sharding(c, ndev, "ep"), stats.counts)
    etp = rank_loads(plan_sharding(c, ndev, "etp"), stats.counts)
    assert list(ep) == c.moe_layers
    for layer, counts in stats.counts.items():
        blocks = np.split(counts, ndev)  # 128 experts split evenly at these ndev
        assert ep[layer].slots.tolist() == [int(b.sum()) for b in blocks]
        assert np.array_equal(ep[layer].work, ep[layer].slots)
        assert ep[layer].balance == pytest.approx(max(b.sum() for b in blocks) / (counts.sum() / ndev))
        # every rank computes its slice of every pick: the same slots everywhere, 1/ndev of the work each
        assert etp[layer].slots.tolist() == [int(counts.sum())] * ndev
        assert etp[layer].work == pytest.approx(np.full(ndev, counts.sum() / ndev))
        assert etp[layer].balance == pytest.approx(1.0)
        assert ep[layer].work.sum() == pytest.approx(counts.sum()) == etp[layer].work.sum()


def test_rank_loads_per_token():
    """One row per token: a batch-1 step whose 8 experts all sit on rank 0 of 4 loads that rank with everything."""
    c = CONFIGS["30b"]
    picks = np.zeros((2, c.num_experts), dtype=np.int64)
    picks[0, :8] = 1  # experts 0-7: all on rank 0
    picks[1, ::16] = 1  # experts 0, 16, ..., 112: two per rank
    load = rank_loads(plan_sharding(c, 4), {1: picks})[1]
    assert load.slots.tolist() == [[8, 0, 0, 0], [2, 2, 2, 2]]
    assert load.balance.tolist() == [4.0, 1.0]
    assert rank_loads(plan_sharding(c, 4), {1: np.zeros(c.num_experts, dtype=np.int64)})[1].balance == 0.0
