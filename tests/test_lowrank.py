import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from flexlora.lowrank import choose_path, factored_distance, factored_fro_norm, svd_of_sum


def _random_terms(seed, d_out, d_in, ranks, decay=0.0, dtype=torch.float64):
    """Factors in ``dtype`` whose columns of B decay over ``decay`` decades (a spectrum like LoRA
    updates'), coefficients, and the float64 weighted sum."""
    g = torch.Generator().manual_seed(seed)
    Bs = [(torch.randn(d_out, r, generator=g, dtype=torch.float64) * torch.logspace(0, -decay, r, dtype=torch.float64)).to(dtype) for r in ranks]
    As = [torch.randn(r, d_in, generator=g, dtype=torch.float64).to(dtype) for r in ranks]
    coeffs = torch.rand(len(ranks), generator=g, dtype=torch.float64).tolist()
    dense = sum(c * B.double() @ A.double() for c, B, A in zip(coeffs, Bs, As))
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
    from flexlora.update import all_finite

    t = torch.randn(50, 40)
    assert all_finite(t)
    t[3, 7] = float("nan")
    assert not all_finite(t)
    t[3, 7] = float("-inf")
    assert not all_finite(t)
    assert all_finite(torch.full((4, 4), 3e38))  # the float64 sum does not overflow


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


# -- the float64 Gram route for float32 data (lowrank.gram_svd) --------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    d_out=st.integers(1, 48),
    d_in=st.integers(1, 48),
    ranks=st.lists(st.integers(1, 16), min_size=1, max_size=6),
    decay=st.floats(0.0, 4.0),
    keep=st.integers(0, 50),
    path=st.sampled_from(["factored", "dense"]),
)
def test_float32_svd_through_the_float64_gram_matrix_is_exact(seed, d_out, d_in, ranks, decay, keep, path):
    """Against float64 LAPACK on the float64 sum: every singular value, the whole reconstruction, and
    each truncation's error is Eckart-Young's optimum (the shares are the best rank-r approximations)."""
    from flexlora.lowrank import svd_of_sum

    Bs, As, coeffs, dense = _random_terms(seed, d_out, d_in, ranks, decay, torch.float32)
    ref = torch.linalg.svdvals(dense)
    norm = float(ref.norm())
    svd = svd_of_sum(Bs, As, coeffs, path=path, keep=keep)  # float32 server, as every run's default
    k = min(sum(ranks), d_out, d_in)
    kv = min(keep, k)
    assert svd.S.dtype == svd.U.dtype == svd.Vh.dtype == torch.float32
    assert svd.S.shape == (k,) and svd.U.shape == (d_out, kv) and svd.Vh.shape == (kv, d_in)
    assert bool(torch.all(svd.S[:-1] >= svd.S[1:]))
    assert float((svd.S.double() - ref[:k]).abs().max()) <= 2e-6 * norm
    for r in sorted({min(1, kv), kv // 2, kv} - {0}):
        err = float(torch.linalg.matrix_norm(dense - svd.reconstruct(r).double()))
        optimum = float(ref[r:].square().sum().sqrt())
        assert abs(err - optimum) <= 5e-6 * norm, (r, err, optimum)
    # the vectors of the singular values that matter are orthonormal on both sides (the side computed
    # as M V / S in float32 to about eps32 S_1 / S_i)
    strong = svd.S[:kv] > 1e-2 * svd.S[0]
    U, V = svd.U[:, strong].double(), svd.Vh[strong].double().T
    for Q in (U, V):
        torch.testing.assert_close(Q.T @ Q, torch.eye(Q.shape[1], dtype=torch.float64), atol=1e-4, rtol=0)


def test_gram_route_is_at_least_as_accurate_as_float32_lapack():
    """On float32 data with a spectrum spanning four decades, the top-r subspace from the float64 Gram
    matrix is closer to the true one than LAPACK's float32 SVD gets (lowrank.gram_svd's claim)."""
    from flexlora.lowrank import gram_svd

    g = torch.Generator().manual_seed(3)
    m, n = 300, 120
    U, _ = torch.linalg.qr(torch.randn(m, n, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    s = torch.logspace(0, -4, n, dtype=torch.float64)
    W = ((U * s) @ V.T).float()
    truth = torch.linalg.svd(W.double(), full_matrices=False)
    for r in (8, 30, 60):
        best = (truth.U[:, :r] * truth.S[:r]) @ truth.Vh[:r]
        Ug, Sg, Vg = gram_svd(W, r)
        Ul, Sl, Vl = torch.linalg.svd(W, full_matrices=False)
        gram_err = float(torch.linalg.matrix_norm((Ug * Sg[:r]).double() @ Vg.double() - best))
        lapack_err = float(torch.linalg.matrix_norm((Ul[:, :r] * Sl[:r]).double() @ Vl[:r].double() - best))
        assert gram_err <= 1.5 * lapack_err, (r, gram_err, lapack_err)


def test_gram_route_on_a_rank_deficient_matrix_gives_zero_vectors_not_nan():
    from flexlora.lowrank import gram_svd

    g = torch.Generator().manual_seed(0)
    W = torch.zeros(40, 30)
    W[:, :3] = torch.randn(40, 3, generator=g)  # rank 3, and 27 exactly zero singular values
    for M in (W, W.T.contiguous(), torch.zeros(5, 7)):
        U, S, Vh = gram_svd(M, min(M.shape))
        assert bool(torch.isfinite(U).all() and torch.isfinite(S).all() and torch.isfinite(Vh).all())
        torch.testing.assert_close((U * S) @ Vh, M, atol=1e-5, rtol=0)


def test_modules_in_parallel_equal_a_single_threaded_loop_and_the_thread_count_is_restored(restore_torch_threads):
    """map_modules computes every module on one thread, so FlexLoRA's state does not depend on how
    many threads the machine has; an error inside a module propagates and the count is restored."""
    import pytest

    from flexlora.lowrank import map_modules
    from flexlora.methods import get_method
    from flexlora.update import ClientUpdate, LoraFactors

    g = torch.Generator().manual_seed(1)
    shapes = {f"m{i}": (40 + 3 * i, 30 + 2 * i) for i in range(7)}
    updates = [
        ClientUpdate(str(k), 10 + k, {n: LoraFactors(A=torch.randn(r, i, generator=g), B=torch.randn(o, r, generator=g), scale=16 / r) for n, (o, i) in shapes.items()})
        for k, r in enumerate([4, 12, 30])
    ]
    states = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        states.append(get_method("flexlora").aggregate(updates))
        assert torch.get_num_threads() == threads
    for other in states[1:]:
        for n in shapes:
            assert torch.equal(other.adapter[n].B, states[0].adapter[n].B) and torch.equal(other.adapter[n].A, states[0].adapter[n].A)

    def boom(x):
        if x == 3:
            raise ValueError("module 3 is broken")
        return x

    torch.set_num_threads(2)
    with pytest.raises(ValueError, match="module 3"):
        map_modules(boom, range(6))
    assert torch.get_num_threads() == 2
    assert map_modules(lambda x: x * x, range(5)) == [0, 1, 4, 9, 16]
