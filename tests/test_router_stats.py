"""Router statistics agree with the per-token trace and with the guide's formulas; debug mode finds NaNs."""

import io

import numpy as np
import pytest

from qwen3moe import Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache
from qwen3moe.debug import NonFiniteError
from qwen3moe.synthetic import TINY_CONFIG, random_weights, write_checkpoint, write_synthetic_checkpoint


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_synthetic_checkpoint(tmp_path_factory.mktemp("stats") / "m", seed=3)


def run_rounds(model, prompts, steps):
    tasks = [Qwen3MoeInferTask(p, temperature=1.0, topk=0, task_id=i, end_tokens=[], max_new_tokens=steps, seed=i)
             for i, p in enumerate(prompts)]
    for t in tasks:
        t.bind_kvcache(Qwen3MoeKVCache(model))
    while any(not t.finished for t in tasks):
        model.batch_infer_one_round([t for t in tasks if not t.finished])
    return tasks


def test_counts_equal_the_trace_and_formulas_hold(folder):
    model = Qwen3MoeForCausalLM(folder)
    model.router_stats.trace_enabled = True
    rng = np.random.default_rng()
    prompts = [rng.integers(0, 256, n).tolist() for n in (5, 17, 9)]
    tasks = run_rounds(model, prompts, steps=6)
    fed = sum(len(t.tokens) - 1 for t in tasks)  # every token but each task's last sampled one was routed
    E, K = TINY_CONFIG["num_experts"], TINY_CONFIG["num_experts_per_tok"]
    for layer in model.config.moe_layers:
        s = model.get_router_stats(layer)
        records = [r for r in model.router_stats.trace if r.layer == layer]
        assert len(records) == s["tokens"] == fed
        counts = np.zeros(E, dtype=int)
        for r in records:
            counts[r.experts] += 1
            assert len(set(r.experts)) == K and abs(sum(r.weights) - 1) < 1e-5  # norm_topk_prob
        assert s["counts"] == counts.tolist()
        ideal = fed * K / E
        assert s["ideal"] == pytest.approx(ideal)
        assert s["balance"] == pytest.approx((counts / ideal).tolist())
        assert s["share"] == pytest.approx((counts / counts.sum()).tolist())
        assert s["variance"] == pytest.approx(np.mean((counts - counts.mean()) ** 2))
        assert s["cv"] == pytest.approx(np.std(counts) / np.mean(counts))
        assert s["max_over_mean"] == pytest.approx(counts.max() / counts.mean())
        assert s["unused_experts"] == [e for e in range(E) if counts[e] == 0]
        assert 0 < s["mean_entropy"] <= np.log(E) + 1e-9
    # every (task, position) pair routed exactly once per layer
    first = model.config.moe_layers[0]
    seen = sorted((r.task_id, r.position) for r in model.router_stats.trace if r.layer == first)
    assert seen == sorted((t.task_id, p) for t in tasks for p in range(len(t.tokens) - 1))


def test_reset_dense_layer_and_table(folder, capsys):
    model = Qwen3MoeForCausalLM(folder)
    run_rounds(model, [[1, 2, 3]], steps=2)
    assert model.get_router_stats(1)["tokens"] == 4
    with pytest.raises(ValueError, match="layer 0 is not an MoE layer"):
        model.get_router_stats(0)
    model.print_router_stats()
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 1 + len(model.config.moe_layers) and table[1].split()[:2] == ["1", "4"]
    model.reset_router_stats()
    assert model.get_router_stats(1)["counts"] == [0] * TINY_CONFIG["num_experts"]


def test_aux_loss_is_one_for_perfectly_even_routing(folder):
    """aux = E * sum f_e P_e; with uniform router probabilities (zero router weights) it is exactly 1."""
    config = dict(TINY_CONFIG)
    tensors = random_weights(config, seed=1)
    for layer in range(config["num_hidden_layers"]):
        name = f"model.layers.{layer}.mlp.gate.weight"
        if name in tensors:
            tensors[name] = np.zeros_like(tensors[name])
    model = Qwen3MoeForCausalLM(write_checkpoint(folder.parent / "uniform", config, tensors))
    run_rounds(model, [list(range(30))], steps=3)
    s = model.get_router_stats(1)
    assert s["aux_loss"] == pytest.approx(1.0)
    assert s["mean_entropy"] == pytest.approx(np.log(config["num_experts"]), rel=1e-6)
    # all probabilities tie: top-k takes the lowest expert ids, as every backend must
    assert s["counts"][:2] == [s["tokens"]] * 2 and sum(s["counts"][2:]) == 0


def test_debug_mode_names_the_layer_with_nan_and_logs_steps(folder):
    config = dict(TINY_CONFIG)
    tensors = random_weights(config, seed=2, dtype=np.float32)
    tensors["model.layers.2.self_attn.o_proj.weight"][3, 5] = np.nan
    broken = write_checkpoint(folder.parent / "nan", config, tensors, shards=1)
    quiet = Qwen3MoeForCausalLM(broken)
    with pytest.raises(NonFiniteError, match="debug=True"):
        quiet.generate("hello", max_steps=2)
    log = io.StringIO()
    loud = Qwen3MoeForCausalLM(broken, debug=True)
    loud.debugger.stream = log
    with pytest.raises(NonFiniteError, match="hidden state after attention of layer 2"):
        loud.generate("hello", max_steps=2)
    assert "layer   1 token" in log.getvalue()  # expert choices of the healthy MoE layer were logged first


def test_debug_log_has_phases_and_experts(folder):
    log = io.StringIO()
    model = Qwen3MoeForCausalLM(folder, debug=True)
    model.debugger.stream = log
    model.generate("hi", max_steps=3, temperature=0)
    text = log.getvalue()
    assert text.count("round of 1 tasks") == len(model.last_task.generated)
    for phase in ("attention=", "moe=", "mlp=", "lm_head=", "sampling="):
        assert phase in text
    assert "experts [" in text
