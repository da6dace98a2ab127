"""The base federated algorithms: how clients train locally (``federation.algorithm``), as
:data:`flexlora.methods.METHODS` says how the server combines their adapters (``federation.aggregation``).

* ``fedit`` (Zhang et al., "Towards Building the Federated GPT: Federated Instruction Tuning", 2024):
  LoRA trained with the configured optimiser (AdamW by default).
* ``fedavg_sgd`` (McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", 2017): LoRA trained with plain SGD, the FlexLoRA paper's FedAvg rows. It was
  called ``fedavg`` until that name collided with ``aggregation = "fedavg"`` (FedIT's averaging);
  the old spelling is still accepted with a one-line notice.
* ``slora`` (Babakniya et al., "SLoRA", 2023): a warm-up stage of sparse full-weight rounds whose
  update initialises LoRA, then LoRA rounds (:mod:`flexlora.slora`).

Nothing outside this registry and config parsing compares an algorithm's name: runners ask an
:class:`Algorithm` what it does. This module is plain data (config.py imports it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from flexlora.config import FederationConfig, RunConfig


@dataclass(frozen=True)
class Algorithm:
    name: str
    paper: str
    optimizer: str | None = None  # the local optimiser the algorithm prescribes (None: train.optimizer as configured)
    sparse_warmup: bool = False  # SLoRA: the first federation.slora_rounds rounds train sparse full weights
    on_flower: bool = True  # whether the Flower app runs it
    under_dp: bool = True  # whether [privacy] covers what its clients send

    def warmup_rounds(self, fed: "FederationConfig") -> int:
        """How many rounds the warm-up stage takes (0: none)."""
        return fed.slora_rounds if self.sparse_warmup else 0

    def merges_into_base(self) -> bool:
        """Whether some round merges an update into the base weights (SLoRA's stage 1 does)."""
        return self.sparse_warmup

    def prescribe(self, cfg: "RunConfig") -> None:
        """Set what the algorithm prescribes on ``cfg`` (config checking does, once; config.json then
        shows it, and :meth:`notes` says it before the run's first round)."""
        if self.optimizer is not None:
            cfg.train.optimizer = self.optimizer

    def notes(self) -> list[str]:
        """What the algorithm sets, said before the first round."""
        return [f"federation.algorithm = {self.name!r}: local training with train.optimizer = {self.optimizer!r}, set by the algorithm"] if self.optimizer else []

    def check(self, cfg: "RunConfig", restarts_adapter: bool, method_class: str) -> str | None:
        """Why the algorithm cannot run with this config (None: it can)."""
        fed = cfg.federation
        if self.sparse_warmup:
            if restarts_adapter:
                return (f"federation: {self.name} + {fed.aggregation} makes no sense: {method_class} restarts LoRA from a fresh init every round, "
                        "discarding SLoRA's initialisation")
            if not 1 <= fed.slora_rounds <= fed.rounds:
                return f"federation.slora_rounds must be between 1 and rounds ({fed.rounds}), got {fed.slora_rounds}"
            if fed.slora_lr <= 0:
                return "federation.slora_lr must be > 0"
        if not self.under_dp and cfg.privacy.noisy:
            return f"privacy: {self.name}'s stage 1 sends sparse full-weight updates, which the DP mechanism does not cover; use {' or '.join(n for n, a in ALGORITHMS.items() if a.under_dp)}"
        return None


ALGORITHMS: dict[str, Algorithm] = {
    "fedit": Algorithm("fedit", "Zhang et al. 2024, FedIT"),
    "fedavg_sgd": Algorithm("fedavg_sgd", "McMahan et al. 2017, FedAvg (local SGD)", optimizer="sgd"),
    "slora": Algorithm("slora", "Babakniya et al. 2023, SLoRA", sparse_warmup=True, on_flower=False, under_dp=False),
}

RENAMED: dict[str, str] = {"fedavg": "fedavg_sgd"}  # old spelling -> name


def algorithm_name(name: str) -> tuple[str, str | None]:
    """The registry name for ``name`` and, for an old spelling, the one-line notice that says the new one."""
    new = RENAMED.get(name)
    if new is None:
        return name, None
    return new, (f"federation.algorithm = {name!r} is now called {new!r} (local SGD; aggregation = \"fedavg\" is the server's averaging): "
                 f"the old name still works, write {new!r} to silence this line")


def get_algorithm(name: str) -> Algorithm:
    return ALGORITHMS[RENAMED.get(name, name)]
