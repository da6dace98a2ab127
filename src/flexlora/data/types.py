"""The plain data every loader produces: one client = one task (or one Dirichlet shard)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    """One instruction-following record. ``instruction`` is the task definition (shared by a client's records in NI)."""

    instruction: str
    input: str
    output: str


@dataclass
class ClientData:
    """A federated client's local data.

    ``num_train_full`` is the client's full training-set size, used for the data-size weights
    p_k = n_k / sum n_j (it may exceed ``len(train)`` when the loader keeps a capped subset).
    ``heldout`` clients never train: they are the unseen tasks of zero-shot evaluation.
    """

    client_id: int
    category: str
    train: list[Example]
    eval: list[Example]
    test: list[Example] = field(default_factory=list)
    num_train_full: int = 0
    heldout: bool = False
    flags: list[str] = field(default_factory=list)

    @property
    def num_examples(self) -> int:
        """The data-size weight n_k."""
        return self.num_train_full or len(self.train)


class DataError(ValueError):
    """Bad data: the message names the file and line (or record) and what is wrong."""
