"""Precision "bf16" on the numba backend: steps of fewer than MANY_TOKENS tokens (the whole-step greedy decoder, and
the model loop's kernels) round each product's input to bf16 once and multiply bf16 pairs with AVX512-BF16's
vdpbf16ps (fastpath/numba_kernels.py), as llama.cpp does.

Tolerances: a product of bf16-rounded activations differs from the float32 one by ~2^-9 relative per element, ~1e-3
of the largest logit after a few layers (as the cupy backend's bf16 prefill: its test allows 5e-2); a broken product
is off by ~1. The rounding itself is exact: it must give ml_dtypes' bits. Tests that multiply skip on a CPU without
AVX512-BF16, saying so; the rounding and the refusals run everywhere.
"""

import ml_dtypes
import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM, backends
from qwen3moe.model import KVCache, Request
from qwen3moe.synthetic import TINY_CONFIG, random_weights, write_checkpoint

REASON = backends.unavailable_reason("numba")
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"the numba backend cannot run here: {REASON}")


@pytest.fixture(scope="module")
def K():
    from fastpath import numba_kernels

    return numba_kernels


@pytest.fixture
def needs_bf16(K):
    if not K.bf16_supported():
        pytest.skip("this CPU has no AVX512-BF16 (vdpbf16ps), which precision bf16 multiplies with")


def bf16_bits(x: np.ndarray) -> np.ndarray:
    return x.astype(ml_dtypes.bfloat16).view(np.uint16)


def test_activations_round_to_bf16_as_ml_dtypes_does(K):
    """split_into with uint32 words packs each pair of activations as two bf16, to nearest with ties to even, the
    even element in the low half (the weights' layout): ml_dtypes' bits for random values, exact ties (both
    directions), values that round up into the next power of two, zeros of both signs and infinities; and the same
    for the RMSNorm'd input, whose float32 values are those of the float32 split."""
    rng = np.random.default_rng()
    x = rng.standard_normal(256, dtype=np.float32) * np.float32(10.0) ** rng.integers(-3, 4, 256)
    special = np.array([0x3F808000, 0x3F818000, 0xBF808000, 0x3FFFFFFF, 0x3FFF8000, 0x7F7FFFFF, 0x00000000,
                        0x80000000, 0x7F800000, 0xFF800000], np.uint32).view(np.float32)
    x[:len(special)] = special
    x = x.reshape(1, -1)
    words, unused = np.zeros((1, 128), np.uint32), np.zeros((1, 128), np.float32)
    K.split_into(x, x[0], 0.0, False, words, unused)
    np.testing.assert_array_equal(words.view(np.uint16).reshape(-1), bf16_bits(x.reshape(-1)))
    x = rng.standard_normal((1, 256), dtype=np.float32)
    weight = (1 + 0.1 * rng.standard_normal(256)).astype(np.float32)
    xe, xo = np.zeros((1, 128), np.float32), np.zeros((1, 128), np.float32)
    K.split_into(x, weight, 1e-6, True, xe, xo)
    K.split_into(x, weight, 1e-6, True, words, unused)
    normed = np.stack([xe[0], xo[0]], axis=1).reshape(-1)
    np.testing.assert_array_equal(words.view(np.uint16).reshape(-1), bf16_bits(normed))


@pytest.mark.parametrize("K_", [64, 128, 192, 2048 + 96])
def test_a_bf16_row_product_is_the_float64_product_of_the_rounded_input(K, needs_bf16, K_):
    """vdpbf16ps over whole groups of 128 (two loop steps of its 4 chains at 256, ...) and the rest of a row by the
    scalar loop (64: no whole group, 192: one and a rest): every row within float32 summation error (1e-5
    relative) of the float64 product of the same bf16 weights and the input rounded to bf16."""
    rng = np.random.default_rng()
    N = 37
    w = bf16_bits(rng.standard_normal((N, K_), dtype=np.float32) * np.float32(0.05)).view(np.uint32).reshape(N, -1)
    x = rng.standard_normal((1, K_), dtype=np.float32)
    words, unused = np.zeros((1, K_ // 2), np.uint32), np.zeros((1, K_ // 2), np.float32)
    K.split_into(x, x[0], 0.0, False, words, unused)
    out = np.full(N, np.nan, np.float32)
    from numba import njit

    rows = njit(lambda w, words, unused, out: K._dot_rows(w, 0, w.shape[0], words, unused, 0, out, False))
    rows(w, words, unused, out)
    widen = lambda bits: (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    expected = widen(w.view(np.uint16)) @ widen(words.view(np.uint16)[0])
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_bf16_greedy_decoding_stays_within_bf16_rounding_of_the_reference(needs_bf16, tmp_path):
    """Greedy decoding at precision bf16 against the float32 reference, fed the same tokens: each step's logits
    within 5e-2 of the largest (about 1e-3 is seen) but not within 1e-5 (or nothing was rounded), on a model whose
    rows are one whole vdpbf16ps group and a rest (hidden 192, moe_intermediate 96, o_proj's 256 inputs two groups),
    with a dense layer and two MoE layers. The layers of a prefill of MANY_TOKENS tokens or more (BLAS) stay
    float32: the keys and values it writes equal those of precision float32 exactly.
    Every token goes to every expert (num_experts_per_tok = num_experts): with top-2 of 8, rounding sent some token
    of some step to another expert in 2 runs of 25, which changes its output wholly and says nothing about rounding
    (the router itself keeps float32, but its input went through bf16 products)."""
    config = dict(TINY_CONFIG, hidden_size=192, moe_intermediate_size=96, intermediate_size=320, head_dim=32,
                  num_attention_heads=8, num_experts_per_tok=TINY_CONFIG["num_experts"])
    folder = write_checkpoint(tmp_path / "m", config, random_weights(config, seed=int(np.random.default_rng()
                                                                                       .integers(1 << 30))))
    from fastpath.numba_backend import MANY_TOKENS

    prompt = np.random.default_rng().integers(0, 256, MANY_TOKENS + 3).tolist()
    steps = 12
    reference = Qwen3MoeForCausalLM(folder, backend="numpy")
    ours = Qwen3MoeForCausalLM(folder, backend="numba", precision="bf16")
    plain = Qwen3MoeForCausalLM(folder, backend="numba")
    caches = {m: KVCache(m.config, len(prompt) + steps + 1) for m in (reference, ours, plain)}
    first = {m: m.forward([Request(prompt, 0, caches[m])])[0] for m in caches}
    np.testing.assert_array_equal(caches[ours].k, caches[plain].k)
    np.testing.assert_array_equal(caches[ours].v, caches[plain].v)
    token = int(np.argmax(first[reference]))
    decoder = ours._ops.GreedyDecoder(ours._state, caches[ours], len(prompt), token)
    worst = 0.0
    for k in range(steps):
        (expected,) = reference.forward([Request([token], len(prompt) + k, caches[reference])])
        decoder.step()
        scale = np.abs(expected).max()
        np.testing.assert_allclose(decoder.logits, expected, rtol=0, atol=5e-2 * scale, err_msg=f"step {k}")
        worst = max(worst, float(np.abs(decoder.logits - expected).max() / scale))
        token = int(np.argmax(expected))  # the reference's token, fed to both (the decoder's may differ at a tie)
        decoder.token = token
    assert worst > 1e-5, "no bf16 rounding took place"


def test_bf16_batch_decoding_in_the_model_loop_stays_within_bf16_rounding(needs_bf16, tmp_path):
    """The model loop's kernels (norm_project, project_residual, dense_gate_up, experts_gate_up, experts_down) at
    precision bf16: three sequences decoded together, a short prompt each (fewer than MANY_TOKENS tokens: kernels,
    not BLAS), then steps of three tokens, fed the reference's tokens: logits within 5e-2 of the largest but not
    within 1e-5. PARALLEL_MIN_BYTES set to 0 sends the MoE blocks through the expert kernels (threaded), not the
    one-call moe_block; every token goes to every expert, so that rounding cannot choose others (see above)."""
    import fastpath.numba_backend as nb

    config = dict(TINY_CONFIG, hidden_size=192, moe_intermediate_size=96, intermediate_size=320, head_dim=32,
                  num_attention_heads=8, num_experts_per_tok=TINY_CONFIG["num_experts"])
    folder = write_checkpoint(tmp_path / "m", config, random_weights(config, seed=int(np.random.default_rng()
                                                                                       .integers(1 << 30))))
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, n).tolist() for n in (3, 5, 4)]
    reference = Qwen3MoeForCausalLM(folder, backend="numpy")
    ours = Qwen3MoeForCausalLM(folder, backend="numba", precision="bf16")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(nb, "PARALLEL_MIN_BYTES", 0)  # the threaded kernels, not the one-call MoE block
        caches = {m: [KVCache(m.config, 16) for _ in prompts] for m in (reference, ours)}
        requests = lambda m, tokens, pos: [Request(t, p, c) for t, p, c in zip(tokens, pos, caches[m])]
        tokens, pos, worst = prompts, [0, 0, 0], 0.0
        for step in range(6):
            expected = reference.forward(requests(reference, tokens, pos))
            got = ours.forward(requests(ours, tokens, pos))
            for e, g in zip(expected, got):
                scale = np.abs(e).max()
                np.testing.assert_allclose(g, e, rtol=0, atol=5e-2 * scale, err_msg=f"step {step}")
                worst = max(worst, float(np.abs(g - e).max() / scale))
            pos = [p + len(t) for p, t in zip(pos, tokens)]
            tokens = [[int(np.argmax(e))] for e in expected]
    assert worst > 1e-5, "no bf16 rounding took place"


def test_precision_bf16_is_refused_where_it_cannot_run(K, tmp_path, monkeypatch):
    """A float32 checkpoint has no bf16 pairs to multiply; a CPU without AVX512-BF16 no instruction to do it with:
    both refused with what to use instead."""
    f32 = write_checkpoint(tmp_path / "f32", dict(TINY_CONFIG),
                           {n: t.astype(np.float32) for n, t in random_weights(TINY_CONFIG).items()})
    if K.bf16_supported():
        with pytest.raises(ValueError, match="needs a bf16 checkpoint .*float32.*use precision='float32'"):
            Qwen3MoeForCausalLM(f32, backend="numba", precision="bf16")
    monkeypatch.setattr(K, "bf16_supported", lambda: False)
    with pytest.raises(ValueError, match="AVX512-BF16 \\(vdpbf16ps\\), which this CPU lacks; use precision='float32'"):
        Qwen3MoeForCausalLM(f32, backend="numba", precision="bf16")
