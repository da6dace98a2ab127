"""The server's close step (``rounds.close_step``), shared by the engine, the Strategy, SLoRA's stage and
``flexlora aggregate``: a round it cannot aggregate keeps the previous state and says why."""

import json
from pathlib import Path

import pytest

from flexlora.config import load_config
from flexlora.fold import RoundFold
from flexlora.rounds import close_step
from flexlora.update import UpdateError

SMOKE = str(Path(__file__).resolve().parents[1] / "configs" / "smoke.toml")


def _never():
    pytest.fail("aggregate must not run")


def test_too_few_accepted_updates_skip_without_aggregating():
    closing = close_step((["a"], {"b": ["not finite"]}), 2, _never, lambda n: f"only {n} good update(s)", "flexlora")
    assert closing.state is None and closing.skipped == "only 1 good update(s)"
    assert closing.accepted == ["a"] and closing.rejected == {"b": ["not finite"]}


def test_an_aggregate_the_method_refuses_keeps_the_previous_state_with_the_reason():
    def refuse():
        raise UpdateError("client b sent rank 9 for q_proj, the federation's is 8")

    closing = close_step((["a", "b"], {}), 1, refuse, lambda n: "too few", "hetlora")
    assert closing.state is None
    assert closing.skipped == "hetlora cannot aggregate these updates: client b sent rank 9 for q_proj, the federation's is 8"


def test_a_good_round_is_aggregated_and_diagnosed():
    closing = close_step((["a"], {}), 1, lambda: "state", lambda n: "too few", "flexlora", diagnose=lambda s: {"m": {"of": s}})
    assert closing.state == "state" and closing.skipped is None and closing.report == {"m": {"of": "state"}}
    assert set(closing.seconds) == {"aggregate", "diagnostics"}


def test_the_simulator_skips_a_round_the_method_cannot_aggregate_and_goes_on(tmp_path, monkeypatch):
    """Round 2's aggregate is refused: the run finishes, round 2's record says why and has no aggregation."""
    from flexlora.simulate import Simulation

    real = RoundFold.aggregate

    def refuse_round_2(self, round):
        if round == 2:
            raise UpdateError("injected by the test")
        return real(self, round)

    monkeypatch.setattr(RoundFold, "aggregate", refuse_round_2)
    out = tmp_path / "run"
    Simulation(load_config(SMOKE), out, progress=False).run()
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in recs] == [0, 1, 2]
    assert "aggregation" in recs[1] and "skipped" not in recs[1]
    assert recs[2]["skipped"] == "flexlora cannot aggregate these updates: injected by the test"
    assert "aggregation" not in recs[2]
    assert (out / "summary.json").exists()
