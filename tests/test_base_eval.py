"""The base model's round-0 evaluation, scored once for the runs of a comparison (flexlora.base_eval)."""

import copy
import dataclasses
from pathlib import Path

import torch

from flexlora.base_eval import BaseEvaluations, evaluation_key, model_digest
from flexlora.config import EvalConfig, load_config
from flexlora.data.types import Example
from flexlora.simulate import Simulation
from flexlora.update import GlobalModule

ROOT = Path(__file__).resolve().parents[1]
SMOKE = str(ROOT / "configs" / "smoke.toml")


def _untimed(record):
    return {k: v for k, v in record.items() if "seconds" not in k and k != "shared_from"}


def _sim(tmp_path, name, model, tokenizer, base_evals, sets=()):
    cfg = load_config(SMOKE, list(sets))
    cfg.name = name
    return Simulation(cfg, tmp_path / name, model=model, tokenizer=tokenizer, progress=False, base_evals=base_evals)


def test_a_second_run_takes_the_first_runs_base_evaluation_which_is_what_computing_it_gives(tiny_model, tiny_tokenizer, tmp_path, capsys):
    model = copy.deepcopy(tiny_model)
    shared = BaseEvaluations()
    first = _sim(tmp_path, "a", model, tiny_tokenizer, shared)
    rec_a = first.server.evaluate_start(first.server.method.initial_state(first.server.fed.shapes))
    assert "shared_from" not in rec_a and len(shared.records) == 1
    second = _sim(tmp_path, "b", model, tiny_tokenizer, shared, ['federation.aggregation="hetlora"'])
    rec_b = second.server.evaluate_start(second.server.method.initial_state(second.server.fed.shapes))
    assert rec_b["shared_from"] == "a" and "b: round 0 evaluates the base model, as a did" in capsys.readouterr().err
    assert {k: v for k, v in rec_b.items() if k != "shared_from"} == rec_a  # the record itself, timings included
    alone = _sim(tmp_path, "c", model, tiny_tokenizer, None, ['federation.aggregation="hetlora"'])
    computed = alone.server.evaluate_start(alone.server.method.initial_state(alone.server.fed.shapes))
    assert _untimed(computed) == _untimed(rec_b) and computed["per_client"] and computed["num_examples"] > 0
    rec_b["per_client"].clear()  # a copy: changing one run's record leaves the stored one alone
    assert shared.records[next(iter(shared.records))][1]["per_client"]


def test_a_state_with_an_update_or_a_merge_is_evaluated_not_shared(tiny_model, tiny_tokenizer, tmp_path):
    shared = BaseEvaluations()
    sim = _sim(tmp_path, "a", copy.deepcopy(tiny_model), tiny_tokenizer, shared)
    state = sim.server.method.initial_state(sim.server.fed.shapes)
    name, (d_out, d_in) = next(iter(sim.server.fed.shapes.items()))
    state.adapter[name] = GlobalModule(A=torch.full((1, d_in), 0.5), B=torch.full((d_out, 1), 0.5))
    moved = sim.server.evaluate_start(state)
    assert not shared.records and "shared_from" not in moved
    sim.engine.merged = {name: torch.full((d_out, d_in), 0.25)}
    sim.server.evaluate_start(sim.server.method.initial_state(sim.server.fed.shapes))
    assert not shared.records


def test_the_key_changes_with_the_weights_the_tokenizer_the_examples_the_weights_of_clients_and_the_settings(tiny_model, tiny_tokenizer, tmp_path):
    sim = _sim(tmp_path, "a", copy.deepcopy(tiny_model), tiny_tokenizer, None)
    clients, cfg, device = sim.server.fed.eval_clients, EvalConfig(max_new_tokens=4, examples_per_client=2), torch.device("cpu")
    digest = model_digest(sim.server.model, tiny_tokenizer)
    key = evaluation_key(digest, device, clients, cfg)
    assert model_digest(copy.deepcopy(sim.server.model), tiny_tokenizer) == digest and evaluation_key(digest, device, copy.deepcopy(clients), cfg) == key
    nudged = copy.deepcopy(sim.server.model)
    with torch.no_grad():
        next(nudged.parameters()).view(-1)[0] += 1e-6
    assert model_digest(nudged, tiny_tokenizer) != digest
    other_eos = copy.deepcopy(tiny_tokenizer)
    other_eos.eos_token = "<pad>"
    assert model_digest(sim.server.model, other_eos) != digest
    changed = copy.deepcopy(clients)
    changed[0].eval[0] = Example(changed[0].eval[0].instruction, changed[0].eval[0].input, changed[0].eval[0].output + ".")
    assert evaluation_key(digest, device, changed, cfg) != key
    beyond = copy.deepcopy(clients)  # an example past examples_per_client is not scored: the key stays
    beyond[0].eval.append(Example("x", "", "y"))
    assert evaluation_key(digest, device, beyond, cfg) == key
    heavier = copy.deepcopy(clients)
    heavier[0].num_train_full = heavier[0].num_examples + 1
    assert evaluation_key(digest, device, heavier, cfg) != key
    assert evaluation_key(digest, device, clients, dataclasses.replace(cfg, max_new_tokens=5)) != key
    assert evaluation_key(digest, device, clients, dataclasses.replace(cfg, split="test")) != key


def test_the_dequantised_model_cache_is_keyed_by_the_files_content_not_its_path(tmp_path):
    """A clean clone's new venv holds the same GGUF at a new path: it must find the cache entry an
    earlier venv made (a path key dequantised again and left another entry behind)."""
    from flexlora import models

    a, b = tmp_path / "venv1" / "m.gguf", tmp_path / "venv2" / "m.gguf"
    for p in (a, b):
        p.parent.mkdir()
        p.write_bytes(b"GGUF" + bytes(range(256)) * 64)
    assert models._file_key(a) == models._file_key(b)
    c = tmp_path / "venv1" / "other.gguf"  # one byte differs
    c.write_bytes(b"GGUF" + bytes(range(256)) * 63 + bytes(255) + b"\x01")
    assert models._file_key(c) != models._file_key(a)
