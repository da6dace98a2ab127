"""flexlora: federated fine-tuning of LLMs when clients train LoRA adapters of different ranks.

The aggregation core (:mod:`flexlora.lowrank`, :mod:`flexlora.update`, :mod:`flexlora.methods`,
:mod:`flexlora.diagnostics`) is plain torch; PEFT, transformers and Flower live in the layers
around it. The entry points a user imports are listed in ``__all__``; each is loaded on first use,
so ``import flexlora`` costs nothing and a server that only aggregates never imports a training stack::

    import flexlora

    method = flexlora.get_method("flexlora")                     # one aggregation method, by name
    summary = flexlora.run("configs/smoke.toml", "runs/smoke")   # a federated run in this process
    strategy = flexlora.FlexLoRAStrategy(...)                     # FlexLoRA inside your own Flower app
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used)
_LAZY = {
    "get_method": "flexlora.methods",
    "METHODS": "flexlora.methods",
    "aggregate_adapter_dirs": "flexlora.aggregate_dirs",
    "load_config": "flexlora.config",
    "RunConfig": "flexlora.config",
    "FlexLoRAStrategy": "flexlora.flower.strategy",
}

__all__ = ["__version__", "run", "get_method", "METHODS", "aggregate_adapter_dirs", "load_config", "RunConfig", "FlexLoRAStrategy"]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from flexlora.aggregate_dirs import aggregate_adapter_dirs
    from flexlora.config import RunConfig, load_config
    from flexlora.flower.strategy import FlexLoRAStrategy
    from flexlora.methods import METHODS, get_method


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'flexlora' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


def run(config: str | Path | RunConfig | None, out: str | Path, *, overrides: Sequence[str] = (), resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Run a federated fine-tuning job in this process, as ``flexlora run`` does; return its summary.

    ``config`` is a TOML path (``None``: the built-in defaults) or a loaded :class:`RunConfig`;
    ``overrides`` are ``key=value`` strings as ``--set`` takes them. The output folder gets the same
    protection as on the command line: a non-empty folder is refused unless ``resume`` continues the
    run in it, and a folder that is or contains an input is refused before any work.
    """
    from flexlora.config import RunConfig, load_config, validate
    from flexlora.fsutil import check_output_folder
    from flexlora.simulate import Simulation

    if isinstance(config, RunConfig):
        if overrides:
            raise ValueError("overrides apply to a config file; edit the RunConfig object instead")
        validate(config)
        cfg = config
    else:
        cfg = load_config(config, overrides)
    out = Path(out)
    inputs = [p for p in (cfg.data.path, cfg.data.heldout_file, cfg.model.source) if p and Path(p).exists()]
    check_output_folder(out, inputs, overwrite=False, resume=resume)
    return Simulation(cfg, out, progress=progress).run(resume=resume)
