"""Every GPU check in one command, for an offline CUDA node (at most ~8 minutes on one GPU).

The node is assumed to have a recent torch (any version: our CPU pin does not apply there),
transformers, peft, safetensors, accelerate, numpy, tokenizers, rich, matplotlib, pytest, hypothesis
and the small packages those pull in (six, regex, click, joblib, tqdm, pyyaml, scipy, psutil), but no
network, no hub and no model files. flexlora is NOT installed: this script puts the tree's ``src/``
on ``sys.path`` (and on ``PYTHONPATH`` for the pytest it starts). What flexlora imports beyond the
node's packages (rouge-score, absl-py, nltk, and defusedxml, which nltk imports) comes from a wheel folder prepared where there is a
network; rouge-score publishes no wheel, so it is built there (README "On a GPU" has the recipe):

    pip wheel --no-deps -w gpu_wheels rouge-score==0.1.2
    pip download --no-deps -d gpu_wheels absl-py nltk defusedxml
    python scripts/gpu_check.py --wheels gpu_wheels --out OUTDIR     # on the GPU node

The wheels are unpacked into a scratch folder (``pip install --no-index --no-deps --target``): the
node's environment is not changed.

Models are built from configs with random weights (SmolLM2-135M's shape and a 1.3B Llama: hidden
2048, 24 layers, the shape of the paper's Data-Juicer LLaMA-1.3B) with a byte-level BPE tokenizer
trained in-process, saved as local HF folders, so every load goes through the real loading code.

It (a) runs the tests marked ``gpu``; (b) runs a short federated run of a tiny model on CUDA and
on the CPU in float32 and compares the final global adapters, then the same on CUDA in bfloat16 (the
default dtype there); (c) measures local-training tokens/s on CUDA for both shapes at each of the
paper's resource types against a bare PEFT + torch loop on the same batches, both timed the same way;
(d) times FlexLoRA aggregation at LLaMA-2-7B shapes (10 clients of the paper's types) on the GPU
against the dense CPU reference on all CPU cores. Everything lands in ``gpu_check.json`` (``--out``:
a file or a folder), written after set-up and after every part, also when a part fails (its error
is recorded). Each part's ``status`` is "passed", "failed", "incomplete" (some of its measurements
were skipped for time) or "not measured"; the exit code is 0 only when every part passed.

    python scripts/gpu_check.py [--wheels DIR] [--out FILE|DIR] [--skip tests,federated,training,aggregation] [--cpu-dry-run]

``--cpu-dry-run`` runs every part on the CPU with small shapes: it checks the script, not the GPU.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
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
from typing import Any, Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
NEEDED = {"rouge_score": "rouge-score", "absl": "absl-py", "nltk": "nltk", "defusedxml": "defusedxml"}  # what flexlora imports that the node lacks (nltk imports defusedxml)
PAPER_TYPES = {"type1": (8, 8), "type2": (30, 30), "type3": (30, 200), "type4": (200, 200)}
SHAPES = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, vocab_size=49152),
    "llama-1.3b": dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, vocab_size=32000),
}
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# -- set-up ------------------------------------------------------------------------------------------
def setup(wheels: Path | None, scratch: Path) -> dict[str, Any]:
    """flexlora from this tree through ``sys.path`` (no install), plus the small wheels the node
    lacks, unpacked from ``wheels`` into ``scratch`` (also on ``sys.path``). Never raises: what went
    wrong is returned under ``errors`` (the parts that need it then fail with their own error)."""
    log: dict[str, Any] = {"sys_path": ["src"], "installed": [], "errors": []}
    sys.path.insert(0, str(SRC))
    missing = [pkg for mod, pkg in NEEDED.items() if importlib.util.find_spec(mod) is None]
    if missing and wheels is None:
        log["errors"].append(f"missing {missing}; prepare a wheel folder (README 'On a GPU') and pass --wheels DIR")
    elif missing:
        site = scratch / "site"
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-index", "--no-deps", "--only-binary", ":all:", "--find-links", str(wheels), "--target", str(site), *missing]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            sys.path.insert(1, str(site))
            log["installed"] = missing
            log["sys_path"].append("<scratch>/site")
        else:
            log["errors"].append(f"pip install from {wheels} failed: {(proc.stderr or proc.stdout).strip().splitlines()[-3:]}")
    importlib.invalidate_caches()
    for module in ("flexlora", "flexlora.cli", "flexlora.evaluate", "peft", *NEEDED):
        try:
            importlib.import_module(module)
        except Exception as e:  # noqa: BLE001 - recorded; the JSON is still written
            log["errors"].append(f"import {module}: {type(e).__name__}: {e}")
    flexlora = sys.modules.get("flexlora")
    log["flexlora_from_this_tree"] = bool(flexlora and str(getattr(flexlora, "__file__", "")).startswith(str(SRC)))
    return log


@contextlib.contextmanager
def torch_settings_kept() -> Iterator[None]:
    """Every part starts and ends with the process's thread count and TF32 switches as they were
    (``model.threads`` of a config, or a part's own TF32 choice, must not leak into the next figure)."""
    import torch

    saved = (torch.get_num_threads(), torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[1], saved[2]


def tf32_state() -> dict[str, bool]:
    import torch

    return {"matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32), "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32)}


def synchronize(device: str) -> None:
    import torch

    if device != "cpu":
        torch.cuda.synchronize()


def verdict(items: list[dict[str, Any]]) -> str:
    """A part's status from its measurements: any error or failed check -> "failed"; nothing
    measured (all skipped, or none) -> "not measured"; some skipped -> "incomplete"; else "passed"."""
    measured = [i for i in items if "skipped" not in i]
    if any(i.get("error") or i.get("passed") is False for i in measured):
        return "failed"
    if not measured:
        return "not measured"
    return "incomplete" if len(measured) < len(items) else "passed"


def overall(result: dict[str, Any]) -> str:
    """The run's status from its parts' (same four words)."""
    statuses = [p.get("status", "failed") for p in result.get("parts", {}).values()]
    if "failed" in statuses:
        return "failed"
    if not statuses or all(s == "not measured" for s in statuses):
        return "not measured"
    return "passed" if all(s == "passed" for s in statuses) else "incomplete"


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

    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, Any] = {}
    for pkg in ("torch", "transformers", "peft", "safetensors", "accelerate", "tokenizers", "numpy", "rouge-score", "nltk", "flwr"):
        try:
            versions[pkg] = version(pkg)
        except PackageNotFoundError:
            versions[pkg] = None
    flexlora = sys.modules.get("flexlora")
    versions["flexlora"] = getattr(flexlora, "__version__", None)
    dev = {}
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        dev = {"name": p.name, "memory_gib": round(p.total_memory / 2**30, 1), "capability": f"{p.major}.{p.minor}", "cuda": torch.version.cuda, "bf16_native": p.major >= 8}
    return {
        "versions": versions, "device": dev, "python": platform.python_version(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "tf32_defaults": tf32_state(), "load_average": os.getloadavg(), "command": " ".join(sys.argv),
    }


# -- (a) the gpu-marked tests -------------------------------------------------------------------------
def part_tests(dry: bool) -> dict[str, Any]:
    """The tests marked ``gpu`` (they need only tiny in-process models, nothing the node lacks). In a
    dry run the same command: without CUDA they are collected and skipped, which checks that the
    test files import on the node's packages, no more."""
    args = [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests/test_device.py"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(p for p in sys.path if p == str(SRC) or p.endswith(f"{os.sep}site"))}
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env)
    tail = (proc.stdout + proc.stderr).strip().splitlines()[-15:]
    item = {"command": " ".join(args[1:]), "returncode": proc.returncode, "seconds": time.perf_counter() - t0, "tail": tail, "passed": proc.returncode == 0}
    if dry:
        item["note"] = "dry run: no CUDA, so the gpu tests are collected and skipped"
    return {"results": [item], "status": verdict([item])}


# -- (b) the same federated run on CUDA and on the CPU ------------------------------------------------
def sign_flip_tolerance(eps: float) -> float:
    """How far two trainings may end apart (relative Frobenius norm of the global update) when every
    gradient carries a relative error ``eps``. AdamW's first step is ``lr * sign(g)`` and the next
    few are close to it, so an error changes a step entry only where it flips the sign of ``g``:
    for roughly Gaussian entries a fraction ~0.8 eps of them (0.8 = the density of |N(0,1)| at 0),
    each by 2 lr; that is a relative Frobenius difference of ~2 sqrt(0.8 eps). Twice that is the
    tolerance (nothing here is fitted to a measurement)."""
    return 2 * 2 * (0.8 * eps) ** 0.5


# float32, TF32 off: CPU and CUDA kernels sum the same products in other orders; a dot product of
# K = 128 terms (the tiny model's widest) then differs by ~sqrt(K) float32 roundoffs (2^-24), on each
# of ~4 roundings between a weight and its gradient (weights, activations, their gradients, the sum).
FLOAT32_GRAD_EPS = 4 * 128**0.5 * 2.0**-24
# bfloat16 base vs float32 base: the same ~4 roundings, each of bfloat16's unit roundoff 2^-8
# (summation order is negligible beside it; LoRA factors and AdamW stay float32 in both).
BFLOAT16_GRAD_EPS = 4 * 2.0**-8


def part_federated(work: Path, tokenizer, device: str) -> dict[str, Any]:
    """The smoke run (2 rounds, 4 clients of 4 ranks, 2 AdamW steps each) of a tiny random model:
    on the CPU in float32; on the accelerator in float32 with TF32 off (the same model up to
    summation order); on the accelerator in bfloat16 (what ``dtype = "auto"`` gives there); and,
    as the scale of a real difference, on the CPU with another seed. Each comparison has its
    tolerance from :func:`sign_flip_tolerance` and says whether TF32 was on."""
    import torch
    from safetensors.torch import load_file

    from flexlora.cli import main as flexlora

    tiny = save_random_model(work / "tiny", dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=len(tokenizer)), tokenizer)
    common = ["--config", str(ROOT / "configs" / "smoke.toml"), "--quiet", "--set", f'model.source="{tiny}"', "--set", "train.lora_dropout=0.0"]
    runs: dict[str, dict[str, Any]] = {}

    def run(label: str, dev: str, dtype: str, seed: int = 0, tf32: bool = False) -> Path:
        if label in runs:
            if "error" in runs[label]:
                raise RuntimeError(runs[label]["error"])
            return work / f"fed-{label}"
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        out = work / f"fed-{label}"
        t0 = time.perf_counter()
        with torch_settings_kept():
            code = flexlora(["run", "--out", str(out), "--device", dev, "--set", f'federation.server_device="{dev}"', "--set", f'model.dtype="{dtype}"', "--set", f"federation.seed={seed}", *common])
        entry: dict[str, Any] = {"device": dev, "dtype": dtype, "seed": seed, "tf32": tf32_state(), "seconds": time.perf_counter() - t0}
        if code != 0:
            entry["error"] = f"flexlora run on {dev} ({dtype}) exited {code}"
            runs[label] = entry
            raise RuntimeError(entry["error"])
        summary = json.loads((out / "summary.json").read_text())
        entry["summary"] = {k: summary[k] for k in ("tokens", "final_train_loss", "rouge_l_weighted", "dropped_updates")}
        runs[label] = entry
        return out

    def global_delta(out: Path) -> dict[str, Any]:
        t = load_file(str(out / "final" / "global" / "adapter_model.safetensors"))
        names = sorted({k.rsplit(".lora_", 1)[0] for k in t})
        return {n: t[f"{n}.lora_B.weight"].double() @ t[f"{n}.lora_A.weight"].double() for n in names}

    def rel(a: Path, b: Path) -> float:
        x, y = global_delta(a), global_delta(b)
        if x.keys() != y.keys():
            raise RuntimeError(f"the two runs trained different modules ({len(x)} vs {len(y)})")
        num = sum(float((x[n] - y[n]).square().sum()) for n in x)
        den = sum(float(x[n].square().sum()) for n in x)
        return (num / den) ** 0.5 if den else 0.0

    comparisons = [
        ("float32 accelerator vs float32 cpu", ("acc-f32", device, "float32"), sign_flip_tolerance(FLOAT32_GRAD_EPS)),
        ("bfloat16 accelerator vs float32 cpu", ("acc-bf16", device, "bfloat16"), sign_flip_tolerance(BFLOAT16_GRAD_EPS)),
    ]
    items = []
    try:
        reference = run("cpu-f32", "cpu", "float32")
        control = rel(reference, run("cpu-f32-seed1", "cpu", "float32", seed=1))
    except Exception as e:  # noqa: BLE001 - nothing to compare against
        return {"runs": runs, "results": [{"error": f"{type(e).__name__}: {e}", "passed": False}], "status": "failed"}
    for what, (label, dev, dtype), tolerance in comparisons:
        try:
            d = rel(reference, run(label, dev, dtype))
            items.append({"comparison": what, "rel_fro_diff_global_update": d, "tolerance": tolerance, "tf32": runs[label]["tf32"], "passed": d < tolerance, "informative": tolerance < control})
        except Exception as e:  # noqa: BLE001 - the other comparison still runs
            items.append({"comparison": what, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-6:], "passed": False})
    return {
        "runs": runs, "results": items, "status": verdict(items),
        "control_rel_fro_diff_other_seed": control,
        "note": "tolerance = 2 * 2 sqrt(0.8 eps) (AdamW sign flips, margin 2): float32 eps = 4 sqrt(128) 2^-24, bfloat16 eps = 4 * 2^-8; "
        "'informative' = the tolerance is below the difference another seed makes",
    }


# -- (c) local-training throughput --------------------------------------------------------------------
def _examples(n: int, seed: int):
    from flexlora.data.types import ClientData, Example

    rng = random.Random(seed)
    words = "the quick brown fox jumps over lazy dog answer question translate sentence classify review summary article".split()
    exs = [Example(f"Task {i}: " + " ".join(rng.choices(words, k=rng.randint(20, 60))), " ".join(rng.choices(words, k=rng.randint(40, 160))), " ".join(rng.choices(words, k=rng.randint(10, 80)))) for i in range(n)]
    return ClientData(0, "synthetic", exs, [], num_train_full=n)


def bare_peft_client(model, tokenizer, data, plan, ranks: dict[str, int], device) -> tuple[Any, int]:
    """A plain PEFT + torch client: attach, AdamW, the planned steps with the model's own full-logits
    loss, detach. Tokens are counted on the host (no device sync inside the loop)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from flexlora.train import collate, remove_lora_layers, to_device

    r0 = max(set(ranks.values()), key=list(ranks.values()).count)
    peft_model = get_peft_model(model, LoraConfig(r=r0, lora_alpha=16, rank_pattern={n: r for n, r in ranks.items() if r != r0}, target_modules=sorted(ranks), lora_dropout=0.05, task_type="CAUSAL_LM"))
    tokens = 0
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)
        peft_model.train()
        for step in plan:
            for idx in step:
                host = collate([data[j] for j in idx], tokenizer.pad_token_id)
                tokens += int(host["attention_mask"].sum())
                b = to_device(host, device)
                peft_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        peft_model.eval()
    finally:
        try:
            model = peft_model.unload()
        except Exception:  # noqa: BLE001 - leave the shared model clean whatever happened
            model = remove_lora_layers(model)
    return model, tokens


def part_training(work: Path, tokenizer, device: str, dry: bool, deadline: float) -> dict[str, Any]:
    """Per shape and resource type (each its own measurement): ours (a whole client through
    ``LocalTrainer.train_client``) and a bare PEFT loop, each warmed up by one client of ``warmup``
    steps, then timed over one client of the same ``steps`` steps on the same batches, as
    synchronised wall time of the whole client (attach to detach) in both."""
    import torch

    from flexlora.models import ModelConfig, load_model
    from flexlora.resources import target_module_names
    from flexlora.config import TrainConfig
    from flexlora.train import LocalTrainer, plan_batches, tokenize_client
    from flexlora.update import LoraFactors, ModuleSpec

    steps, warmup = (3, 1) if dry else (8, 2)
    results: list[dict[str, Any]] = []
    shapes = SHAPES if not dry else {"small": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=1024)}
    for shape_name, shape in shapes.items():
        if time.time() > deadline:
            results.extend({"shape": shape_name, "type": t, "skipped": "time budget"} for t in PAPER_TYPES)
            continue
        try:
            folder = save_random_model(work / shape_name, shape, tokenizer)
            model, tok = load_model(ModelConfig(source=str(folder), device=device, dtype="auto"))
        except Exception as e:  # noqa: BLE001 - the next shape still runs
            results.extend({"shape": shape_name, "type": t, "error": f"{type(e).__name__}: {e}", "passed": False} for t in PAPER_TYPES)
            continue
        dtype = next(model.parameters()).dtype
        module_shapes = target_module_names(model, TARGETS)
        cfg = TrainConfig(batch_size=4, max_length=512, lr=1e-4, lora_dropout=0.05)
        client = _examples(4 * (warmup + steps), seed=1)
        data = tokenize_client(tok, client, cfg)
        for tname, (r_att, r_mlp) in PAPER_TYPES.items():
            if time.time() > deadline:
                results.append({"shape": shape_name, "type": tname, "skipped": "time budget"})
                continue
            item: dict[str, Any] = {"shape": shape_name, "dtype": str(dtype), "type": tname, "ranks": [r_att, r_mlp], "steps": steps, "tf32": tf32_state()}
            try:
                spec = {n: ModuleSpec(rank=min(r_att if "attn" in n else r_mlp, *s), alpha=16.0) for n, s in module_shapes.items()}
                share = {n: LoraFactors(A=torch.randn(sp.rank, module_shapes[n][1]) * 0.01, B=torch.zeros(module_shapes[n][0], sp.rank), scale=sp.scale) for n, sp in spec.items()}
                trainer = LocalTrainer(model, tok, TARGETS, TrainConfig(**{**cfg.__dict__, "max_steps": warmup}))
                trainer.train_client(client, spec, share, seed=0)  # warm-up
                trainer.cfg = TrainConfig(**{**cfg.__dict__, "max_steps": steps})
                synchronize(device)
                t0 = time.perf_counter()
                ours = trainer.train_client(client, spec, share, seed=0)
                synchronize(device)
                ours_s = time.perf_counter() - t0
                model = trainer.model
                ranks = {n: s.rank for n, s in spec.items()}
                lengths = [len(ids) for ids, _ in data]
                model, _ = bare_peft_client(model, tok, data, plan_batches(lengths, TrainConfig(**{**cfg.__dict__, "max_steps": warmup}), random.Random(0)), ranks, model.device)
                synchronize(device)
                t0 = time.perf_counter()
                model, bare_tokens = bare_peft_client(model, tok, data, plan_batches(lengths, trainer.cfg, random.Random(0)), ranks, model.device)
                synchronize(device)
                bare_s = time.perf_counter() - t0
                item.update(
                    tokens=ours.metrics["tokens"], bare_tokens=bare_tokens, ours_s=ours_s, bare_s=bare_s,
                    ours_tokens_per_s=ours.metrics["tokens"] / ours_s, bare_tokens_per_s=bare_tokens / bare_s,
                    ratio=(ours.metrics["tokens"] / ours_s) / (bare_tokens / bare_s), loss_last=ours.metrics["loss_last"],
                    passed=bare_tokens == ours.metrics["tokens"] and bool(torch.isfinite(torch.tensor(ours.metrics["loss_last"]))),
                )
            except Exception as e:  # noqa: BLE001 - one shape x type; the others still run
                from flexlora.train import release_accelerator_memory, remove_lora_layers

                model = remove_lora_layers(model)
                release_accelerator_memory()
                item.update(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc().splitlines()[-6:], passed=False)
            results.append(item)
        del model
        if device != "cpu":
            torch.cuda.empty_cache()
    return {
        "note": "tokens/s of one whole client (attach, share, steps, extract, detach) after a warm-up client, synchronised wall time, same batches and ranks; "
        "passed = both processed the same tokens and the loss is finite (speed is reported, not judged)",
        "results": results, "status": verdict(results),
    }


# -- (d) aggregation at LLaMA-2-7B shapes ------------------------------------------------------------
def part_aggregation(device: str, dry: bool, deadline: float, cpu_threads: int) -> dict[str, Any]:
    """Ours on ``device`` against the dense CPU reference (full dW, full thin SVD, truncation per
    client: the official release's server step) on ``cpu_threads`` threads (all of torch's default).
    Passed = every share within 1e-3 of the reference's (speed is reported, not judged)."""
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
        try:
            group = 0 if d_out == d_in else 1
            ranks = [PAPER_TYPES[t][group] for t in types]
            g = torch.Generator().manual_seed(d_out * 31 + d_in)
            updates = [
                ClientUpdate(f"c{k}", n, {"m": LoraFactors(A=torch.randn(r, d_in, generator=g) / d_in**0.5, B=torch.randn(d_out, r, generator=g) * 0.02, scale=16.0 / r)})
                for k, (r, n) in enumerate(zip(ranks, sizes))
            ]
            specs = [{"m": ModuleSpec(rank=r, alpha=16.0)} for r in ranks]
            torch.set_num_threads(cpu_threads)
            p = [n / sum(sizes) for n in sizes]
            t0 = time.perf_counter()
            dW = sum(pk * u.modules["m"].scale * (u.modules["m"].B @ u.modules["m"].A) for pk, u in zip(p, updates))
            U, S, Vh = torch.linalg.svd(dW, full_matrices=False)
            ref_shares = [(U[:, : s["m"].rank] * S[: s["m"].rank], Vh[: s["m"].rank]) for s in specs]
            t_dense = time.perf_counter() - t0
            method = FlexLoRA(device=device)
            method.aggregate(updates)  # warm-up (CUDA context, cuSOLVER handles; the same on the CPU)
            synchronize(device)
            t0 = time.perf_counter()
            state = method.aggregate(updates)
            shares = [method.share_for(state, s) for s in specs]
            synchronize(device)
            t_ours = time.perf_counter() - t0
            errs = []
            for (Bd, Ad), s in zip(ref_shares, shares):
                ref = Bd @ Ad
                errs.append(float(torch.linalg.matrix_norm(s["m"].scale * s["m"].B @ s["m"].A - ref) / torch.linalg.matrix_norm(ref)))
            out.append({
                "shape": [d_out, d_in], "stacked_rank": sum(ranks), "path": state.info["svd_paths"]["m"], "dense_cpu_s": t_dense, "dense_cpu_threads": cpu_threads,
                "ours_s": t_ours, "ours_device": device, "speedup": t_dense / t_ours, "max_rel_share_error": max(errs), "tf32": tf32_state(), "passed": max(errs) < 1e-3,
            })
        except Exception as e:  # noqa: BLE001 - the next shape still runs
            out.append({"shape": [d_out, d_in], "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-6:], "passed": False})
    return {"types": types, "sizes": sizes, "results": out, "status": verdict(out)}


# -- main ----------------------------------------------------------------------------------------------
def output_path(out: Path) -> Path:
    """``--out`` names the JSON file, or a folder (existing, or written with a trailing slash) to put gpu_check.json in."""
    return out / "gpu_check.json" if out.is_dir() or str(out).endswith(("/", os.sep)) else out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheels", type=Path, help="folder of wheels for what the node lacks (README 'On a GPU')")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: tests, federated, training, aggregation")
    ap.add_argument("--budget", type=float, default=450.0, help="seconds; later measurements are skipped past it (and reported as not measured)")
    ap.add_argument("--cpu-dry-run", action="store_true", help="every part on the CPU with small shapes (checks the script only)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check.json", help="the JSON file, or a folder for gpu_check.json")
    args = ap.parse_args(argv)
    out = output_path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    start = time.time()
    deadline = start + args.budget
    result: dict[str, Any] = {"dry_run": args.cpu_dry_run, "command": " ".join(sys.argv), "parts": {}, "status": "not measured"}

    def save() -> None:
        out.write_text(json.dumps(result, indent=2, default=str))  # after every step: a timeout keeps what finished

    save()
    with tempfile.TemporaryDirectory(prefix="flexlora-gpu-check-") as tmp:
        work = Path(tmp)
        result["setup"] = setup(args.wheels, work)
        save()
        try:
            import torch

            result["environment"] = environment()
            cpu_threads = torch.get_num_threads()  # the process default, before any config sets its own
        except Exception as e:  # noqa: BLE001 - no torch: nothing can be measured
            result["setup"]["errors"].append(f"import torch: {type(e).__name__}: {e}")
            save()
            print(f"gpu_check: {result['setup']['errors'][-1]} -> {out}", file=sys.stderr)
            return 1
        save()
        if not args.cpu_dry_run and not torch.cuda.is_available():
            print("gpu_check: no CUDA device visible (use --cpu-dry-run to check the script on a CPU)", file=sys.stderr)
            return 2
        device = "cpu" if args.cpu_dry_run else "cuda"
        skip = {s.strip() for s in args.skip.split(",") if s.strip()}
        try:
            tokenizer = build_tokenizer()
        except Exception as e:  # noqa: BLE001 - recorded: every part below needs it
            tokenizer = None
            result["setup"]["errors"].append(f"tokenizer: {type(e).__name__}: {e}")
        parts: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("tests", lambda: part_tests(args.cpu_dry_run)),
            ("federated", lambda: part_federated(work, tokenizer, device)),
            ("aggregation", lambda: part_aggregation(device, args.cpu_dry_run, deadline, cpu_threads)),
            ("training", lambda: part_training(work, tokenizer, device, args.cpu_dry_run, deadline)),
        ]
        for name, fn in parts:
            if name in skip:
                result["parts"][name] = {"status": "not measured", "skipped": "--skip"}
                continue
            if time.time() > deadline:
                result["parts"][name] = {"status": "not measured", "skipped": "time budget"}
                continue
            t0 = time.perf_counter()
            print(f"gpu_check: {name} ...", flush=True)
            try:
                with torch_settings_kept():
                    result["parts"][name] = fn()
            except Exception as e:  # noqa: BLE001 - a failed part is recorded, the others still run
                result["parts"][name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc().splitlines()[-8:], "status": "failed"}
            result["parts"][name]["wall_s"] = time.perf_counter() - t0
            print(json.dumps({name: {k: v for k, v in result["parts"][name].items() if k not in ("tail", "traceback", "runs")}}, indent=1, default=str)[:3000], flush=True)
            result["status"] = overall(result)
            save()
    result["wall_s"] = time.time() - start
    result["status"] = overall(result)
    save()
    bad = [k for k, v in result["parts"].items() if v.get("status") != "passed"]
    details = ", ".join(f"{k}: {result['parts'][k].get('status')}" for k in bad)
    print(f"gpu_check: {result['status']}{f' ({details})' if bad else ''} -> {out}")
    return 0 if result["status"] == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
