"""NC1-NC4 and linear CKA, checked against definitions, closed forms and a
naive implementation written here, never against their own output."""

import numpy as np
import pytest
import torch

import neural_collapse_cka as ncc

K = 10
NC_KEYS = ["nc1", "nc1_pinv", "nc2", "nc2_equinorm", "nc2_equiangle", "nc3", "nc4"]


def simplex_etf(k, d, radius, rng):
    """k ETF vectors of norm `radius` in R^d (d >= k - 1), randomly rotated."""
    centred = np.eye(k) - np.ones((k, k)) / k          # rows sum to 0, norm sqrt((k-1)/k)
    u, s, _ = np.linalg.svd(centred)
    coords = u[:, : k - 1] * s[: k - 1]                 # the same k points in R^(k-1)
    q, _ = np.linalg.qr(rng.standard_normal((d, k - 1)))
    return radius * np.sqrt(k / (k - 1)) * coords @ q.T


def random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def noisy_problem(rng, d=16, n_per_class=60, sigma=0.7, unequal=False):
    sizes = rng.integers(20, 90, size=K) if unequal else np.full(K, n_per_class)
    y = np.repeat(np.arange(K), sizes)
    means = rng.standard_normal((K, d)) * 2
    h = means[y] + sigma * rng.standard_normal((len(y), d)) + 3.0
    w = means - means.mean(0) + 0.5 * rng.standard_normal((K, d))
    return h, y, w


# ---- NC: closed-form cases -------------------------------------------------------------
@pytest.mark.parametrize("d", [9, 10, 32])
def test_exact_simplex_etf_gives_zero_for_every_nc(d):
    rng = np.random.default_rng(d)
    etf = simplex_etf(K, d, 2.5, rng)
    y = np.repeat(np.arange(K), 7)
    # features = their class means, centred: the classifier has no bias, so a global
    # offset would tilt W h and NC4 is only 0 for centred collapse (Papyan et al. 2020)
    h = etf[y]
    m = ncc.nc_metrics(h, y, 3.0 * etf)                 # W proportional to M
    for key in NC_KEYS + ["cdnv"]:
        assert abs(m[key]) <= 1e-10, (key, m[key])


def test_etf_plus_isotropic_noise_matches_the_closed_forms():
    # Sigma_W = s^2 I_d; Sigma_B has K-1 eigenvalues r^2/(K-1), so
    # Tr(Sigma_W Sigma_B^+)/K = s^2 (K-1)^2 / (K r^2) and Tr(Sigma_W)/Tr(Sigma_B) = d s^2/r^2.
    rng = np.random.default_rng(0)
    d, r, s = 12, 3.0, 0.8
    etf = simplex_etf(K, d, r, rng)
    y = np.repeat(np.arange(K), 2000)
    h = etf[y] + s * rng.standard_normal((len(y), d))
    m = ncc.nc_metrics(h, y, etf)
    assert m["nc1_pinv"] == pytest.approx(s**2 * (K - 1) ** 2 / (K * r**2), rel=0.02)
    assert m["nc1"] == pytest.approx(d * s**2 / r**2, rel=0.02)


def test_classifier_opposite_to_means_gives_nc3_two():
    rng = np.random.default_rng(1)
    h, y, _ = noisy_problem(rng)
    means = np.stack([h[y == k].mean(0) for k in range(K)])
    m = ncc.nc_metrics(h, y, -(means - means.mean(0)))
    assert m["nc3"] == pytest.approx(2.0, abs=1e-12)


# ---- NC: invariances -------------------------------------------------------------------
def test_nc_invariant_to_rotation_and_rescaling_of_features():
    rng = np.random.default_rng(2)
    h, y, w = noisy_problem(rng, unequal=True)
    q = random_orthogonal(h.shape[1], rng)
    base = ncc.nc_metrics(h, y, w)
    # rotating features and classifier together keeps the logits W h unchanged
    moved = ncc.nc_metrics(3.7 * h @ q, y, w @ q)
    for key in ["nc1", "nc1_pinv", "nc2", "nc2_equinorm", "nc2_equiangle", "nc4"]:
        assert moved[key] == pytest.approx(base[key], rel=1e-9, abs=1e-12), key
    assert 0 < base["nc4"] < 1  # a nontrivial NC4, so its invariance means something


def test_nc3_invariant_to_rescaling_classifier():
    rng = np.random.default_rng(3)
    h, y, w = noisy_problem(rng)
    assert ncc.nc_metrics(h, y, 0.01 * w)["nc3"] == pytest.approx(
        ncc.nc_metrics(h, y, w)["nc3"], rel=1e-12)


# ---- NC: agreement with a naive implementation ----------------------------------------
def naive_nc(h, y, w):
    """Loops over classes and samples, straight from the definitions (mu_G = mean of the
    class means, Sigma_W pooled over samples, Sigma_B averaged over classes)."""
    n, d = h.shape
    mu = np.zeros((K, d))
    for k in range(K):
        members = [h[i] for i in range(n) if y[i] == k]
        mu[k] = sum(members) / len(members)
    mu_g = sum(mu) / K
    sw = np.zeros((d, d))
    for i in range(n):
        v = (h[i] - mu[y[i]])[:, None]
        sw += v @ v.T / n
    sb = np.zeros((d, d))
    for k in range(K):
        v = (mu[k] - mu_g)[:, None]
        sb += v @ v.T / K
    sb_pinv = np.linalg.pinv(sb, rcond=1e-10, hermitian=True)
    m = mu - mu_g
    norms = np.array([np.sqrt(sum(m[k] ** 2)) for k in range(K)])
    cos = np.array([[m[a] @ m[b] / (norms[a] * norms[b]) for b in range(K)] for a in range(K)])
    etf = np.array([[1.0 if a == b else -1.0 / (K - 1) for b in range(K)] for a in range(K)])
    off = [cos[a, b] for a in range(K) for b in range(K) if a != b]
    mismatched = 0
    for i in range(n):
        dists = [np.sqrt(sum((h[i] - mu[k]) ** 2)) for k in range(K)]
        logits = [w[k] @ h[i] for k in range(K)]
        mismatched += int(np.argmin(dists) != np.argmax(logits))
    return {"nc1": np.trace(sw) / np.trace(sb),
            "nc1_pinv": np.trace(sw @ sb_pinv) / K,
            "nc2": np.sqrt(((cos - etf) ** 2).sum()),
            "nc2_equinorm": np.std(norms) / np.mean(norms),
            "nc2_equiangle": np.std(off),
            "nc3": np.sqrt(((w / np.sqrt((w**2).sum()) - m / np.sqrt((m**2).sum())) ** 2).sum()),
            "nc4": mismatched / n}


@pytest.mark.parametrize("d", [5, 16])
def test_agrees_with_naive_loops_on_unequal_classes(d):
    rng = np.random.default_rng(d)
    h, y, w = noisy_problem(rng, d=d, sigma=1.5, unequal=True)
    fast, slow = ncc.nc_metrics(h, y, w), naive_nc(h, y, w)
    for key in NC_KEYS:
        assert fast[key] == pytest.approx(slow[key], rel=1e-8, abs=1e-10), key
    assert 0 < fast["nc4"] < 1


def test_accepts_tensors_and_arrays_alike():
    rng = np.random.default_rng(4)
    h, y, w = noisy_problem(rng)
    a = ncc.nc_metrics(h, y, w)
    t = ncc.nc_metrics(torch.tensor(h, dtype=torch.float64), torch.tensor(y), torch.tensor(w))
    assert a == t and all(type(v) is float for v in a.values())


# ---- NC: numerical robustness ----------------------------------------------------------
def test_float32_features_in_512_dims_give_the_float64_answer():
    # The known failure: pinv of a float32 Sigma_B with a float64 default cut-off inverts
    # rounding noise in the 502 null directions and returns NC1 ~ -1e9.
    rng = np.random.default_rng(5)
    d = 512
    etf = simplex_etf(K, d, 3.0, rng)
    y = np.repeat(np.arange(K), 200)
    h64 = etf[y] + 0.5 * rng.standard_normal((len(y), d)) + 50.0
    h32 = h64.astype(np.float32)
    exact = ncc.nc_metrics(h64, y, etf)["nc1_pinv"]
    got = ncc.nc_metrics(h32, y, etf.astype(np.float32))["nc1_pinv"]
    assert 0.1 < exact < 0.3
    assert got == pytest.approx(exact, rel=1e-5)
    # the test is sensitive: the naive computation really does fail on this input
    mu = np.stack([h32[y == k].mean(0) for k in range(K)])
    sb = ((mu - mu.mean(0)).T @ (mu - mu.mean(0)) / K).astype(np.float32)
    sw = ((h32 - mu[y]).T @ (h32 - mu[y]) / len(y)).astype(np.float32)
    naive = np.trace(sw @ np.linalg.pinv(sb.astype(np.float64), rcond=1e-15)) / K
    assert abs(naive - exact) > 1.0


def test_feature_dim_below_k_minus_1_gives_finite_values():
    rng = np.random.default_rng(6)
    y = np.repeat(np.arange(K), 30)
    h = rng.standard_normal((K, 2))[y] + 0.1 * rng.standard_normal((len(y), 2))
    m = ncc.nc_metrics(h, y, rng.standard_normal((K, 2)))
    assert all(np.isfinite(v) for v in m.values())
    assert m["nc2"] > 0.5  # 10 points in 2-D cannot form a simplex ETF


def test_empty_class_warns_and_uses_the_classes_present():
    rng = np.random.default_rng(7)
    h, y, w = noisy_problem(rng)
    keep = y != 3
    with pytest.warns(UserWarning, match=r"classes \[3\] have no samples"):
        m = ncc.nc_metrics(h[keep], y[keep], w)
    # over the 9 present classes, it equals the problem restated with 9 classes
    relabel = np.searchsorted(np.delete(np.arange(K), 3), y[keep])
    ref = ncc.nc_metrics(h[keep], relabel, np.delete(w, 3, axis=0), num_classes=9)
    for key in NC_KEYS:
        assert m[key] == pytest.approx(ref[key], rel=1e-12), key


def test_degenerate_inputs_give_nan_with_a_warning_never_an_exception():
    y = np.repeat(np.arange(K), 5)
    with pytest.warns(UserWarning):
        m = ncc.nc_metrics(np.zeros((len(y), 4)), y, np.ones((K, 4)))
    assert np.isnan(m["nc1"]) and np.isnan(m["nc1_pinv"]) and np.isnan(m["nc2"])
    with pytest.warns(UserWarning):
        m = ncc.nc_metrics(np.ones((8, 4)), np.zeros(8, dtype=int), np.ones((K, 4)))
    assert all(np.isnan(v) for v in m.values())


def test_shape_mismatch_is_a_clear_error():
    with pytest.raises(ValueError, match="classifier"):
        ncc.nc_metrics(np.zeros((5, 3)), np.zeros(5, dtype=int), np.zeros((10, 4)))


# ---- linear CKA ------------------------------------------------------------------------
def gram_form_cka(x, y):
    """tr(K~ L~) / (||K~||_F ||L~||_F) with K = X X^T, L = Y Y^T and H the centring matrix."""
    n = len(x)
    hc = np.eye(n) - np.ones((n, n)) / n
    kc, lc = hc @ x @ x.T @ hc, hc @ y @ y.T @ hc
    return np.trace(kc @ lc) / (np.linalg.norm(kc) * np.linalg.norm(lc))


def test_cka_of_a_matrix_with_itself_is_one():
    x = np.random.default_rng(8).standard_normal((100, 7))
    assert ncc.linear_CKA(x, x) == pytest.approx(1.0, abs=1e-12)


def test_cka_invariances_and_symmetry():
    rng = np.random.default_rng(9)
    x = rng.standard_normal((120, 10))
    y = x @ rng.standard_normal((10, 6)) + rng.standard_normal((120, 6))
    base = ncc.linear_CKA(x, y)
    assert 0 < base < 1
    assert ncc.linear_CKA(y, x) == pytest.approx(base, rel=1e-12)
    assert ncc.linear_CKA(x @ random_orthogonal(10, rng), y) == pytest.approx(base, rel=1e-10)
    assert ncc.linear_CKA(5.0 * x, 0.1 * y) == pytest.approx(base, rel=1e-10)
    assert ncc.linear_CKA(x + 3.0, y - 7.0) == pytest.approx(base, rel=1e-10)
    general = rng.standard_normal((10, 10)) @ np.diag(np.linspace(0.1, 10, 10))
    assert abs(ncc.linear_CKA(x @ general, y) - base) > 1e-3


def test_cka_equals_its_gram_matrix_form_and_lies_in_unit_interval():
    rng = np.random.default_rng(10)
    for p, q in [(3, 5), (20, 2), (8, 8)]:
        x = rng.standard_normal((60, p)) + 1.0
        y = np.tanh(x[:, :1]) * rng.standard_normal((60, q)) + rng.standard_normal((60, q))
        value = ncc.linear_CKA(x, y)
        assert value == pytest.approx(gram_form_cka(x, y), rel=1e-10)
        assert 0.0 <= value <= 1.0


def test_cka_bias_for_independent_gaussians_is_d_over_n_plus_d():
    rng = np.random.default_rng(11)
    n, d = 500, 50
    values = [ncc.linear_CKA(rng.standard_normal((n, d)), rng.standard_normal((n, d)))
              for _ in range(5)]
    assert np.mean(values) == pytest.approx(d / (n + d), abs=0.02)


def test_cka_float32_with_large_offset_matches_float64():
    rng = np.random.default_rng(12)
    x = rng.standard_normal((500, 30))
    y = x[:, :10] @ rng.standard_normal((10, 20)) + rng.standard_normal((500, 20))
    x32, y32 = (x + 1000).astype(np.float32), (y + 1000).astype(np.float32)
    exact = ncc.linear_CKA(x32.astype(np.float64), y32.astype(np.float64))
    assert ncc.linear_CKA(torch.from_numpy(x32), torch.from_numpy(y32)) == pytest.approx(
        exact, abs=1e-6)
    assert exact == pytest.approx(ncc.linear_CKA(x, y), abs=1e-4)


def test_cka_of_a_constant_matrix_is_nan_with_a_warning():
    with pytest.warns(UserWarning):
        assert np.isnan(ncc.linear_CKA(np.ones((10, 3)), np.random.rand(10, 2)))
    with pytest.raises(ValueError, match="same n"):
        ncc.linear_CKA(np.ones((10, 3)), np.ones((9, 3)))
