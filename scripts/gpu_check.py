"""Every GPU check in one command, for an offline CUDA node (at most ~8 minutes on one GPU).

The node is assumed to have a recent torch (any version: our CPU pin does not apply there),
transformers, peft, safetensors, rich, matplotlib, pytest and hypothesis, but no network, no hub
and no model files. flexlora itself is installed from the source tree beside this script; the few
small pure-Python wheels it needs beyond that come from a local folder prepared where there is a
network (about 2 MB):

    pip download --no-deps -d gpu_wheels rouge-score==0.1.2 absl-py nltk tomli-w gguf joblib regex click tqdm
    python scripts/gpu_check.py --wheels gpu_wheels          # on the GPU node

Models are built from configs with random weights (SmolLM2-135M's shape and a 1.3B Llama: hidden
2048, 24 layers, the shape of the paper's Data-Juicer LLaMA-1.3B) with a byte-level BPE tokenizer
trained in-process, saved as local HF folders, so every load goes through the real loading code.

It (a) runs the tests marked ``gpu``; (b) runs a short federated run of a tiny model on CUDA and
on the CPU and compares the final global adapters; (c) measures local-training tokens/s on CUDA
for both shapes at each of the paper's resource types against a bare PEFT + torch loop on the same
batches; (d) times FlexLoRA aggregation at LLaMA-2-7B shapes (10 clients of the paper's types) on
the GPU against the dense CPU reference. Everything lands in ``benchmarks/results/gpu_check.json``
(``--out`` to change), also when a part fails (its error is recorded).

    python scripts/gpu_check.py [--wheels DIR] [--skip tests,federated,training,aggregation] [--cpu-dry-run]

``--cpu-dry-run`` runs every part on the CPU with small shapes: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
NEEDED = {"rouge_score": "rouge-score", "absl": "absl-py", "nltk": "nltk", "tomli_w": "tomli-w", "gguf": "gguf"}
PAPER_TYPES = {"type1": (8, 8), "type2": (30, 30), "type3": (30, 200), "type4": (200, 200)}
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama-1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- set-up ------------------------------------------------------------------------------------------
def install(wheels: Path | None) -> list[str]:
    """flexlora from this tree (no deps), plus the small wheels that are missing, from ``wheels``."""
    log = []
    if importlib.util.find_spec("flexlora") is None or not str(importlib.util.find_spec("flexlora").origin).startswith(str(ROOT)):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(ROOT)], check=True)
        log.append("pip install --no-deps -e .")
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing:
        if wheels is None:
            raise SystemExit(f"gpu_check: missing {missing}; prepare a wheel folder (see the docstring) and pass --wheels DIR")
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--find-links", str(wheels), *missing], check=True)
        log.append(f"installed from {wheels}: {missing}")
    importlib.invalidate_caches()
    return log


def build_tokenizer():
    """A byte-level BPE tokenizer trained in-process (any text encodes; no download)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.",
        "### Instruction:\n### Input:\n### Response:\n The quick brown fox jumps over the lazy dog.",
        "Translate the sentence into French. Answer the question with yes or no. Classify the sentiment.",
    ] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<pad>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_random_model(folder: Path, shape: dict[str, Any], tokenizer, seed: int = 0) -> Path:
    """A random Llama of the given shape (embeddings sized to ``shape['vocab_size']``) as a local HF folder."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if shape["hidden_size"] > 1024 else torch.float32)
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def environment() -> dict[str, Any]:
    import torch

    versions = {}
    for pkg in ("torch", "transformers", "peft", "safetensors", "flwr", "flexlora"):
        try:
            from importlib.metadata import version

            versions[pkg] = version(pkg)
        except Exception:  # noqa: BLE001 - not installed
            versions[pkg] = None
    dev = {}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda, "bf16": torch.cuda.is_bf16_supported()}
    return {"versions": versions, "device": dev, "python": platform.python_version(), "cpus": os.cpu_count(), "load_average": os.getloadavg(), "command": " ".join(sys.argv)}


# -- (a) the gpu-marked tests -------------------------------------------------------------------------
def part_tests(dry: bool) -> dict[str, Any]:
    marker = "gpu" if not dry else "not slow"
    args = [sys.executable, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider", str(ROOT / "tests" / "test_device.py")]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    return {"command": " ".join(args[1:]), "returncode": proc.returncode, "seconds": time.perf_counter() - t0, "tail": tail, "passed": proc.returncode == 0}


# -- (b) the same federated run on CUDA and on the CPU ------------------------------------------------
def part_federated(work: Path, tokenizer, device: str) -> dict[str, Any]:
    """Both runs in float32 with TF32 off; the CPU and CUDA kernels still sum in other orders, so the
    global adapters agree to float32 rounding amplified by training (AdamW normalises each gradient
    entry, so a 1e-7 difference in a tiny gradient can move its entry by up to lr). The tolerance,
    1e-3 relative in Frobenius norm of the global update, is far above that and far below any real
    difference (a different seed or a missed client gives ~1e-1)."""
    import torch
    from safetensors.torch import load_file

    from flexlora.cli import main as flexlora

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tiny = save_random_model(work / "tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)), tokenizer)
    common = [
        "--config", str(ROOT / "configs" / "smoke.toml"), "--quiet",
        "--set", f'model.source="{tiny}"', "--set", 'model.dtype="float32"', "--set", "train.lora_dropout=0.0",
    ]
    out, seconds = {}, {}
    for label, dev in (("cpu", "cpu"), ("accelerator", device)):
        t0 = time.perf_counter()
        code = flexlora(["run", "--out", str(work / f"fed-{label}"), "--device", dev, "--set", f'federation.server_device="{dev}"', *common])
        seconds[label] = time.perf_counter() - t0
        if code != 0:
            raise RuntimeError(f"flexlora run on {dev} exited {code}")
        summary = json.loads((work / f"fed-{label}" / "summary.json").read_text())
        out[label] = {"device": dev, "summary": {k: summary[k] for k in ("tokens", "final_train_loss", "rouge_l_weighted", "dropped_updates")}}

    def global_delta(run: Path) -> dict[str, Any]:
        t = load_file(str(run / "final" / "global" / "adapter_model.safetensors"))
        names = sorted({k.rsplit(".lora_", 1)[0] for k in t})
        return {n: t[f"{n}.lora_B.weight"].double() @ t[f"{n}.lora_A.weight"].double() for n in names}

    a, b = global_delta(work / "fed-cpu"), global_delta(work / "fed-accelerator")
    num = sum(float((a[n] - b[n]).square().sum()) for n in a)
    den = sum(float(a[n].square().sum()) for n in a)
    rel = (num / den) ** 0.5 if den else 0.0
    return {"seconds": seconds, "runs": out, "rel_fro_diff_global_update": rel, "tolerance": 1e-3, "passed": rel < 1e-3 and a.keys() == b.keys()}


# -- (c) local-training throughput --------------------------------------------------------------------
def _examples(n: int, seed: int):
    from flexlora.data.types import ClientData, Example

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog answer question translate sentence classify review summary article".split()
    exs = [Example(f"Task {i}: " + " ".join(rng.choices(words, k=rng.randint(20, 60))), " ".join(rng.choices(words, k=rng.randint(40, 160))), " ".join(rng.choices(words, k=rng.randint(10, 80)))) for i in range(n)]
    return ClientData(0, "synthetic", exs, [], num_train_full=n)


def part_training(work: Path, tokenizer, device: str, dry: bool, deadline: float) -> dict[str, Any]:
    import torch
    from peft import LoraConfig, get_peft_model

    from flexlora.models import ModelConfig, load_model
    from flexlora.resources import target_module_names
    from flexlora.train import LocalTrainer, TrainConfig, collate, plan_batches, to_device, tokenize_client
    from flexlora.update import LoraFactors, ModuleSpec

    steps, warmup = (3, 1) if dry else (8, 2)
    results = []
    shapes = SHAPES if not dry else {"small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)}
    for shape_name, shape in shapes.items():
        folder = save_random_model(work / shape_name, shape, tokenizer)
        model, tok = load_model(ModelConfig(source=str(folder), device=device, dtype="auto"))
        dtype = next(model.parameters()).dtype
        module_shapes = target_module_names(model, TARGETS)
        cfg = TrainConfig(batch_size=4, max_length=512, max_steps=warmup + steps, lr=1e-4, lora_dropout=0.05)
        client = _examples(4 * (warmup + steps), seed=1)
        data = tokenize_client(tok, client, cfg)
        plan = plan_batches([len(ids) for ids, _ in data], cfg, random.Random(0))
        for tname, (r_att, r_mlp) in PAPER_TYPES.items():
            if time.time() > deadline:
                results.append({"shape": shape_name, "type": tname, "skipped": "time budget"})
                continue
            spec = {n: ModuleSpec(rank=min(r_att if "attn" in n else r_mlp, *s), alpha=16.0) for n, s in module_shapes.items()}
            share = {n: LoraFactors(A=torch.randn(sp.rank, module_shapes[n][1]) * 0.01, B=torch.zeros(module_shapes[n][0], sp.rank), scale=sp.scale) for n, sp in spec.items()}
            # ours: the whole client (attach, load share, train, extract, detach) for `warmup` steps and for
            # `warmup + steps` steps on the same batches; the difference is the time of the measured steps
            trainer = LocalTrainer(model, tok, TARGETS, TrainConfig(**{**cfg.__dict__, "max_steps": warmup}))
            short = trainer.train_client(client, spec, share, seed=0)
            trainer.cfg = TrainConfig(**{**cfg.__dict__, "max_steps": warmup + steps})
            long = trainer.train_client(client, spec, share, seed=0)
            model = trainer.model
            ours_tps = (long.metrics["tokens"] - short.metrics["tokens"]) / (long.metrics["seconds"] - short.metrics["seconds"])
            whole_client_tps = long.metrics["tokens"] / long.metrics["seconds"]
            # bare PEFT + torch: full logits, model(**batch, labels=...), same batches and ranks
            ranks = {n: s.rank for n, s in spec.items()}
            r0 = max(set(ranks.values()), key=list(ranks.values()).count)
            peft_model = get_peft_model(model, LoraConfig(r=r0, lora_alpha=16, rank_pattern={n: r for n, r in ranks.items() if r != r0}, target_modules=TARGETS, lora_dropout=0.05, task_type="CAUSAL_LM"))
            opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-4)
            peft_model.train()
            tokens = 0
            for i, step in enumerate(plan):
                if i == warmup:
                    torch.cuda.synchronize() if device != "cpu" else None
                    t0 = time.perf_counter()
                for idx in step:
                    b = to_device(collate([data[j] for j in idx], tok.pad_token_id), model.device)
                    loss = peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
                    loss.backward()
                    if i >= warmup:
                        tokens += int(b["attention_mask"].sum())
                torch.nn.utils.clip_grad_norm_(opt.param_groups[0]["params"], 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
            torch.cuda.synchronize() if device != "cpu" else None
            bare_tps = tokens / (time.perf_counter() - t0)
            model = peft_model.unload()
            del opt, peft_model
            # ours' seconds include warm-up steps: time per step is what is compared, so rescale to the measured steps
            results.append({"shape": shape_name, "dtype": str(dtype), "type": tname, "ranks": [r_att, r_mlp], "ours_tokens_per_s": ours_tps, "ours_whole_client_tokens_per_s": whole_client_tps, "bare_tokens_per_s": bare_tps, "ratio": ours_tps / bare_tps})
        del model
        torch.cuda.empty_cache() if device != "cpu" else None
    return {"note": "tokens/s over the steps after warm-up, same batches and ranks; ours_whole_client includes attach, share loading, warm-up, extraction and detach", "results": results, "passed": all(r.get("ratio", 1.0) >= 1.0 for r in results)}


# -- (d) aggregation at LLaMA-2-7B shapes ------------------------------------------------------------
def part_aggregation(device: str, dry: bool, deadline: float) -> dict[str, Any]:
    import torch

    from flexlora.methods import FlexLoRA
    from flexlora.update import ClientUpdate, LoraFactors, ModuleSpec

    shapes = [(4096, 4096), (11008, 4096), (4096, 11008)] if not dry else [(512, 512), (1024, 512)]
    rng = random.Random(0)
    types = [rng.choice(sorted(PAPER_TYPES)) for _ in range(10)]
    sizes = [rng.randint(16, 520) for _ in range(10)]
    out = []
    for d_out, d_in in shapes:
        if time.time() > deadline:
            out.append({"shape": [d_out, d_in], "skipped": "time budget"})
            continue
        group = 0 if d_out == d_in else 1
        ranks = [PAPER_TYPES[t][group] for t in types]
        g = torch.Generator().manual_seed(d_out * 31 + d_in)
        updates = [
            ClientUpdate(f"c{k}", n, {"m": LoraFactors(A=torch.randn(r, d_in, generator=g) / d_in**0.5, B=torch.randn(d_out, r, generator=g) * 0.02, scale=16.0 / r)})
            for k, (r, n) in enumerate(zip(ranks, sizes))
        ]
        specs = [{"m": ModuleSpec(rank=r, alpha=16.0)} for r in ranks]
        # the dense CPU reference: full dW, full thin SVD, truncation per client (the official release's server step)
        p = [n / sum(sizes) for n in sizes]
        t0 = time.perf_counter()
        dW = sum(pk * u.modules["m"].scale * (u.modules["m"].B @ u.modules["m"].A) for pk, u in zip(p, updates))
        U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
        ref_shares = [(U[:, : s["m"].rank] * S[: s["m"].rank], Vh[: s["m"].rank]) for s in specs]
        t_dense = time.perf_counter() - t0
        method = FlexLoRA(device=device)
        for _ in range(1 if device != "cpu" else 0):  # CUDA context, cuSOLVER handles
            method.aggregate(updates)
        torch.cuda.synchronize() if device != "cpu" else None
        t0 = time.perf_counter()
        state = method.aggregate(updates)
        shares = [method.share_for(state, s) for s in specs]
        t_ours = time.perf_counter() - t0
        errs = []
        for (Bd, Ad), s, sp in zip(ref_shares, shares, specs):
            ref = Bd @ Ad
            errs.append(float(torch.linalg.matrix_norm(s["m"].scale * s["m"].B @ s["m"].A - ref) / torch.linalg.matrix_norm(ref)))
        out.append({"shape": [d_out, d_in], "stacked_rank": sum(ranks), "path": state.info["svd_paths"]["m"], "dense_cpu_s": t_dense, "ours_s": t_ours, "speedup": t_dense / t_ours, "max_rel_share_error": max(errs)})
    return {"types": types, "sizes": sizes, "results": out, "passed": all(r.get("speedup", 0) >= 20 for r in out if "speedup" in r)}


# -- main ----------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, help="folder of small wheels to install what is missing (see the docstring)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: tests, federated, training, aggregation")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later parts are skipped (and say so) past it")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU with small shapes (checks the script only)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    setup = install(args.wheels)
    import torch

    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible (use --cpu-dry-run to check the script on a CPU)", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu_dry_run else "cuda"
    start = time.time()
    deadline = start + args.budget
    result: dict[str, Any] = {"environment": environment(), "setup": setup, "dry_run": args.cpu_dry_run, "parts": {}}
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    tokenizer = build_tokenizer()
    with tempfile.TemporaryDirectory(prefix="flexlora-gpu-check-") as tmp:
        work = Path(tmp)
        parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("tests", lambda: part_tests(args.cpu_dry_run)),
            ("federated", lambda: part_federated(work, tokenizer, device)),
            ("aggregation", lambda: part_aggregation(device, args.cpu_dry_run, deadline)),
            ("training", lambda: part_training(work, tokenizer, device, args.cpu_dry_run, deadline)),
        ]
        for name, fn in parts:
            if name in skip:
                continue
            t0 = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                result["parts"][name] = fn()
            except Exception as e:  # noqa: BLE001 - a failed part is recorded, the others still run
                result["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-8:], "passed": False}
            result["parts"][name]["wall_s"] = time.perf_counter() - t0
            print(json.dumps({name: {k: v for k, v in result["parts"][name].items() if k not in ("tail", "traceback")}}, indent=1, default=str)[:3000], flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(result, indent=2, default=str))  # after every part: a timeout keeps what finished
    result["wall_s"] = time.time() - start
    result["passed"] = all(p.get("passed") for p in result["parts"].values())
    args.out.write_text(json.dumps(result, indent=2, default=str))
    print(f"gpu_check: {'all passed' if result['passed'] else 'FAILED parts: ' + ', '.join(k for k, v in result['parts'].items() if not v.get('passed'))} -> {args.out}")
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
