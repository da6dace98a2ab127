"""The run's clients from its ``[data]`` config: which data, how it is split into clients, which
clients are held out; and, when nothing can be evaluated, why (naming the key to change)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flexlora.data.types import ClientData
from flexlora.seeds import derived_seed

if TYPE_CHECKING:  # pragma: no cover
    from flexlora.config import RunConfig


def load_clients(cfg: "RunConfig") -> list[ClientData]:
    """The run's clients, held-out ones marked (see :class:`flexlora.config.DataConfig`)."""
    from flexlora.config import suite_heldout_tasks
    from flexlora.data.instruct import heldout_count, mark_heldout, seeded_heldout_ids
    from flexlora.data.ni import read_heldout_file

    d = cfg.data
    if d.kind == "suite":
        from flexlora.data.suite import make_suite

        clients = make_suite(d.suite_clients, d.suite_examples, d.suite_eval, seed=cfg.federation.seed, heldout_tasks=suite_heldout_tasks(d))
        if d.heldout_file:
            mark_heldout(clients, read_heldout_file(d.heldout_file), d.heldout_file, evaluate_all_records=False)
    elif d.kind == "ni":
        from flexlora.data.ni import load_ni

        clients = load_ni(
            d.path, heldout_file=d.heldout_file, max_train_per_client=d.max_train_per_client, max_eval_per_client=d.max_eval_per_client, on_error=d.on_error
        )
    else:
        from flexlora.data.instruct import load_instruct, partition_by_category, partition_dirichlet

        records = load_instruct(d.path, on_error=d.on_error)
        if d.partition == "category":
            clients = partition_by_category(records, eval_fraction=d.eval_fraction, seed=cfg.federation.seed)
        else:
            clients = partition_dirichlet(records, d.num_clients, d.dirichlet_alpha, cfg.federation.seed, eval_fraction=d.eval_fraction)
        if d.heldout_file:
            ids, source = read_heldout_file(d.heldout_file), d.heldout_file
        else:
            k = heldout_count(len(clients), d.heldout_clients, d.heldout_fraction)
            ids, source = seeded_heldout_ids(clients, k, derived_seed(cfg.federation.seed, "heldout")), "data.heldout_clients"
        mark_heldout(clients, ids, source, evaluate_all_records=True)
    return clients


def why_nothing_to_evaluate(cfg: "RunConfig", clients: list[ClientData]) -> str | None:
    """None when some held-out client has examples to evaluate; otherwise why not, naming the key to change."""
    split = cfg.eval.split
    heldout = [c for c in clients if c.heldout]
    if cfg.eval.clients == 0:
        return "eval.clients = 0"
    if not heldout:
        d = cfg.data
        if d.heldout_file:
            how = f"{d.heldout_file} lists none of the clients"
        elif d.kind == "ni":
            how = "the NI data marks none and data.heldout_file is not set"
        elif d.kind == "instruct" and len(clients) < 2:
            how = f"the data makes {len(clients)} client, which must train; more clients (data.num_clients) or data.heldout_file"
        else:
            how = "data.heldout_clients / data.heldout_fraction hold out none; set one of them (or data.heldout_file)"
        return f"no held-out clients: {how}"
    if not any(c.eval if split == "eval" else c.test for c in heldout):
        return f"the {len(heldout)} held-out clients have no examples in split {split!r} (eval.split)"
    return None
