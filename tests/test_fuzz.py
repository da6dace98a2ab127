"""Hostile input: mutated adapter directories and client updates always end in a clear error."""

import random
import shutil

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from flexlora.aggregate_dirs import aggregate_adapter_dirs
from fuzz import ADAPTER_MUTATIONS, UPDATE_MUTATIONS, mutate_adapter, mutate_update
from flexlora.peft_io import AdapterError, read_adapter
from flexlora.update import ClientUpdate, LoraFactors, UpdateError
from flexlora.validate import ValidationConfig, screen_updates, validate_update

from tiny import make_peft_adapter


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("pristine")
    return [make_peft_adapter(root / f"a{i}", seed=i, r=2 + i) for i in range(2)]


@settings(max_examples=80, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=st.sampled_from(ADAPTER_MUTATIONS), seed=st.integers(0, 2**32 - 1))
def test_mutated_adapters_give_a_clear_error_and_write_nothing_outside_out(pristine, tmp_path_factory, mutation, seed):
    work = tmp_path_factory.mktemp("fuzz")
    inputs = [shutil.copytree(p, work / "in" / p.name) for p in pristine]
    mutate_adapter(inputs[1], mutation, random.Random(seed))
    try:
        read_adapter(inputs[1])
    except AdapterError as e:
        assert str(inputs[1]) in str(e)
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    out = work / "out"
    try:
        aggregate_adapter_dirs(inputs, "flexlora", out)
        produced = True
    except UpdateError:  # AdapterError is an UpdateError
        produced = False
    after = sorted(p.relative_to(work) for p in work.rglob("*") if not p.is_relative_to(out))
    assert after == before  # nothing written or left next to the output folder
    assert produced == out.exists()


@settings(max_examples=150, deadline=2000)
@given(mutation=st.sampled_from(UPDATE_MUTATIONS), seed=st.integers(0, 2**32 - 1), k=st.integers(3, 6))
def test_mutated_updates_are_rejected_with_a_reason_and_the_rest_aggregate(mutation, seed, k):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    shapes = {"a.q_proj": (6, 5), "a.down_proj": (5, 9)}
    updates = [
        ClientUpdate(str(i), 10, {n: LoraFactors(torch.randn(2, d_in, generator=g), torch.randn(d_out, 2, generator=g), 8.0) for n, (d_out, d_in) in shapes.items()})
        for i in range(k)
    ]
    expected = {u.client_id: u.spec() for u in updates}
    bad = mutate_update(updates[0], mutation, rng)
    problems = validate_update(bad, shapes, expected["0"])
    passed, rejected = screen_updates([bad] + updates[1:], shapes, expected, ValidationConfig(norm_factor=100.0))
    assert "0" in rejected and rejected["0"], (mutation, problems)
    assert [u.client_id for u in passed] == [u.client_id for u in updates[1:]]
    assert all(isinstance(r, str) and r for r in rejected["0"])


def test_inconsistent_factors_cannot_even_be_constructed():
    with pytest.raises(UpdateError):
        LoraFactors(torch.zeros(3, 4), torch.zeros(5, 2), 1.0)
    with pytest.raises(UpdateError):
        LoraFactors(torch.zeros(3, 4), torch.zeros(5, 3), float("nan"))
    with pytest.raises(UpdateError):
        LoraFactors(torch.zeros(3), torch.zeros(5, 3), 1.0)
