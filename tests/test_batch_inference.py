"""Batch inference: rounds that mix prefills and decodes of different lengths give each task exactly the tokens it
gets alone; caches never overflow; bad rounds are refused before they change anything."""

import numpy as np
import pytest

from qwen3moe import OutOfDeviceMemory, Qwen3MoeForCausalLM, Qwen3MoeInferTask, Qwen3MoeKVCache, backends
from qwen3moe.synthetic import TINY_CONFIG, write_synthetic_checkpoint

SETTINGS = [  # (temperature, topk, topp): greedy and three sampling regimes
    (0.0, 1, 1.0), (1.0, 0, 1.0), (0.8, 20, 0.9), (1.3, 5, 1.0),
]


@pytest.fixture(scope="module", params=[n for n in backends.BACKENDS if backends.unavailable_reason(n) is None])
def model(request, tmp_path_factory):
    """The same synthetic model on every backend that can run here."""
    folder = write_synthetic_checkpoint(tmp_path_factory.mktemp("batch") / "m", seed=7)
    return Qwen3MoeForCausalLM(folder, max_tokens=96, backend=request.param)


def make_tasks(rng, n=5, max_new=12):
    prompts = [rng.integers(0, 256, rng.integers(1, 30)).tolist() for _ in range(n)]
    return [Qwen3MoeInferTask(p, *SETTINGS[i % len(SETTINGS)], task_id=i, end_tokens=[], max_new_tokens=max_new,
                              seed=1000 + i) for i, p in enumerate(prompts)]


def run_alone(model, task):
    task.bind_kvcache(Qwen3MoeKVCache(model))
    while not task.finished:
        model.batch_infer_one_round([task])
    return task.generated


def test_batch_equals_one_at_a_time_with_staggered_starts(model):
    seed = int(np.random.default_rng().integers(1 << 30))  # fresh prompts each run
    alone = [run_alone(model, t) for t in make_tasks(np.random.default_rng(seed))]
    tasks = make_tasks(np.random.default_rng(seed))  # the same prompts and sampling seeds again
    for t in tasks:
        t.bind_kvcache(Qwen3MoeKVCache(model))
    active, step = [], 0
    while any(not t.finished for t in tasks):
        if step < len(tasks):  # one new task joins each round: its prefill runs beside the others' decodes
            active.append(tasks[step])
        active = [t for t in active if not t.finished]
        model.batch_infer_one_round(active)
        step += 1
    assert [t.generated for t in tasks] == alone
    assert all(t.finish_reason == "length" and len(t.generated) == 12 for t in tasks)


def test_cache_capacity_finishes_with_length_and_never_overflows(model):
    prompt = list(range(40, 50))
    task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[])
    cache = Qwen3MoeKVCache(model, max_tokens=len(prompt) + 3)
    task.bind_kvcache(cache)
    while not task.finished:
        model.batch_infer_one_round([task])
    # positions 0..12 hold the prompt and 3 fed tokens; the 4th sampled token needs no slot
    assert task.finish_reason == "length"
    assert len(task.generated) == 4
    assert task.pos + 1 == len(task.tokens) and task.pos == cache.capacity
    with pytest.raises(ValueError, match="finished"):
        model.batch_infer_one_round([task])


def test_prompt_longer_than_cache_is_refused(model):
    task = Qwen3MoeInferTask(list(range(20)))
    with pytest.raises(ValueError, match="20 tokens do not fit in a KV cache of 8 positions"):
        task.bind_kvcache(Qwen3MoeKVCache(model, max_tokens=8))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        Qwen3MoeKVCache(model, max_tokens=TINY_CONFIG["max_position_embeddings"] + 1)


def test_end_token_finishes_with_stop(model):
    prompt = [10, 20, 30]
    probe = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[], max_new_tokens=1)
    (first,) = run_alone(model, probe)
    task = Qwen3MoeInferTask(prompt, temperature=0, end_tokens=[first])
    assert run_alone(model, task) == [first]
    assert task.finish_reason == "stop"


def test_bad_round_changes_nothing_and_model_stays_usable(model):
    good = Qwen3MoeInferTask([1, 2, 3], temperature=0, end_tokens=[], max_new_tokens=4)
    good.bind_kvcache(Qwen3MoeKVCache(model))
    unbound = Qwen3MoeInferTask([4, 5])
    with pytest.raises(ValueError, match="no KV cache"):
        model.batch_infer_one_round([good, unbound])
    shared = Qwen3MoeInferTask([6])
    shared.bind_kvcache(good.kvcache)
    with pytest.raises(ValueError, match="share a KV cache"):
        model.batch_infer_one_round([good, shared])
    assert good.tokens == [1, 2, 3] and good.pos == 0 and not good.finished
    reference = run_alone(model, Qwen3MoeInferTask([1, 2, 3], temperature=0, end_tokens=[], max_new_tokens=4))
    while not good.finished:
        model.batch_infer_one_round([good])
    assert good.generated == reference


def no_memory(*args, **kwargs):
    """What an allocation raises on a device with no memory left: NumPy's MemoryError (CuPy's OutOfMemoryError is a
    subclass of it)."""
    raise MemoryError("out of memory to allocate 1073741824 bytes")


def test_a_step_out_of_memory_says_what_to_do_and_changes_nothing(model, monkeypatch):
    """A step whose buffers do not fit (here the backend's attention cannot allocate) is refused with what did not fit
    and what to do about it; the task has not advanced, and once the memory is there it goes on as it would have."""
    task = Qwen3MoeInferTask([1, 2, 3], temperature=0, end_tokens=[], max_new_tokens=4)
    task.bind_kvcache(Qwen3MoeKVCache(model))
    monkeypatch.setattr(model._ops, "attention_block", no_memory)
    with pytest.raises(OutOfDeviceMemory, match=r"^a step of 3 tokens does not fit in the memory left on the "
                                                 r"device \(out of memory to allocate 1073741824 bytes\); run fewer or "
                                                 r"shorter prompts"):
        model.batch_infer_one_round([task])
    monkeypatch.undo()
    assert task.tokens == [1, 2, 3] and task.pos == 0 and not task.finished
    reference = run_alone(model, Qwen3MoeInferTask([1, 2, 3], temperature=0, end_tokens=[], max_new_tokens=4))
    while not task.finished:
        model.batch_infer_one_round([task])
    assert task.generated == reference


def test_a_kv_cache_out_of_memory_gives_its_size_and_what_to_do(model, monkeypatch):
    """The message gives the cache's size, which must be what such a cache really takes (its keys' and values'
    bytes), and says to ask for fewer positions."""
    real = Qwen3MoeKVCache(model, max_tokens=64)
    mib = (real.k.nbytes + real.v.nbytes) / 2**20
    monkeypatch.setattr(model, "xp", type("NoMemory", (), {"zeros": staticmethod(no_memory)}))
    with pytest.raises(OutOfDeviceMemory, match=rf"^a KV cache of 64 positions \({mib:.1f} MiB\) does not fit in the "
                                                rf"memory left on the device .*; ask for fewer positions"):
        Qwen3MoeKVCache(model, max_tokens=64)


def tensor_bytes(path) -> int:
    """The bytes of a safetensors file's tensors: the file less its 8-byte header length and the header."""
    with open(path, "rb") as f:
        return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")


def test_weights_out_of_memory_say_how_large_they_are_and_to_split_the_model(tmp_path, monkeypatch):
    """Uploading the weights (the backend's prepare) runs out of memory: the message gives the checkpoint's bytes
    (those of its files' tensors) and points to splitting the model over devices."""
    folder = write_synthetic_checkpoint(tmp_path / "m", seed=7)
    mib = sum(tensor_bytes(f) for f in folder.glob("*.safetensors")) / 2**20
    real = backends.load("numpy")
    monkeypatch.setattr(backends, "load", lambda name: type("NoMemory", (), {
        "prepare": staticmethod(no_memory), "xp": real.xp}))
    with pytest.raises(OutOfDeviceMemory, match=rf"^the model's weights \({mib:.1f} MiB\) do not fit in the memory "
                                                rf"left on the device .*; split the model over several devices"):
        Qwen3MoeForCausalLM(folder, backend="numpy")


@pytest.mark.parametrize("kwargs, words", [
    (dict(temperature=-0.5), "temperature"), (dict(topk=-1), "topk"), (dict(topp=0.0), "topp"),
    (dict(topp=1.5), "topp"), (dict(max_new_tokens=0), "max_new_tokens"), (dict(seed=-1), "seed .* got -1"),
    (dict(seed=1.5), "seed .* got 1.5"), (dict(seed="7"), "seed .* got '7'"), (dict(seed=True), "seed .* got True"),
])
def test_invalid_task_settings(kwargs, words):
    with pytest.raises(ValueError, match=words):
        Qwen3MoeInferTask([1, 2], **kwargs)
    with pytest.raises(ValueError, match="at least one prompt token"):
        Qwen3MoeInferTask([])
    for seed in (None, 0, np.int64(3)):  # what a seed may be
        Qwen3MoeInferTask([1, 2], seed=seed)


def test_an_unknown_expert_placement_is_refused_before_anything_loads(tmp_path):
    with pytest.raises(ValueError, match="experts must be 'ep' or 'etp', not 'foo'"):
        Qwen3MoeForCausalLM(tmp_path / "not-even-a-folder", experts="foo")


def test_generate_streams_the_returned_text_and_stops_at_eos(model):
    pieces = []
    text, ms = model.generate("to be or not", max_steps=20, temperature=0, stream=pieces.append)
    task = model.last_task
    assert "".join(pieces) == text == model.tokenizer.decode(task.generated)
    assert ms > 0
    # Make the greedy continuation's first token an eos id: generation must stop with nothing emitted.
    first = task.generated[0]
    model.tokenizer.eos_token_ids = (first,)
    try:
        text, _ = model.generate("to be or not", max_steps=20, temperature=0)
    finally:
        model.tokenizer.eos_token_ids = (258,)
    assert text == "" and model.last_task.finish_reason == "stop"


def test_destroyed_model_refuses_work(tmp_path):
    m = Qwen3MoeForCausalLM(write_synthetic_checkpoint(tmp_path / "m"))
    m.destroy_model_instance()
    with pytest.raises(RuntimeError, match="destroyed"):
        m.generate("hi")


def test_prompt_fed_in_chunks_gives_the_same_logits_as_at_once(model):
    """The KV cache holds exactly what attention needs: feeding 7 + 1 + 12 tokens equals feeding 20 at once."""
    from qwen3moe.model import KVCache, Request

    tokens = np.random.default_rng().integers(0, 256, 20).tolist()
    run = lambda chunk, pos, cache: model.forward([Request(chunk, pos, cache)], all_logits=True)[0]
    whole = run(tokens, 0, KVCache(model.config, 32, xp=model.xp))
    cache = KVCache(model.config, 32, xp=model.xp)
    pieces = [run(tokens[a:b], a, cache) for a, b in ((0, 7), (7, 8), (8, 20))]
    # 1e-4 as between backends: a GPU step of 20 tokens runs on other kernels (tensor cores) than steps of 1 and 12
    np.testing.assert_allclose(np.concatenate(pieces), whole, rtol=1e-4, atol=1e-4 * np.abs(whole).max())
