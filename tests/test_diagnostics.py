import math

import pytest
import torch

from flexlora.diagnostics import aggregation_report, spectrum_summary, summarise
from flexlora.methods import FedAvg, FlexLoRA, HetLoRA
from flexlora.update import ClientUpdate, LoraFactors


def test_spectrum_summary_on_a_known_spectrum():
    S = torch.tensor([3.0, 2.0, 1.0, 0.0])  # energies 9, 4, 1, 0 of 14: cumulative 0.64, 0.93, 1
    out = spectrum_summary(S, [1, 2, 8])
    assert out["energy"]["1"] == pytest.approx(9 / 14)
    assert out["truncation_error"]["2"] == pytest.approx(math.sqrt(1 / 14))
    assert out["truncation_error"]["8"] == pytest.approx(0.0)
    assert out["rank_90"] == 2 and out["rank_99"] == 3
    p = torch.tensor([3.0, 2.0, 1.0]) / 6
    assert out["effective_rank"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_rank_collapse_shows_as_low_effective_rank():
    flat = spectrum_summary(torch.ones(16), [8])
    collapsed = spectrum_summary(torch.tensor([10.0] + [0.01] * 15), [8])
    assert flat["effective_rank"] == pytest.approx(16) and collapsed["effective_rank"] < 1.2


def _fed(seed=0):
    g = torch.Generator().manual_seed(seed)
    ups = []
    for i, r in enumerate([2, 4, 8]):
        ups.append(ClientUpdate(f"c{i}", 10 * (i + 1), {"m": LoraFactors(torch.randn(r, 30, generator=g, dtype=torch.float64), torch.randn(20, r, generator=g, dtype=torch.float64), 16 / r)}))
    return ups


def test_flexlora_is_exact_and_its_share_error_is_the_spectral_truncation_error():
    ups = _fed()
    state = FlexLoRA(dtype=torch.float64).aggregate(ups)
    p = [1 / 6, 2 / 6, 3 / 6]
    rep = aggregation_report(state, ups, p)["m"]
    assert rep["rel_error_vs_exact"] < 1e-12
    for r in ("2", "4", "8"):
        assert rep["share_error"][r] == pytest.approx(rep["truncation_error"][r], abs=1e-9)


def test_hetlora_noise_is_measured_against_the_exact_average():
    ups = _fed()
    state = HetLoRA(dtype=torch.float64).aggregate(ups)
    rep = aggregation_report(state, ups, [1 / 6, 2 / 6, 3 / 6])["m"]
    assert rep["rel_error_vs_exact"] > 0.1  # zero-padded averaging of factors is far from sum p_k s_k B_k A_k
    summary = summarise({"m": rep})
    assert summary["rel_error_vs_exact"] == rep["rel_error_vs_exact"]


def test_fedavg_error_vs_exact_is_zero_only_for_one_client():
    g = torch.Generator().manual_seed(1)
    one = [ClientUpdate("a", 1, {"m": LoraFactors(torch.randn(4, 9, generator=g, dtype=torch.float64), torch.randn(7, 4, generator=g, dtype=torch.float64), 4.0)})]
    assert aggregation_report(FedAvg(dtype=torch.float64).aggregate(one), one, [1.0])["m"]["rel_error_vs_exact"] < 1e-12
