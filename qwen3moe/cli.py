"""The command line: ``python -m qwen3moe {generate,info,perplexity,backends}``.

    python -m qwen3moe generate "ROMEO:"                     # the bundled model, greedy unless configured otherwise
    python -m qwen3moe generate --model DIR --cpu --temperature 0.7 --topk 50 --topp 0.8 --stats "Hello"
    python -m qwen3moe info DIR                              # validate a folder, print its architecture and size
    python -m qwen3moe info DIR --ndev 4 [--experts etp]     # how its weights would be split over 4 GPUs
    python -m qwen3moe perplexity --model DIR held_out.txt
    python -m qwen3moe generate --nvidia 4 --experts etp "Hello"  # split over 4 GPUs, one process each
    python -m qwen3moe backends                              # which backends can run here, and why not

Errors in the model folder, the settings or the device end the program with status 1 and a message on stderr that
starts with ``qwen3moe: error:`` (one sentence; a folder whose weights do not match adds the list of problems).
"""

import argparse
import sys
import time
from pathlib import Path

from .bundled import default_model_dir
from .causal_lm import Qwen3MoeForCausalLM
from .config import load_config
from .debug import NonFiniteError
from .backends import BACKENDS, unavailable_reason
from .errors import CheckpointError, DeviceError, RankFailure, UnsupportedConfigError
from .sharding import plan_sharding


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (CheckpointError, UnsupportedConfigError, DeviceError, RankFailure, ValueError, NonFiniteError) as e:
        print(f"qwen3moe: error: {e}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m qwen3moe", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    gen = commands.add_parser("generate", help="generate text, streamed as it is produced")
    gen.add_argument("prompt", help="the user's message (or raw text with --raw)")
    _model_arguments(gen)
    gen.add_argument("--max-steps", type=int, default=128, help="new tokens at most (default 128)")
    gen.add_argument("--temperature", type=float, help="0 is greedy (default: generation_config.json)")
    gen.add_argument("--topk", type=int, help="keep the k most likely tokens, 0 keeps all")
    gen.add_argument("--topp", type=float, help="keep the smallest set with this much probability, in (0, 1]")
    gen.add_argument("--seed", type=int, help="seed for sampling, for reproducible text")
    style = gen.add_mutually_exclusive_group()
    style.add_argument("--chat", dest="chat", action="store_true", default=True,
                       help="wrap the prompt in the model's chat template (default)")
    style.add_argument("--raw", dest="chat", action="store_false", help="continue the prompt text as it is")
    gen.add_argument("--no-thinking", dest="enable_thinking", action="store_const", const=False,
                     help="Qwen3's enable_thinking=False: skip the <think> block")
    gen.add_argument("--stats", action="store_true", help="print per-layer router statistics at the end")
    gen.set_defaults(run=run_generate)

    info = commands.add_parser("info", help="validate a model folder and describe it")
    info.add_argument("model", nargs="?", type=Path, help="model folder (default: the bundled model)")
    info.add_argument("--ndev", type=int, metavar="N",
                      help="print how the weights would be split over N GPUs (reads config.json only)")
    info.add_argument("--experts", choices=["ep", "etp"],
                      help="with --ndev: whole experts per GPU (ep, default) or a slice of every expert (etp)")
    info.set_defaults(run=run_info)

    ppl = commands.add_parser("perplexity", help="perplexity of the model on text files")
    ppl.add_argument("files", nargs="+", type=Path, help="UTF-8 text files, each scored as one text")
    _model_arguments(ppl)
    ppl.add_argument("--window", type=int, help="tokens per scored window (default: --max-tokens)")
    ppl.set_defaults(run=run_perplexity)

    bench = commands.add_parser("bench", help="prefill/decode speed of each backend against memory bandwidth")
    bench.add_argument("--model", type=Path, help="model folder (default: the bundled model)")
    bench.add_argument("--synthetic", choices=["qwen3-30b-a3b", "qwen3-235b-a22b"],
                       help="a synthetic checkpoint with real shapes")
    bench.add_argument("--layers", type=int, help="layers of the synthetic model (default 2; --nvidia: all 48)")
    bench.add_argument("--nvidia", action="store_true",
                       help="the cupy backend on one GPU: Qwen3-30B-A3B shapes, against transformers and the copy "
                            "bandwidth")
    bench.add_argument("--ndev", help="with --nvidia: GPU counts to compare, e.g. 1,2,4 (a model split over them)")
    bench.add_argument("--experts", help="with --ndev: placements to compare, ep and/or etp (default both)")
    bench.add_argument("--step-ms", metavar="CACHED",
                       help="with --nvidia: only the captured batch-1 step, ms a token after each of these numbers of "
                            "cached positions (e.g. 32,2048), on random weights made on the GPU (no transformers): "
                            "for comparing two versions of the kernels")
    bench.add_argument("--timeline", metavar="CACHED",
                       help="with --nvidia: what each kernel adds to the captured batch-1 step after each of these "
                            "numbers of cached positions, timed inside the step (kernels compiled with timing marks; "
                            "fastpath/timeline.py), on the random weights of --step-ms")
    bench.add_argument("--backends", help="comma-separated, each with a precision if not float32, e.g. "
                       "numpy,numba,numba:bf16 (default: every available backend)")
    bench.add_argument("--prompt-len", type=int, default=128, help="prefill length (default 128)")
    bench.add_argument("--steps", type=int, default=32, help="timed decode steps (default 32)")
    bench.add_argument("--batch", default="1,8", help="decode batch sizes (default 1,8)")
    bench.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                       help="CPU: batch-1 decoding of each backend in its own process, ROUNDS times, the backends "
                            "alternating; every round and the medians (steadier ratios on a drifting machine)")
    bench.add_argument("--json", action="store_true", help="print the results as JSON")
    bench.set_defaults(run=run_bench)

    listing = commands.add_parser("backends", help="list the backends and whether they can run here")
    listing.set_defaults(run=run_backends)
    return parser


def _model_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", type=Path, help="Hugging Face model folder (default: the bundled model)")
    device = p.add_mutually_exclusive_group()
    device.add_argument("--cpu", dest="device", action="store_const", const="cpu", help="run on the CPU (default)")
    device.add_argument("--nvidia", dest="ndev", type=int, nargs="?", const=1, metavar="N",
                        help="run on N NVIDIA GPUs")
    device.add_argument("--ascend", dest="device", action="store_const", const="ascend", help=argparse.SUPPRESS)
    device.add_argument("--cambricon", dest="device", action="store_const", const="cambricon",
                        help=argparse.SUPPRESS)
    p.add_argument("--backend", default="auto",
                   help=f"auto (the fastest here, or $QWEN3MOE_BACKEND) or one of: {', '.join(BACKENDS)}")
    p.add_argument("--experts", choices=["ep", "etp"],
                   help="with --nvidia N: whole experts per GPU (ep, default) or a slice of every expert (etp)")
    p.add_argument("--max-tokens", type=int, help="KV cache positions per sequence (default 4096)")
    p.add_argument("--precision", choices=["float32", "bf16"], default="float32",
                   help="float32 (default): results within ~1e-5 of the reference; bf16: bf16 activations, at "
                        "bf16 accuracy, where they bound the time: the tensor cores' prefill (cupy), decoding "
                        "with AVX512-BF16 (numba)")
    p.add_argument("--debug", action="store_true", help="log every step, check for NaN/Inf, show expert choices")


def load_model(args) -> Qwen3MoeForCausalLM:
    if args.experts is not None and (args.ndev or 1) < 2:
        raise ValueError(f"--experts {args.experts} places experts on several GPUs: give --nvidia N (N >= 2) as well")
    device = "nvidia" if args.ndev is not None else args.device  # None: the --backend's device (CPU for auto)
    return Qwen3MoeForCausalLM(args.model, device=device, ndev=args.ndev or 1, max_tokens=args.max_tokens,
                               backend=args.backend, debug=args.debug, experts=args.experts or "ep",
                               precision=args.precision)


def run_generate(args) -> int:
    model = load_model(args)
    start = time.perf_counter()
    _, ms_per_token = model.generate(args.prompt, args.max_steps, args.temperature, args.topk, args.topp,
                                     chat=args.chat, enable_thinking=args.enable_thinking, seed=args.seed,
                                     stream=lambda piece: print(piece, end="", flush=True))
    total = time.perf_counter() - start
    print()  # end the streamed text's line
    task = model.last_task
    speed = f"{1e3 / ms_per_token:.1f} tokens/s decode" if ms_per_token else "no decode steps"
    print(f"[{len(task.generated)} tokens, finish: {task.finish_reason}, {speed}, {total:.2f} s in all, "
          f"prompt {task.prompt_len} tokens]", file=sys.stderr)
    if args.stats:
        model.print_router_stats()
    model.destroy_model_instance()  # a model split over GPUs ends its other ranks
    return 0


def run_info(args) -> int:
    if args.ndev is not None or args.experts is not None:
        return run_sharding_plan(args)
    model = Qwen3MoeForCausalLM(args.model)  # loading validates every tensor name and shape
    c, w = model.config, model.weights
    arrays = w.arrays()
    total_params = sum(a.size for a in arrays)
    total_bytes = sum(a.nbytes for a in arrays)
    dtypes = sorted({a.dtype.name for a in arrays})
    expert_params = sum(e.size for layer in w.layers if hasattr(layer.mlp, "experts")
                        for mlp in layer.mlp.experts for e in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
    active = total_params - expert_params * (1 - c.num_experts_per_tok / c.num_experts) if c.num_experts else \
        total_params
    kinds = c.layer_types
    print(f"model folder      {model.model_dir}")
    print(f"model type        {c.model_type}  (validated: every tensor present with the right shape)")
    print(f"layers            {c.num_hidden_layers}: {kinds.count('moe')} MoE, {kinds.count('dense')} dense  "
          f"[{' '.join('M' if k == 'moe' else 'D' for k in kinds)}]")
    if c.num_experts:
        print(f"experts           {c.num_experts} per MoE layer, top-{c.num_experts_per_tok}, moe_intermediate_size "
              f"{c.moe_intermediate_size}, norm_topk_prob {str(c.norm_topk_prob).lower()}")
    print(f"attention         {c.num_attention_heads} query heads / {c.num_key_value_heads} kv heads, head_dim "
          f"{c.head_dim}, rope_theta {c.rope_theta:g}")
    print(f"hidden size       {c.hidden_size}, dense intermediate {c.intermediate_size}, vocab {c.vocab_size}, "
          f"tied embeddings {str(c.tie_word_embeddings).lower()}")
    print(f"parameters        {total_params:,} total, {int(active):,} active per token")
    print(f"weights           {total_bytes / 2**20:,.1f} MiB in {', '.join(dtypes)}")
    print(f"context           max_position_embeddings {c.max_position_embeddings}")
    print(f"tokenizer         {model.tokenizer.vocab_size} tokens, eos ids {list(model.tokenizer.eos_token_ids)}, "
          f"chat template {'yes' if model.tokenizer.chat_template else 'no'}")
    return 0


def run_sharding_plan(args) -> int:
    """The plan needs only config.json, so a model can be planned for before its weights are downloaded."""
    if args.ndev is None:
        raise ValueError("--experts chooses how --ndev GPUs share the experts: give --ndev N as well")
    model_dir = args.model or default_model_dir()
    plan = plan_sharding(load_config(model_dir), args.ndev, args.experts or "ep")
    print(f"model folder      {model_dir}")
    print(plan.format_table())
    return 0


def run_bench(args) -> int:
    """The CPU benchmark (qwen3moe/bench.py), or with --nvidia the GPU one, which lives with the CUDA backend."""
    import importlib

    for flag, value, least in (("--layers", args.layers, 1), ("--prompt-len", args.prompt_len, 1),
                               ("--steps", args.steps, 1), ("--interleave", args.interleave, 0)):
        if value is not None and value < least:
            raise ValueError(f"{flag} must be a whole number >= {least}, got {value}")
    for flag, text in (("--batch", args.batch), ("--ndev", args.ndev), ("--step-ms", args.step_ms),
                       ("--timeline", args.timeline)):
        if text is not None and not all(n.strip().isdigit() and int(n) >= 1 for n in text.split(",")):
            raise ValueError(f"{flag} takes whole numbers >= 1 separated by commas (e.g. 1,8), got {text!r}")
    if args.nvidia and args.interleave:
        raise ValueError("--interleave times the CPU backends; the GPU bench (--nvidia) compares ours and "
                         "transformers in one process already")
    for flag, value in (("--step-ms", args.step_ms), ("--timeline", args.timeline)):
        if value and (not args.nvidia or args.ndev):
            raise ValueError(f"{flag} times the batch-1 step of one GPU: use it with --nvidia and without --ndev")
    module = "qwen3moe.bench" if not args.nvidia else "fastpath.multi_gpu_bench" if args.ndev else "fastpath.cupy_bench"
    return importlib.import_module(module).run(args)


def run_backends(args) -> int:
    for name, b in BACKENDS.items():
        reason = unavailable_reason(name)
        print(f"{name:<7} {b.device:<7} {'available' if reason is None else 'unavailable'}  "
              f"{b.summary if reason is None else reason}")
    return 0


def run_perplexity(args) -> int:
    model = load_model(args)
    texts = []
    for f in args.files:
        try:
            texts.append(f.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read {f}: {e}") from None
    ppl = model.perplexity(texts, window=args.window)
    print(f"perplexity {ppl:.4f} over {len(texts)} file(s)")
    return 0
