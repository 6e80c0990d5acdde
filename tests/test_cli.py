"""``python -m qwen3moe`` as a user runs it: in a subprocess, on synthetic model folders.

Two folders are used: the session's random tiny model (``tiny_model_dir``), and a "flat" copy whose lm_head is all
zeros, so every logit is 0. On the flat model the answers are known by hand: greedy decoding always picks token 0
(the NUL byte; ties go to the lower id), sampling is uniform over the vocabulary, and the perplexity of any text is
exactly the vocabulary size.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from qwen3moe import backends
from qwen3moe.bench import QWEN3_30B_A3B
from qwen3moe.synthetic import TINY_CONFIG, write_checkpoint
from qwen3moe.tokenizer import Qwen3Tokenizer

VOCAB = TINY_CONFIG["vocab_size"]
STATS_LINE = re.compile(r"^\[(\d+) tokens, finish: (length|stop), .*, prompt (\d+) tokens\]$")
TABLE_HEADER = re.compile(r"layer\s+tokens\s+variance")
TABLE_ROW = re.compile(r"^\s*(\d+)\s+(\d+)\s+\S+")


def cli(*args, cwd: Path, env: dict | None = None) -> tuple[int, str, str]:
    """Run ``python -m qwen3moe ARGS``; return (exit status, stdout, stderr)."""
    assert os.environ.get("QWEN3MOE_CACHE"), "conftest.py must point QWEN3MOE_CACHE at a temporary folder"
    full_env = dict(os.environ, PYTHONIOENCODING="utf-8", **(env or {}))
    done = subprocess.run([sys.executable, "-m", "qwen3moe", *map(str, args)], capture_output=True, cwd=cwd,
                          env=full_env, timeout=120)
    return done.returncode, done.stdout.decode("utf-8"), done.stderr.decode("utf-8")


def stats_line(stderr: str) -> tuple[int, str, int]:
    """(generated tokens, finish reason, prompt tokens) from the last line of stderr."""
    match = STATS_LINE.match(stderr.strip().splitlines()[-1])
    assert match, f"no stats line at the end of stderr:\n{stderr}"
    return int(match[1]), match[2], int(match[3])


def assert_one_line_error(status: int, stdout: str, stderr: str) -> str:
    assert status == 1, (status, stderr)
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert lines and lines[0].startswith("qwen3moe: error: "), stderr
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}:\n{stderr}"
    return lines[0]


@pytest.fixture(scope="module")
def flat_model_dir(tmp_path_factory, _tiny_tensors) -> Path:
    tensors = dict(_tiny_tensors, **{"lm_head.weight": np.zeros_like(_tiny_tensors["lm_head.weight"])})
    return write_checkpoint(tmp_path_factory.mktemp("flat") / "model", dict(TINY_CONFIG), tensors, shards=2)


# --- generate -----------------------------------------------------------------------------------------------------


def test_generate_greedy_on_the_flat_model(flat_model_dir, tmp_path):
    status, out, err = cli("generate", "--model", flat_model_dir, "--raw", "abc", "--max-steps", "5", cwd=tmp_path)
    assert status == 0, err
    assert out == "\x00" * 5 + "\n"  # all logits equal: argmax is token 0, five times
    assert stats_line(err) == (5, "length", 3)  # "abc" is 3 byte tokens


def test_generate_streams_what_the_model_predicts(tiny_model_dir, tmp_path, compute_logits):
    """stdout is the greedy continuation, recomputed here without a KV cache (full prefill at every step)."""
    status, out, err = cli("generate", "--model", tiny_model_dir, "--raw", "abc", "--max-steps", "5", cwd=tmp_path)
    assert status == 0, err
    generated, finish, prompt_len = stats_line(err)
    assert prompt_len == 3 and 1 <= generated <= 5
    assert finish == "stop" or (finish == "length" and generated == 5)  # an end token may be the 5th: "stop", 5

    tok = Qwen3Tokenizer(tiny_model_dir)
    ids, new, gaps = list(b"abc"), [], []
    for _ in range(5):
        logits = compute_logits(tiny_model_dir, ids)[-1]
        token = int(np.argmax(logits))
        top2 = np.sort(logits)[-2:]
        gaps.append(float(top2[1] - top2[0]))
        if token in tok.eos_token_ids:
            break
        ids.append(token)
        new.append(token)
    if min(gaps) < 1e-4:
        pytest.skip(f"a near tie between the two best tokens ({min(gaps):.1e}) makes greedy order-sensitive")
    assert generated == len(new) + (finish == "stop")
    assert out == tok.decode(new) + "\n"


@pytest.mark.parametrize("thinking_flag, think_block", [([], ""), (["--no-thinking"], "<think>\n\n</think>\n\n")])
def test_generate_wraps_the_prompt_in_the_chat_template(flat_model_dir, tmp_path, thinking_flag, think_block):
    status, _, err = cli("generate", "--model", flat_model_dir, "abc", "--max-steps", "1", *thinking_flag,
                         cwd=tmp_path)
    assert status == 0, err
    # specials are one token each, everything else one token per byte
    prompt = "<|im_start|>user\nabc<|im_end|>\n<|im_start|>assistant\n" + think_block
    specials = re.findall(r"<\|im_start\|>|<\|im_end\|>|</?think>", prompt)
    expected = len(specials) + len(re.sub(r"<\|im_start\|>|<\|im_end\|>|</?think>", "", prompt).encode())
    assert stats_line(err)[2] == expected


def test_stats_prints_one_row_per_moe_layer(tiny_model_dir, tmp_path):
    status, out, err = cli("generate", "--model", tiny_model_dir, "--raw", "abcd", "--max-steps", "4", "--stats",
                           cwd=tmp_path)
    assert status == 0, err
    generated, _, prompt_len = stats_line(err)
    lines = out.splitlines()
    header = next(i for i, line in enumerate(lines) if TABLE_HEADER.search(line))
    rows = [TABLE_ROW.match(line) for line in lines[header + 1:]]
    rows = [r for r in rows if r]
    assert [int(r[1]) for r in rows] == [1, 2]  # TINY_CONFIG: layer 0 is dense, layers 1 and 2 are MoE
    # every token fed to the model is routed once per MoE layer: the prompt and all but the last generated token
    assert [int(r[2]) for r in rows] == [prompt_len + generated - 1] * 2


def test_stats_table_starts_on_its_own_line(flat_model_dir, tmp_path):
    status, out, err = cli("generate", "--model", flat_model_dir, "--raw", "abc", "--max-steps", "3", "--stats",
                           cwd=tmp_path)
    assert status == 0, err
    assert out.startswith("\x00" * 3 + "\n")
    assert any(TABLE_HEADER.match(line.strip()) for line in out.splitlines())


def test_seed_makes_sampling_reproducible(flat_model_dir, tmp_path):
    """On the flat model sampling is uniform over 384 ids: two seeds agree on 20 draws with probability ~1e-50."""
    def run(seed):
        status, out, err = cli("generate", "--model", flat_model_dir, "--raw", "abc", "--max-steps", "20",
                               "--temperature", "1", "--topk", "0", "--seed", seed, cwd=tmp_path)
        assert status == 0, err
        return out, stats_line(err)[0]

    first = run(11)
    assert run(11) == first
    assert run(12) != first


# --- info -----------------------------------------------------------------------------------------------------------


def file_tensor_sizes(folder: Path) -> dict[str, int]:
    """name -> element count of every tensor in the folder's safetensors files (read by the safetensors package)."""
    sizes = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(str(f), framework="numpy") as st:
            for name in st.keys():
                sizes[name] = math.prod(st.get_slice(name).get_shape())
    return sizes


def info_fields(out: str) -> dict[str, str]:
    return {line[:18].strip(): line[18:] for line in out.splitlines()}


def test_info_describes_the_model(tiny_model_dir, tmp_path):
    status, out, err = cli("info", tiny_model_dir, cwd=tmp_path)
    assert status == 0, err
    fields = info_fields(out)
    assert fields["model type"].split()[0] == "qwen3_moe"
    assert fields["layers"].startswith("3: 2 MoE, 1 dense")
    assert "[D M M]" in fields["layers"]
    assert fields["experts"].startswith("8 per MoE layer, top-2")
    assert "4 query heads / 2 kv heads, head_dim 24" in fields["attention"]

    sizes = file_tensor_sizes(tiny_model_dir)
    total = sum(sizes.values())
    experts = sum(n for name, n in sizes.items() if ".mlp.experts." in name)
    active = total - experts * (1 - 2 / 8)  # top-2 of 8 experts run per token
    assert fields["parameters"] == f"{total:,} total, {int(active):,} active per token"
    assert fields["weights"].endswith("in bfloat16")
    assert fields["tokenizer"].startswith("261 tokens, eos ids [258]")


def test_info_counts_tied_embeddings_once(make_model_dir, tiny_config, tiny_tensors, tmp_path):
    """A tied folder that still stores lm_head.weight: the copy in the file is not a parameter of the model."""
    tensors = dict(tiny_tensors, **{"lm_head.weight": tiny_tensors["model.embed_tokens.weight"]})
    folder = make_model_dir(tensors=tensors, config=tiny_config | {"tie_word_embeddings": True})
    status, out, err = cli("info", folder, cwd=tmp_path)
    assert status == 0, err

    sizes = file_tensor_sizes(folder)
    total = sum(sizes.values()) - sizes["lm_head.weight"]
    assert info_fields(out)["parameters"].startswith(f"{total:,} total")
    # guard: counting lm_head would change the printed figure
    assert f"{total / 1e6:,.2f}" != f"{(total + sizes['lm_head.weight']) / 1e6:,.2f}"


def test_info_without_a_folder_never_writes_into_home(tmp_path):
    home, cache = tmp_path / "home", tmp_path / "cache"
    home.mkdir()
    status, out, err = cli("info", cwd=tmp_path, env={"HOME": str(home), "QWEN3MOE_CACHE": str(cache)})
    assert status == 0, err
    assert list(home.iterdir()) == []
    bundled = Path(__file__).resolve().parent.parent / "data" / "qwen3-moe-shakespeare" / "config.json"
    if not bundled.is_file():  # no bundled model in this checkout: a synthetic one is written into the cache
        assert (cache / "synthetic-tiny" / "config.json").is_file()
        assert str(cache / "synthetic-tiny") in out


def test_info_ndev_prints_the_sharding_plan(tiny_model_dir, tmp_path):
    status, out, err = cli("info", tiny_model_dir, "--ndev", "2", cwd=tmp_path)
    assert status == 0, err
    rows = [line.split() for line in out.splitlines() if re.match(r"^\s+\d+\s", line)]
    # rank, q heads, kv heads, mlp rows, experts, lm_head rows: TINY_CONFIG has 4/2 heads, 8 experts, 384 tokens
    assert [row[:6] for row in rows] == [["0", "0-1", "0", "0-63", "0-3", "(4)"],
                                         ["1", "2-3", "1", "64-127", "4-7", "(4)"]]
    assert [row[6] for row in rows] == ["0-191", "192-383"]
    assert "6 all-reduces" in out  # after attention and after the MLP/MoE block of each of the 3 layers
    status, out, err = cli("info", tiny_model_dir, "--ndev", "2", "--experts", "etp", cwd=tmp_path)
    assert status == 0, err
    assert "all 8, rows 0-15" in out and "all 8, rows 16-31" in out


def test_info_ndev_needs_only_config_json(tmp_path):
    """A plan for Qwen3-30B-A3B before downloading its 61 GB: a folder with its config.json is enough."""
    folder = tmp_path / "qwen3-30b-a3b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(QWEN3_30B_A3B))
    status, out, err = cli("info", folder, "--ndev", "4", cwd=tmp_path)
    assert status == 0, err
    assert re.search(r"^\s+3\s+24-31\s+3\s+96-127 \(32\)\s+113952-151935\s+15\.75 GB", out, re.MULTILINE), out


@pytest.mark.parametrize("extra, words", [
    (["--ndev", "3"], ["cannot split this model over ndev=3", "num_attention_heads 4 is not a multiple of 3",
                       "ndev values that work: 1, 2, 4"]),
    (["--experts", "etp"], ["give --ndev N as well"]),
])
def test_info_ndev_refusals(tiny_model_dir, tmp_path, extra, words):
    line = assert_one_line_error(*cli("info", tiny_model_dir, *extra, cwd=tmp_path))
    for w in words:
        assert w in line


# --- bench ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flag", ["--step-ms", "--timeline"])
@pytest.mark.parametrize("where", [[], ["--nvidia", "--ndev", "1,2"]], ids=["cpu", "ndev"])
def test_batch_one_step_timings_outside_one_gpu_are_refused_with_the_reason(tmp_path, where, flag):
    """``bench --step-ms`` and ``--timeline`` time one GPU's captured step: asked of the CPU bench or of several
    GPUs, they say so before loading anything (a silently ignored flag would print another benchmark's table)."""
    status, _, err = cli("bench", flag, "32", *where, cwd=tmp_path)
    assert status != 0
    assert err.strip().splitlines()[-1] == (f"qwen3moe: error: {flag} times the batch-1 step of one GPU: use it "
                                            "with --nvidia and without --ndev")


@pytest.mark.parametrize("extra, words", [
    (["--batch", "0"], "--batch takes whole numbers >= 1 separated by commas (e.g. 1,8), got '0'"),
    (["--batch", "1,x"], "--batch takes whole numbers >= 1 separated by commas (e.g. 1,8), got '1,x'"),
    (["--nvidia", "--step-ms", "32,-5"], "--step-ms takes whole numbers >= 1"),
    (["--steps", "0"], "--steps must be a whole number >= 1, got 0"),
    (["--prompt-len", "-5"], "--prompt-len must be a whole number >= 1, got -5"),
    (["--synthetic", "qwen3-30b-a3b", "--layers", "0"], "--layers must be a whole number >= 1, got 0"),
    (["--interleave", "-1"], "--interleave must be a whole number >= 0, got -1"),
])
def test_bad_bench_numbers_are_refused_before_anything_runs(tmp_path, extra, words):
    """A batch of 0 tokens, no timed steps or an empty prompt have no speed to measure (they used to end in a
    reshape error or a division by zero); --layers 0 used to run the default 2."""
    line = assert_one_line_error(*cli("bench", *extra, cwd=tmp_path))
    assert words in line


def test_interleaved_bench_reports_each_round_and_the_medians(tiny_model_dir, tmp_path):
    """``bench --interleave 3``: one row per round (each backend in its own process), then the medians; the ratio
    column is each round's greedy speed over the reference's, and the median row the median of each column."""
    backends_ = "numpy,numba" if backends.unavailable_reason("numba") is None else "numpy"
    status, out, err = cli("bench", "--model", tiny_model_dir, "--steps", 2, "--batch", 1, "--prompt-len", 4,
                           "--interleave", 3, "--backends", backends_, cwd=tmp_path)
    assert status == 0, err
    lines = out.strip().splitlines()
    rows = [line.split() for line in lines[2:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "median"]
    values = np.array([[float(v) for v in r[1:]] for r in rows])  # (4, columns)
    assert values.shape[1] == (4 if backends_ == "numpy,numba" else 1), lines[1]
    assert (values > 0).all()
    np.testing.assert_allclose(values[3], np.median(values[:3], axis=0), atol=0.051)
    if backends_ == "numpy,numba":  # numpy decode b1, numba decode b1, numba greedy b1, greedy / numpy
        np.testing.assert_allclose(values[:3, 3], values[:3, 2] / values[:3, 0], rtol=0.01, atol=0.06)


# --- perplexity -----------------------------------------------------------------------------------------------------


def test_perplexity_prints_a_finite_number(tiny_model_dir, tmp_path):
    text = tmp_path / "held_out.txt"
    text.write_text("To be, or not to be: that is the question. — 你好\n", encoding="utf-8")
    status, out, err = cli("perplexity", "--model", tiny_model_dir, text, cwd=tmp_path)
    assert status == 0, err
    match = re.fullmatch(r"perplexity (\S+) over 1 file\(s\)\n", out)
    assert match, out
    ppl = float(match[1])
    assert math.isfinite(ppl) and ppl > 1


def test_perplexity_of_the_flat_model_is_the_vocabulary_size(flat_model_dir, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("abc def", encoding="utf-8")
    second.write_text("héllo 🙂", encoding="utf-8")
    status, out, err = cli("perplexity", "--model", flat_model_dir, first, second, cwd=tmp_path)
    assert status == 0, err
    assert out == f"perplexity {VOCAB:.4f} over 2 file(s)\n"


# --- errors ---------------------------------------------------------------------------------------------------------


NO_GPU = pytest.mark.skipif(backends.unavailable_reason("cupy") is None, reason="a GPU is present: --nvidia works")


@pytest.mark.parametrize("extra, words", [
    pytest.param(["--nvidia"], ["nvidia device", "cupy", "--cpu"], marks=NO_GPU),
    (["--ascend"], ["ascend devices are not supported", "--cpu"]),
    (["--cambricon"], ["cambricon devices are not supported", "--cpu"]),
    (["--backend", "nonsense"], ["unknown backend 'nonsense'", "numpy"]),
    (["--temperature", "-1"], ["temperature must be a finite number >= 0", "got -1.0"]),
    (["--topp", "2"], ["topp must be in (0, 1]", "got 2.0"]),
    (["--topk", "-3"], ["topk must be an integer >= 0", "got -3"]),
    (["--max-steps", "0"], ["max_steps must be >= 1"]),
    (["--max-tokens", "100000"], ["max_tokens must be in 1..512"]),
    (["--seed", "-1"], ["seed must be a whole number >= 0", "got -1"]),
    (["--experts", "etp"], ["--experts etp places experts on several GPUs", "--nvidia N (N >= 2)"]),
])
def test_bad_generate_settings(tiny_model_dir, tmp_path, extra, words):
    line = assert_one_line_error(*cli("generate", "--model", tiny_model_dir, "--raw", "abc", *extra, cwd=tmp_path))
    for w in words:
        assert w in line


@pytest.mark.parametrize("command", ["generate", "info", "perplexity"])
def test_missing_model_folder(tmp_path, command):
    missing = tmp_path / "no-such-model"
    args = {"generate": ["generate", "--model", missing, "hi"], "info": ["info", missing],
            "perplexity": ["perplexity", "--model", missing, tmp_path / "x.txt"]}[command]
    line = assert_one_line_error(*cli(*args, cwd=tmp_path))
    assert str(missing) in line


def test_prompt_longer_than_max_tokens(tiny_model_dir, tmp_path):
    line = assert_one_line_error(*cli("generate", "--model", tiny_model_dir, "--raw", "0123456789abcdefghij",
                                      "--max-tokens", "8", cwd=tmp_path))
    assert "20 tokens do not fit in a KV cache of 8 positions" in line


@pytest.fixture
def missing_expert_dir(make_model_dir, tiny_tensors):
    gone = "model.layers.2.mlp.experts.6.gate_proj.weight"
    return make_model_dir(tensors={n: w for n, w in tiny_tensors.items() if n != gone})


@pytest.mark.parametrize("command", ["generate", "info"])
def test_missing_expert_tensor(missing_expert_dir, tmp_path, command):
    args = ["generate", "--model", missing_expert_dir, "hi"] if command == "generate" else ["info", missing_expert_dir]
    status, out, err = cli(*args, cwd=tmp_path)
    assert status == 1
    assert "Traceback" not in err
    assert err.startswith("qwen3moe: error: ")
    assert "model.layers.2.mlp.experts.6.gate_proj.weight (layer 2, expert 6, gate_proj)" in err


def test_weight_problems_are_one_summary_line_then_the_list(missing_expert_dir, tmp_path):
    status, out, err = cli("info", missing_expert_dir, cwd=tmp_path)
    assert status == 1 and "Traceback" not in err
    first, *rest = err.strip().splitlines()
    assert first.startswith("qwen3moe: error: ") and first.endswith("the weights do not match config.json:")
    assert any(line.strip() == "model.layers.2.mlp.experts.6.gate_proj.weight (layer 2, expert 6, gate_proj)"
               for line in rest)


def test_unreadable_and_too_short_texts_for_perplexity(tiny_model_dir, tmp_path):
    line = assert_one_line_error(*cli("perplexity", "--model", tiny_model_dir, tmp_path / "absent.txt",
                                      cwd=tmp_path))
    assert "cannot read" in line and "absent.txt" in line
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    line = assert_one_line_error(*cli("perplexity", "--model", tiny_model_dir, short, cwd=tmp_path))
    assert "two or more tokens" in line


def test_unsupported_config_is_a_clean_error(make_model_dir, tmp_path):
    folder = make_model_dir()
    config = json.loads((folder / "config.json").read_text()) | {"rope_scaling": {"rope_type": "yarn", "factor": 4}}
    (folder / "config.json").write_text(json.dumps(config))
    line = assert_one_line_error(*cli("info", folder, cwd=tmp_path))
    assert "rope scaling 'yarn' is not implemented" in line
