"""Each NumPy layer against the matching transformers module, on fresh random inputs (float32, 1e-5 relative),
plus properties of the KV cache that need no oracle."""

import numpy as np
import pytest

from qwen3moe import layers as L
from qwen3moe.weights import MLP, SparseMoeBlock

torch = pytest.importorskip("torch", reason="the layer oracle needs torch (pip install -e .[dev])")
qwen3_moe = pytest.importorskip("transformers.models.qwen3_moe.modeling_qwen3_moe",
                                reason="the layer oracle needs transformers (pip install -e .[dev])")
from transformers import Qwen3MoeConfig  # noqa: E402

RTOL = 1e-5


def close(ours, ref):
    ref = ref.detach().float().numpy() if isinstance(ref, torch.Tensor) else ref
    np.testing.assert_allclose(ours, ref, rtol=RTOL, atol=RTOL * float(np.abs(ref).max()))


@pytest.fixture
def rng():
    return np.random.default_rng()


def config(**kw):
    base = dict(hidden_size=48, num_attention_heads=8, num_key_value_heads=2, head_dim=16, num_experts=6,
                num_experts_per_tok=2, moe_intermediate_size=20, intermediate_size=40, norm_topk_prob=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6})
    return Qwen3MoeConfig(**(base | kw))


def t(a):
    return torch.from_numpy(np.ascontiguousarray(a))


def test_rms_norm(rng):
    x = rng.standard_normal((7, 48), dtype=np.float32) * 3
    norm = qwen3_moe.Qwen3MoeRMSNorm(48, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(t(rng.standard_normal(48, dtype=np.float32)))
        close(L.rms_norm(x, norm.weight.numpy(), 1e-6), norm(t(x)))


def test_rope(rng):
    c = config()
    positions = rng.integers(0, 5000, 9)
    rotary = qwen3_moe.Qwen3MoeRotaryEmbedding(c)
    q = rng.standard_normal((9, 8, 16), dtype=np.float32)
    k = rng.standard_normal((9, 2, 16), dtype=np.float32)
    with torch.no_grad():
        cos, sin = rotary(t(q), t(positions[None]))
        ref_q, ref_k = qwen3_moe.apply_rotary_pos_emb(t(q.transpose(1, 0, 2))[None], t(k.transpose(1, 0, 2))[None],
                                                     cos, sin)
    ours_cos, ours_sin = L.rope_cos_sin(positions, 16, 1e6)
    close(ours_cos, cos[0])
    close(L.apply_rope(q, ours_cos, ours_sin), ref_q[0].permute(1, 0, 2))
    close(L.apply_rope(k, ours_cos, ours_sin), ref_k[0].permute(1, 0, 2))


@pytest.mark.parametrize("pos", [0, 11])
def test_grouped_query_causal_attention(rng, pos):
    """n new queries at positions pos..pos+n-1 over pos+n keys, against transformers' eager attention + causal mask."""
    n, Hq, Hkv, D = 6, 8, 2, 16
    q = rng.standard_normal((n, Hq, D), dtype=np.float32)
    k = rng.standard_normal((pos + n, Hkv, D), dtype=np.float32)
    v = rng.standard_normal((pos + n, Hkv, D), dtype=np.float32)
    mask = np.where(np.arange(pos + n)[None, :] <= pos + np.arange(n)[:, None], 0.0, -np.inf).astype(np.float32)

    class Module(torch.nn.Module):
        num_key_value_groups, training = Hq // Hkv, False

    with torch.no_grad():
        ref, _ = qwen3_moe.eager_attention_forward(Module(), t(q.transpose(1, 0, 2))[None],
                                                   t(k.transpose(1, 0, 2))[None], t(v.transpose(1, 0, 2))[None],
                                                   t(mask)[None, None], scaling=D ** -0.5)
    close(L.attend(q, k, v, pos), ref[0])


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router(rng, norm_topk_prob):
    c = config(norm_topk_prob=norm_topk_prob)
    router = qwen3_moe.Qwen3MoeTopKRouter(c)
    x = rng.standard_normal((10, 48), dtype=np.float32)
    with torch.no_grad():
        router.weight.copy_(t(rng.standard_normal((6, 48), dtype=np.float32)))
        logits, weights, experts = router(t(x))
    ours = L.route(x, router.weight.detach().numpy(), 2, norm_topk_prob)
    close(ours.probs, torch.softmax(logits, -1))
    assert ours.experts.tolist() == experts.tolist()
    close(ours.weights, weights)


def test_moe_block_and_dense_mlp(rng):
    c = config()
    block = qwen3_moe.Qwen3MoeSparseMoeBlock(c)
    dense = qwen3_moe.Qwen3MoeMLP(c)
    with torch.no_grad():
        for p in list(block.parameters()) + list(dense.parameters()):
            p.copy_(t(rng.standard_normal(tuple(p.shape), dtype=np.float32) / np.sqrt(p.shape[-1])))
    x = rng.standard_normal((12, 48), dtype=np.float32)
    gate_up, down = block.experts.gate_up_proj.detach().numpy(), block.experts.down_proj.detach().numpy()
    experts = [MLP(gate_up[e, :20], gate_up[e, 20:], down[e]) for e in range(6)]
    moe = SparseMoeBlock(gate=block.gate.weight.detach().numpy(), experts=experts)
    ours, routing = L.moe_block(x, moe, 2, True)
    with torch.no_grad():
        close(ours, block(t(x)[None])[0])
        close(L.mlp(x, MLP(dense.gate_proj.weight.numpy(), dense.up_proj.weight.numpy(),
                           dense.down_proj.weight.numpy())), dense(t(x)))
    assert routing.experts.shape == (12, 2)
