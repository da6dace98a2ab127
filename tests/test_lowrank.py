import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.lowrank import choose_path, factored_distance, factored_fro_norm, svd_of_sum


def _random_terms(seed, d_out, d_in, ranks):
    g = torch.Generator().manual_seed(seed)
    Bs = [torch.randn(d_out, r, generator=g, dtype=torch.float64) for r in ranks]
    As = [torch.randn(r, d_in, generator=g, dtype=torch.float64) for r in ranks]
    coeffs = torch.rand(len(ranks), generator=g, dtype=torch.float64).tolist()
    dense = sum(c * B @ A for c, B, A in zip(coeffs, Bs, As))
    return Bs, As, coeffs, dense


@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d_out=st.integers(1, 40),
    d_in=st.integers(1, 40),
    ranks=st.lists(st.integers(1, 12), min_size=1, max_size=6),
    path=st.sampled_from(["factored", "dense", "auto"]),
)
def test_svd_of_sum_matches_dense_svd(seed, d_out, d_in, ranks, path):
    Bs, As, coeffs, dense = _random_terms(seed, d_out, d_in, ranks)
    svd = svd_of_sum(Bs, As, coeffs, path=path, dtype=torch.float64)
    ref = torch.linalg.svdvals(dense)
    k = min(sum(ranks), d_out, d_in)
    assert svd.S.shape == (k,)
    torch.testing.assert_close(svd.S, ref[:k], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(svd.reconstruct(), dense, atol=1e-9, rtol=1e-9)
    # orthonormal singular vectors
    torch.testing.assert_close(svd.U.T @ svd.U, torch.eye(k, dtype=torch.float64), atol=1e-9, rtol=0)
    torch.testing.assert_close(svd.Vh @ svd.Vh.T, torch.eye(k, dtype=torch.float64), atol=1e-9, rtol=0)


def test_factored_and_dense_paths_agree_in_float32():
    Bs, As, coeffs, dense = _random_terms(0, 300, 200, [8, 30, 30])
    f = svd_of_sum(Bs, As, coeffs, path="factored")
    d = svd_of_sum(Bs, As, coeffs, path="dense")
    assert f.path == "factored" and d.path == "dense"
    err = torch.linalg.matrix_norm(f.reconstruct(50).double() - d.reconstruct(50).double()) / torch.linalg.matrix_norm(d.reconstruct(50).double())
    assert err < 1e-4


def test_auto_chooses_factored_for_thin_and_dense_for_wide_stacks():
    assert choose_path(4096, 4096, 800) == "factored"
    assert choose_path(11008, 4096, 1200) == "factored"
    assert choose_path(576, 1536, 80 * 200) == "dense"  # R far above the width: the dense path is cheaper


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 10_000), d_out=st.integers(1, 30), d_in=st.integers(1, 30), r1=st.integers(0, 10), r2=st.integers(0, 10))
def test_factored_norms_match_dense(seed, d_out, d_in, r1, r2):
    g = torch.Generator().manual_seed(seed)
    B1, A1 = torch.randn(d_out, r1, generator=g, dtype=torch.float64), torch.randn(r1, d_in, generator=g, dtype=torch.float64)
    B2, A2 = torch.randn(d_out, r2, generator=g, dtype=torch.float64), torch.randn(r2, d_in, generator=g, dtype=torch.float64)
    assert abs(factored_fro_norm(B1, A1) - float(torch.linalg.matrix_norm(B1 @ A1))) < 1e-8 * (1 + float(torch.linalg.matrix_norm(B1 @ A1)))
    ref = float(torch.linalg.matrix_norm(B1 @ A1 - B2 @ A2))
    assert abs(factored_distance(B1, A1, B2, A2) - ref) < 1e-10 * (1 + ref)


@settings(max_examples=40, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d_out=st.integers(1, 30),
    d_in=st.integers(1, 30),
    ranks=st.lists(st.integers(1, 10), min_size=1, max_size=5),
    keep=st.integers(0, 12),
    path=st.sampled_from(["factored", "dense"]),
)
def test_keep_returns_the_top_triplets_and_every_singular_value(seed, d_out, d_in, ranks, keep, path):
    Bs, As, coeffs, dense = _random_terms(seed, d_out, d_in, ranks)
    full = svd_of_sum(Bs, As, coeffs, path=path, dtype=torch.float64)
    part = svd_of_sum(Bs, As, coeffs, path=path, dtype=torch.float64, keep=keep)
    k = min(keep, full.S.shape[0])
    assert part.U.shape[1] == part.Vh.shape[0] == k
    torch.testing.assert_close(part.S, full.S)
    torch.testing.assert_close(part.reconstruct(k), full.reconstruct(k), atol=1e-9, rtol=1e-9)


def test_nan_is_still_detected_by_the_fast_finiteness_check():
    from flexlora.update import _all_finite

    t = torch.randn(50, 40)
    assert _all_finite(t)
    t[3, 7] = float("nan")
    assert not _all_finite(t)
    t[3, 7] = float("-inf")
    assert not _all_finite(t)
    assert _all_finite(torch.full((4, 4), 3e38))  # the float64 sum does not overflow


def test_factored_distance_resolves_equal_products_to_rounding_error():
    """Two factorisations of the same product (B Q, Q^T A) are at distance ~eps, not ~sqrt(eps):
    the diagnostics report FlexLoRA's aggregate as exact only if the distance can show it."""
    g = torch.Generator().manual_seed(0)
    for d_out, d_in, k in [(576, 576, 40), (300, 200, 8), (1536, 576, 60)]:
        B = torch.randn(d_out, k, generator=g, dtype=torch.float64)
        A = torch.randn(k, d_in, generator=g, dtype=torch.float64)
        Q, _ = torch.linalg.qr(torch.randn(k, k, generator=g, dtype=torch.float64))
        norm = float(torch.linalg.matrix_norm(B @ A))
        assert factored_distance(B, A, B @ Q, Q.T @ A) < 1e-13 * norm
        assert abs(factored_fro_norm(B, A) - norm) < 1e-13 * norm
