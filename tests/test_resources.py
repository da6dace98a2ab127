from collections import Counter

import pytest

from flexlora.resources import (
    PAPER_DISTRIBUTIONS,
    PAPER_TYPES,
    BudgetPolicy,
    RankPolicy,
    ResourceError,
    assign_types,
    module_group,
)

SHAPES = {
    "model.layers.0.self_attn.q_proj": (576, 576),
    "model.layers.0.self_attn.k_proj": (192, 576),
    "model.layers.0.mlp.down_proj": (576, 1536),
}


@pytest.mark.parametrize("name", sorted(PAPER_DISTRIBUTIONS))
def test_assignment_follows_the_distribution_exactly(name):
    ids = list(range(1000, 2613))  # the paper's 1,613 clients
    types = assign_types(ids, PAPER_DISTRIBUTIONS[name], seed=0)
    counts = Counter(types.values())
    for t, p in PAPER_DISTRIBUTIONS[name].items():
        assert abs(counts[t] - p * len(ids)) < 1, (t, counts[t])
    assert assign_types(ids, PAPER_DISTRIBUTIONS[name], seed=0) == types  # fixed seed, fixed assignment
    if name != "homo":
        assert assign_types(ids, PAPER_DISTRIBUTIONS[name], seed=1) != types


def test_heavy_tail_strong_is_mostly_type4():
    types = assign_types(range(100), PAPER_DISTRIBUTIONS["heavy-tail-strong"], seed=3)
    assert Counter(types.values()) == {"type4": 80, "type3": 10, "type2": 5, "type1": 5}


def test_normal_puts_its_mass_on_the_middle_types():
    d = PAPER_DISTRIBUTIONS["normal"]
    assert d["type2"] + d["type3"] > 0.75 and abs(sum(d.values()) - 1) < 1e-12


def test_paper_type3_ranks_differ_by_module_group_and_are_capped_at_width():
    specs, notes = RankPolicy().module_ranks(PAPER_TYPES["type3"], SHAPES)
    assert specs["model.layers.0.self_attn.q_proj"].rank == 30
    assert specs["model.layers.0.mlp.down_proj"].rank == 200
    specs4, notes4 = RankPolicy().module_ranks(PAPER_TYPES["type4"], SHAPES)
    assert specs4["model.layers.0.self_attn.k_proj"].rank == 192
    assert notes4 == ["k_proj: rank 200 capped at width 192"]
    with pytest.raises(ResourceError, match="exceeds its width 192"):
        RankPolicy(cap_at_width=False).module_ranks(PAPER_TYPES["type4"], SHAPES)


def test_rank_scale_for_narrow_models():
    specs, _ = RankPolicy(rank_scale=0.1).module_ranks(PAPER_TYPES["type3"], SHAPES)
    assert specs["model.layers.0.self_attn.q_proj"].rank == 3 and specs["model.layers.0.mlp.down_proj"].rank == 20


def test_unknown_module_group_is_named():
    with pytest.raises(ResourceError, match="'model.embed_tokens' is in no module group"):
        module_group("model.embed_tokens")


def test_budget_gives_the_largest_fitting_rank_and_more_memory_never_less_rank():
    policy = BudgetPolicy(fluctuation=0.0)
    ranks = [policy.rank_for(b, SHAPES, client_id=1, round=1, seed=0) for b in (0.1, 1, 4, 16, 64)]
    assert ranks == sorted(ranks) and ranks[0] == 4 and ranks[-1] == 200
    r = policy.rank_for(4, SHAPES, 1, 1, 0)
    assert policy.memory_mib(r, SHAPES) <= 4
    bigger = [x for x in policy.ranks if x > r]
    assert not bigger or policy.memory_mib(bigger[0], SHAPES) > 4


def test_budget_fluctuates_between_rounds_but_is_reproducible():
    policy = BudgetPolicy(fluctuation=0.5)
    by_round = [policy.rank_for(3.0, SHAPES, client_id=7, round=r, seed=0) for r in range(1, 30)]
    assert len(set(by_round)) > 1
    assert by_round == [policy.rank_for(3.0, SHAPES, client_id=7, round=r, seed=0) for r in range(1, 30)]
