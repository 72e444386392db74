"""The additions' metrics: NC in intermediate layers, debiased CKA, and the power-law fit of weight
spectra, checked against closed forms, sampling theory and naive implementations written
here."""

import numpy as np
import pytest

import neural_collapse_cka as ncc
from test_metrics import K, naive_nc, noisy_problem, random_orthogonal, simplex_etf


# ---- per-layer NC ----------------------------------------------------------------------
def test_layer_nc_of_collapsed_features_is_zero():
    rng = np.random.default_rng(0)
    etf = simplex_etf(K, 24, 1.7, rng)
    y = np.repeat(np.arange(K), 6)
    m = ncc.layer_nc_metrics(etf[y] + 5.0, y, y)   # an offset is harmless without W
    assert m["nc1"] <= 1e-12 and m["nc1_pinv"] <= 1e-12 and m["nc4"] == 0.0


def test_layer_nc_matches_naive_loops_and_counts_disagreement_with_the_network():
    rng = np.random.default_rng(1)
    h, y, w = noisy_problem(rng, d=12, sigma=1.5, unequal=True)
    decision = np.argmax(h @ w.T, axis=1)
    slow = naive_nc(h, y, w)                       # its NC4 uses argmax(W h) too
    fast = ncc.layer_nc_metrics(h, y, decision)
    for key in ("nc1", "nc1_pinv", "nc4"):
        assert fast[key] == pytest.approx(slow[key], rel=1e-8, abs=1e-12), key
    # against a decision that is always class 0, NC4 is the share of samples whose
    # nearest mean is another class
    nearest = np.argmin(((h[:, None, :] - ncc.class_means(h, y, np.arange(K))) ** 2).sum(2), 1)
    assert ncc.layer_nc_metrics(h, y, np.zeros_like(y))["nc4"] == pytest.approx(
        np.mean(nearest != 0))


def test_layer_nc_is_invariant_to_rotation_and_scale():
    rng = np.random.default_rng(2)
    h, y, w = noisy_problem(rng, d=9)
    decision = np.argmax(h @ w.T, axis=1)
    base = ncc.layer_nc_metrics(h, y, decision)
    moved = ncc.layer_nc_metrics(0.2 * h @ random_orthogonal(9, rng), y, decision)
    for key in base:
        assert moved[key] == pytest.approx(base[key], rel=1e-9), key


def test_layer_nc_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="decisions"):
        ncc.layer_nc_metrics(np.zeros((5, 3)), np.arange(5), np.arange(4))


# ---- debiased CKA ----------------------------------------------------------------------
def song_unbiased_hsic(gram_k, gram_l):
    """Song et al. (2012), eq. 5, written out on Gram matrices with zeroed diagonals."""
    n = len(gram_k)
    k, l = gram_k.copy(), gram_l.copy()
    np.fill_diagonal(k, 0.0)
    np.fill_diagonal(l, 0.0)
    one = np.ones(n)
    return (np.trace(k @ l) + (one @ k @ one) * (one @ l @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * one @ k @ l @ one) / (n * (n - 3))


def gram_form_debiased_cka(x, y):
    # raw (uncentred) features: the unbiased estimator is a U-statistic of differences,
    # so it must not depend on a shift of either input
    kx, ly = x @ x.T, y @ y.T
    return song_unbiased_hsic(kx, ly) / np.sqrt(song_unbiased_hsic(kx, kx)
                                                 * song_unbiased_hsic(ly, ly))


def test_debiased_cka_equals_its_gram_matrix_form():
    rng = np.random.default_rng(3)
    for n, p, q in [(40, 3, 5), (60, 20, 2), (30, 50, 40)]:
        x = rng.standard_normal((n, p)) + 2.0
        y = np.tanh(x[:, :1]) * rng.standard_normal((n, q)) + rng.standard_normal((n, q)) - 1
        assert ncc.debiased_linear_CKA(x, y) == pytest.approx(gram_form_debiased_cka(x, y),
                                                              rel=1e-9, abs=1e-12)


def test_debiased_cka_of_a_matrix_with_itself_is_one_and_invariances_hold():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((80, 12))
    y = x[:, :4] @ rng.standard_normal((4, 7)) + rng.standard_normal((80, 7))
    assert ncc.debiased_linear_CKA(x, x) == pytest.approx(1.0, abs=1e-12)
    base = ncc.debiased_linear_CKA(x, y)
    assert ncc.debiased_linear_CKA(y, x) == pytest.approx(base, rel=1e-12)
    assert ncc.debiased_linear_CKA(3.0 * x @ random_orthogonal(12, rng) + 9.0, 0.5 * y) == \
        pytest.approx(base, rel=1e-9)


def test_debiased_cka_removes_the_bias_of_linear_cka_for_independent_data():
    rng = np.random.default_rng(5)
    n, d = 500, 200
    pairs = [(rng.standard_normal((n, d)), rng.standard_normal((n, d))) for _ in range(5)]
    biased = np.mean([ncc.linear_CKA(a, b) for a, b in pairs])
    debiased = [ncc.debiased_linear_CKA(a, b) for a, b in pairs]
    assert biased == pytest.approx(d / (n + d), abs=0.02)   # about 0.29
    assert abs(np.mean(debiased)) < 0.01


def test_debiased_cka_needs_four_samples_and_a_nonconstant_input():
    with pytest.raises(ValueError, match="at least 4"):
        ncc.debiased_linear_CKA(np.ones((3, 2)), np.ones((3, 2)))
    with pytest.warns(UserWarning, match="not positive"):
        assert np.isnan(ncc.debiased_linear_CKA(np.ones((10, 3)), np.random.rand(10, 2)))


# ---- ESD and power-law fit -------------------------------------------------------------
def pareto_sample(alpha, n, xmin, rng):
    """Inverse CDF of p(x) ~ x^-alpha on [xmin, inf): x = xmin (1 - u)^(-1 / (alpha - 1))."""
    return xmin * (1.0 - rng.random(n)) ** (-1.0 / (alpha - 1.0))


@pytest.mark.parametrize("alpha", [2.0, 3.0, 4.0])
def test_powerlaw_fit_recovers_alpha_of_a_pareto_sample_within_three_sigma(alpha):
    rng = np.random.default_rng(int(alpha * 10))
    fit = ncc.powerlaw_alpha(pareto_sample(alpha, 3000, 0.5, rng))
    sigma = (fit["alpha"] - 1) / np.sqrt(fit["num_tail"])
    assert abs(fit["alpha"] - alpha) < 3 * sigma
    assert fit["num_evals"] == 3000 and fit["reliable"]
    assert fit["xmin"] >= 0.5 and 0 <= fit["D"] < 0.05


def naive_powerlaw_fit(x):
    """The same procedure, one candidate at a time, with the empirical CDF of the `powerlaw`
    package: j/n at the j-th smallest tail value, j = 0 .. n-1."""
    x = sorted(x)
    best = None
    for i in range(len(x) - 1):
        tail = x[i:]
        n = len(tail)
        alpha = 1 + n / sum(np.log(v / tail[0]) for v in tail)
        gaps = []
        for j, v in enumerate(tail):
            fitted = 1 - (v / tail[0]) ** (1 - alpha)
            gaps.append(abs(j / n - fitted))
        if best is None or max(gaps) < best[2]:
            best = (alpha, tail[0], max(gaps))
    return best


def test_powerlaw_fit_matches_naive_search_and_is_scale_invariant():
    rng = np.random.default_rng(6)
    x = np.exp(rng.standard_normal(120)) ** 2      # a lognormal "spectrum"
    fit = ncc.powerlaw_alpha(x)
    alpha, xmin, d = naive_powerlaw_fit(x)
    assert (fit["alpha"], fit["xmin"], fit["D"]) == pytest.approx((alpha, xmin, d), rel=1e-10)
    scaled = ncc.powerlaw_alpha(1e-3 * x)
    assert scaled["alpha"] == pytest.approx(fit["alpha"], rel=1e-10)
    assert scaled["D"] == pytest.approx(fit["D"], rel=1e-10)
    assert scaled["xmin"] == pytest.approx(1e-3 * fit["xmin"], rel=1e-10)


def test_powerlaw_fit_flags_small_spectra_and_degenerate_ones():
    rng = np.random.default_rng(7)
    small = ncc.powerlaw_alpha(pareto_sample(3.0, 49, 1.0, rng))
    assert small["num_evals"] == 49 and not small["reliable"] and np.isfinite(small["alpha"])
    flat = ncc.powerlaw_alpha(np.ones(60))
    assert np.isnan(flat["alpha"]) and flat["num_tail"] == 0
    zeros_dropped = ncc.powerlaw_alpha(np.concatenate([np.zeros(5), np.arange(1.0, 11.0)]))
    assert zeros_dropped["num_evals"] == 10


def test_weight_eigenvalues_pool_conv_taps_and_equal_those_of_w_transpose_w():
    rng = np.random.default_rng(8)
    conv = rng.standard_normal((6, 4, 3))          # (out, in, k): three 6 x 4 matrices
    expected = np.sort(np.concatenate([np.linalg.eigvalsh(conv[:, :, t].T @ conv[:, :, t])
                                       for t in range(3)]))
    assert ncc.weight_eigenvalues(conv) == pytest.approx(expected, rel=1e-10, abs=1e-12)
    wide = rng.standard_normal((10, 32))           # rank 10: 10 eigenvalues, not 32
    evals = ncc.weight_eigenvalues(wide)
    assert len(evals) == 10
    assert evals == pytest.approx(np.linalg.eigvalsh(wide.T @ wide)[-10:], rel=1e-10)


def test_spectral_norm_and_stable_rank():
    rng = np.random.default_rng(9)
    q = random_orthogonal(8, rng)
    w = np.diag([3.0, 1.0, 1.0, 0.5]) @ q[:4]      # singular values 3, 1, 1, 0.5
    m = ncc.esd_metrics(w)
    assert m["spectral_norm"] == pytest.approx(9.0)
    assert m["stable_rank"] == pytest.approx((9 + 1 + 1 + 0.25) / 9)
    assert ncc.esd_metrics(5.0 * w)["alpha"] == pytest.approx(m["alpha"], rel=1e-10)
    with pytest.raises(ValueError, match="out, in"):
        ncc.weight_eigenvalues(np.zeros(4))


def test_cdnv_closed_form_two_classes_in_one_dimension():
    # class 0 at -1 and +1 (mean 0, variance 1), class 1 at 9 and 11 (mean 10, variance 1):
    # (1 + 1) / (2 * 10^2) = 0.01
    h = np.array([[-1.0], [1.0], [9.0], [11.0]])
    y = np.array([0, 0, 1, 1])
    assert ncc.layer_nc_metrics(h, y, y, num_classes=2)["cdnv"] == pytest.approx(0.01, abs=1e-15)
    w = np.array([[-1.0], [1.0]])
    assert ncc.nc_metrics(h, y, w, num_classes=2)["cdnv"] == pytest.approx(0.01, abs=1e-15)


def test_cdnv_matches_a_loop_over_class_pairs_and_is_zero_at_collapse():
    rng = np.random.default_rng(3)
    K, d, n = 5, 7, 300
    y = rng.integers(0, K, n)
    h = rng.normal(size=(K, d))[y] * 3 + rng.normal(size=(n, d))
    expected = []
    for i in range(K):
        for j in range(i + 1, K):
            hi, hj = h[y == i], h[y == j]
            var_i = np.mean(np.sum((hi - hi.mean(0)) ** 2, axis=1))
            var_j = np.mean(np.sum((hj - hj.mean(0)) ** 2, axis=1))
            expected.append((var_i + var_j) / (2 * np.sum((hi.mean(0) - hj.mean(0)) ** 2)))
    got = ncc.layer_nc_metrics(h, y, y, num_classes=K)["cdnv"]
    assert got == pytest.approx(np.mean(expected), rel=1e-13)
    # every sample on its class mean: no within-class variance
    means = rng.normal(size=(K, d))
    assert ncc.layer_nc_metrics(means[y], y, y, num_classes=K)["cdnv"] <= 1e-25


def test_precision_weighted_alpha_weighs_each_fit_by_its_tail_over_its_spread():
    fits = [{"alpha": 3.0, "num_tail": 40}, {"alpha": 674.0, "num_tail": 3},
            {"alpha": float("nan"), "num_tail": 0}]
    w = [40 / 2.0 ** 2, 3 / 673.0 ** 2]
    expected = (w[0] * 3.0 + w[1] * 674.0) / (w[0] + w[1])
    assert ncc.precision_weighted_alpha(fits) == pytest.approx(expected, rel=1e-15)
    assert abs(ncc.precision_weighted_alpha(fits) - 3.0) < 0.001  # the plain mean: 338.5
    assert np.isnan(ncc.precision_weighted_alpha(fits[2:]))
    esd = ncc.model_esd(ncc.make_model("ResNet", 8, seed=0))
    layers = [m for m in esd["layers"].values() if np.isfinite(m["alpha"])]
    weights = [m["num_tail"] / (m["alpha"] - 1) ** 2 for m in layers]
    assert esd["alpha_weighted"] == pytest.approx(
        sum(w * m["alpha"] for w, m in zip(weights, layers)) / sum(weights), rel=1e-12)
