"""neural_collapse_cka.py -- double descent, neural collapse and CKA on MNIST-1D.

One script, read top to bottom like a paper's appendix:

    1. hyperparameters (module-level globals; `--set NAME=VALUE` overrides any of them)
    2. data       MNIST-1D generated locally, cached as .npz, 20% symmetric label noise
    3. models     ResNet-1D(w) and CNN-1D(w), each exposing layers L0..L3
    4. metrics    NC1-NC4 (Papyan, Han & Donoho, PNAS 2020) and linear CKA
                  (Kornblith et al., ICML 2019), pure functions in float64

References
    Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep
        learning training", PNAS 117(40), 2020.
    Kornblith, Norouzi, Lee & Hinton, "Similarity of neural network representations
        revisited", ICML 2019.
    Nakkiran et al., "Deep double descent", ICLR 2020.
    Greydanus, "Scaling down deep learning" (MNIST-1D), 2020.
"""

import hashlib
import os
import tempfile
import warnings

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------
# 1. Hyperparameters. Every value of SPEC sections 4 and 6; the `full` preset uses these.
# ----------------------------------------------------------------------------------------
SEED = 42                      # root of every derived seed (data noise, inits, data order)
LABEL_NOISE = 0.20             # fraction of training labels moved to a different class
NUM_CLASSES = 10
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

BATCH_SIZE = 128
SGD_LR = 0.01                  # SGD with momentum, cosine-annealed to 0 over the run
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
ADAM_LR = 1e-3                 # Adam, constant learning rate
ADAM_WEIGHT_DECAY = 1e-4

# Exp 1: model-wise double descent and NC across widths
WIDTHS = [2, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64]
EPOCHS_MODEL_WISE = 3000
# Exp 2: epoch-wise double descent (ResNet-1D, Adam)
EPOCH_WISE_WIDTHS = {"critical": 12, "large": 64}
EPOCHS_EPOCH_WISE = 15000
EPOCH_WISE_POINTS = 60         # log-spaced evaluation epochs (dense early)
# Exp 3: generalised NC, ResNet-1D(64) with a projector to d dimensions (SGD)
GEN_NC_WIDTH = 64
DIMS = [2, 3, 5, 8, 9, 10, 12, 16]
EPOCHS_GEN_NC = 3000
# Exp 4: layer-wise linear CKA (Adam)
EPOCHS_CKA = 2000
CKA_SMALL_WIDTH = 8
CKA_LARGE_WIDTH = 64
CKA_WIDTH = 32
CKA_DRIFT_EPOCHS = [1, 50, 200, 500, 1000, 2000]
CKA_SEEDS = [42, 123, 456]
CKA_SUBSET = 500               # fixed, seeded subset of training inputs for CKA

# Metrics: Sigma_B is pseudo-inverted on its top min(K-1, d) eigenpairs, and of those only
# eigenvalues above PINV_RTOL * (largest eigenvalue) are kept (see `nc1_pinv`).
PINV_RTOL = 1e-10


# ----------------------------------------------------------------------------------------
# 2. Data: MNIST-1D (Greydanus 2020), generated locally, cached as .npz (no pickle)
# ----------------------------------------------------------------------------------------
def _mnist1d_args():
    import mnist1d.data  # imported lazily: it pulls in scipy and matplotlib
    return mnist1d.data.get_dataset_args()


def _cache_path(args):
    # The file name carries a digest of the generator's arguments, so a different
    # mnist1d configuration never reuses this cache.
    fields = {k: v for k, v in vars(args).items() if k != "url"}
    digest = hashlib.sha256(repr(sorted(fields.items())).encode()).hexdigest()[:12]
    return os.path.join(DATA_DIR, f"mnist1d_{digest}.npz")


def _expected_shapes(args):
    n_train = int(args.num_samples * args.train_split)
    n_test = args.num_samples - n_train
    length = args.final_seq_length
    return {"x": (n_train, length), "y": (n_train,),
            "x_test": (n_test, length), "y_test": (n_test,)}


def _load_cache(path, shapes):
    """The cached arrays, or None (with the reason) when the file is missing or invalid."""
    if not os.path.exists(path):
        return None, None
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in shapes}
    except Exception as e:  # truncated zip, garbage bytes, missing key, object array ...
        return None, f"unreadable ({type(e).__name__}: {e})"
    for key, shape in shapes.items():
        a = arrays[key]
        if a.shape != shape:
            return None, f"'{key}' has shape {a.shape}, expected {shape}"
        if key.startswith("x") and (a.dtype.kind != "f" or not np.isfinite(a).all()):
            return None, f"'{key}' is not a finite float array"
        if key.startswith("y") and (a.dtype.kind not in "iu" or a.min() < 0
                                    or a.max() >= NUM_CLASSES):
            return None, f"'{key}' is not integer labels in [0, {NUM_CLASSES})"
    return arrays, None


def _atomic_write_npz(path, arrays):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npz.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_mnist1d(cache_path=None):
    """Clean MNIST-1D as numpy arrays {x, y, x_test, y_test}, from the cache or generated.

    `mnist1d.data.make_dataset` reseeds NumPy's global RNG (and Python's `random`); the
    label noise below therefore uses its own generator and nothing here reads global state.
    """
    import mnist1d.data
    args = _mnist1d_args()
    path = cache_path or _cache_path(args)
    shapes = _expected_shapes(args)
    arrays, problem = _load_cache(path, shapes)
    if arrays is not None:
        return arrays
    if problem is not None:
        warnings.warn(f"MNIST-1D cache {path} is invalid ({problem}); regenerating it")
    dataset = mnist1d.data.make_dataset(args)  # local generation: no download
    arrays = {"x": dataset["x"].astype(np.float32), "y": dataset["y"].astype(np.int64),
              "x_test": dataset["x_test"].astype(np.float32),
              "y_test": dataset["y_test"].astype(np.int64)}
    try:
        _atomic_write_npz(path, arrays)
    except OSError as e:  # a read-only checkout still works, just without a cache
        warnings.warn(f"could not write the MNIST-1D cache {path}: {e}")
    return arrays


def corrupt_labels(labels, noise, seed, num_classes=NUM_CLASSES):
    """Symmetric label noise: exactly round(noise * n) samples, chosen without replacement,
    each moved to a uniformly random *different* class. Returns (noisy labels, mask)."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)  # seeded by `seed` alone, never the global RNG
    n_noisy = int(round(noise * len(labels)))
    noisy_idx = rng.choice(len(labels), size=n_noisy, replace=False)
    shift = rng.integers(1, num_classes, size=n_noisy)  # 1..K-1: never the same class
    noisy = labels.copy()
    noisy[noisy_idx] = (labels[noisy_idx] + shift) % num_classes
    mask = np.zeros(len(labels), dtype=bool)
    mask[noisy_idx] = True
    return noisy, mask


def get_data(label_noise=LABEL_NOISE, seed=SEED, device=None, cache_path=None):
    """MNIST-1D with `label_noise` symmetric noise on the training labels, as tensors.

    Returns {x_train (4000, 40), y_train (noisy), y_train_clean, noise_mask, x_test (1000, 40),
    y_test}. Test labels are never corrupted.
    """
    if not 0.0 <= label_noise < 1.0:
        raise ValueError(f"label_noise must be in [0, 1), got {label_noise}")
    clean = load_mnist1d(cache_path)
    y_noisy, mask = corrupt_labels(clean["y"], label_noise, seed)
    out = {"x_train": clean["x"], "y_train": y_noisy, "y_train_clean": clean["y"],
           "noise_mask": mask, "x_test": clean["x_test"], "y_test": clean["y_test"]}
    return {k: torch.as_tensor(v, device=device) for k, v in out.items()}


# ----------------------------------------------------------------------------------------
# 3. Models. Inputs (n, 40) or (n, 1, 40). `features(x)` returns the layer representations
#    [L0, L1, L2, L3] of one forward pass; L3 is the penultimate feature h (n, d) and
#    `classifier(h)` the logits, so features and logits never need two passes.
# ----------------------------------------------------------------------------------------
def conv_bn_relu(c_in, c_out):
    # No conv bias: the BatchNorm right after it has its own shift.
    return nn.Sequential(nn.Conv1d(c_in, c_out, 3, padding=1, bias=False),
                         nn.BatchNorm1d(c_out), nn.ReLU())


class ResBlock(nn.Module):
    """Conv-BN-ReLU-Conv-BN plus the identity skip, then ReLU: 6w^2 + 4w parameters."""

    def __init__(self, width):
        super().__init__()
        self.conv1 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm1d(width)
        self.conv2 = nn.Conv1d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm1d(width)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(out)))


def _as_channels(x):
    return x.unsqueeze(1) if x.dim() == 2 else x


class ResNet1D(nn.Module):
    """Stem (L0) -> ResBlock (L1) -> ResBlock (L2) -> global average pool (L3 = h in R^w)
    [-> optional Linear(w -> d) projector, then L3 = h in R^d] -> Linear(d -> 10), no bias.
    Parameters: 12w^2 + 23w without the projector, 12w^2 + 13w + wd + 10d with it."""

    def __init__(self, width, feature_dim=None):
        super().__init__()
        self.width, self.feature_dim = width, feature_dim
        self.stem = conv_bn_relu(1, width)
        self.block1 = ResBlock(width)
        self.block2 = ResBlock(width)
        self.projector = (nn.Linear(width, feature_dim, bias=False)
                          if feature_dim is not None else None)
        self.classifier = nn.Linear(feature_dim or width, NUM_CLASSES, bias=False)

    def features(self, x):
        l0 = self.stem(_as_channels(x))
        l1 = self.block1(l0)
        l2 = self.block2(l1)
        h = l2.mean(dim=2)
        if self.projector is not None:
            h = self.projector(h)
        return [l0, l1, l2, h]

    def forward(self, x):
        return self.classifier(self.features(x)[-1])


class CNN1D(nn.Module):
    """[Conv(1->w)+BN+ReLU+MaxPool2] (L0), [Conv(w->w)+BN+ReLU+MaxPool2] (L1),
    [Conv(w->2w)+BN+ReLU] (L2), [Conv(2w->2w)+BN+ReLU] + global average pool (L3 = h in
    R^{2w}) -> Linear(2w -> 10), no bias. Parameters: 21w^2 + 35w."""

    def __init__(self, width):
        super().__init__()
        self.width = width
        self.block1 = nn.Sequential(conv_bn_relu(1, width), nn.MaxPool1d(2))
        self.block2 = nn.Sequential(conv_bn_relu(width, width), nn.MaxPool1d(2))
        self.block3 = conv_bn_relu(width, 2 * width)
        self.block4 = conv_bn_relu(2 * width, 2 * width)
        self.classifier = nn.Linear(2 * width, NUM_CLASSES, bias=False)

    def features(self, x):
        l0 = self.block1(_as_channels(x))
        l1 = self.block2(l0)
        l2 = self.block3(l1)
        h = self.block4(l2).mean(dim=2)
        return [l0, l1, l2, h]

    def forward(self, x):
        return self.classifier(self.features(x)[-1])


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------
# 4. Metrics: pure functions, arrays or tensors in, floats out, computed in float64.
#
# Notation (Papyan et al. 2020): h_i the penultimate features, y_i their labels, K classes,
# mu_k the class means, mu_G the global mean, M (K x d) the centred means mu_k - mu_G,
# W (K x d) the classifier.
#   Sigma_W = (1/n) sum_i (h_i - mu_{y_i})(h_i - mu_{y_i})^T    (pooled over all samples)
#   Sigma_B = (1/K) sum_k (mu_k - mu_G)(mu_k - mu_G)^T
# Convention: mu_G is the mean of the class means, not of the samples. With balanced classes
# the two coincide (Papyan's setting); with unbalanced ones (label noise makes the classes
# slightly unequal) this choice keeps the rows of M summing to zero, as the rows of a
# simplex ETF do, so an exact ETF scores NC2 = 0 whatever the class sizes.
# ----------------------------------------------------------------------------------------
def _float64(a):
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=np.float64)


def _ratio(numerator, denominator, what):
    """numerator / denominator, or NaN with a warning when the denominator vanishes."""
    if not np.isfinite(denominator) or denominator <= np.finfo(np.float64).tiny:
        warnings.warn(f"{what}: denominator is zero; returning NaN")
        return float("nan")
    return float(numerator / denominator)


def class_means(h, y, classes):
    return np.stack([h[y == k].mean(axis=0) for k in classes])


def within_class_cov(h, y, means, classes):
    centred = h - means[np.searchsorted(classes, y)]
    return centred.T @ centred / len(h)


def between_class_cov(centred_means):
    return centred_means.T @ centred_means / len(centred_means)


def nc1_trace_ratio(sigma_w, sigma_b):
    """NC1 as Tr(Sigma_W) / Tr(Sigma_B)."""
    return _ratio(np.trace(sigma_w), np.trace(sigma_b), "NC1 Tr(Sigma_W)/Tr(Sigma_B)")


def nc1_pinv(sigma_w, sigma_b, num_classes):
    """NC1 as Tr(Sigma_W Sigma_B^+) / K (Papyan et al. 2020).

    Sigma_B has rank at most min(K-1, d); its pseudo-inverse is taken on the top
    min(K-1, d) eigenpairs, and of those only eigenvalues > PINV_RTOL * lambda_max. Rounding
    makes the remaining eigenvalues tiny but nonzero, and inverting them (as a default
    pinv cut-off applied to float32 data can) blows NC1 up by orders of magnitude.
    """
    evals, evecs = np.linalg.eigh(sigma_b)  # ascending
    rank = min(num_classes - 1, sigma_b.shape[0])
    evals, evecs = evals[::-1][:rank], evecs[:, ::-1][:, :rank]
    if evals.size == 0 or evals[0] <= 0:
        warnings.warn("NC1 Tr(Sigma_W Sigma_B^+)/K: Sigma_B is zero; returning NaN")
        return float("nan")
    keep = evals > PINV_RTOL * evals[0]
    evals, evecs = evals[keep], evecs[:, keep]
    # Tr(Sigma_W V diag(1/lambda) V^T) = sum_j v_j^T Sigma_W v_j / lambda_j
    return float(np.sum(np.einsum("dj,de,ej->j", evecs, sigma_w, evecs) / evals) / num_classes)


def simplex_etf_gram(num_classes):
    """Gram matrix of a simplex ETF with unit vectors: K/(K-1) (I - 11^T/K)."""
    k = num_classes
    return k / (k - 1) * (np.eye(k) - np.ones((k, k)) / k)


def nc2_metrics(centred_means):
    """NC2: ||G - G_ETF||_F for G the Gram matrix of the unit-normalised centred means;
    equinorm std/mean of ||mu_k - mu_G||; equiangularity std of the off-diagonal cosines."""
    norms = np.linalg.norm(centred_means, axis=1)
    if norms.min() <= np.finfo(np.float64).tiny:
        warnings.warn("NC2: a centred class mean is zero; returning NaN")
        return float("nan"), float("nan"), float("nan")
    unit = centred_means / norms[:, None]
    gram = unit @ unit.T
    k = len(gram)
    off_diagonal = gram[~np.eye(k, dtype=bool)]
    return (float(np.linalg.norm(gram - simplex_etf_gram(k))),
            float(norms.std() / norms.mean()),
            float(off_diagonal.std()))


def nc3_self_duality(classifier_weight, centred_means):
    """NC3: || W/||W||_F - M/||M||_F ||_F, in [0, 2]."""
    w_norm = np.linalg.norm(classifier_weight)
    m_norm = np.linalg.norm(centred_means)
    if min(w_norm, m_norm) <= np.finfo(np.float64).tiny:
        warnings.warn("NC3: W or M is zero; returning NaN")
        return float("nan")
    return float(np.linalg.norm(classifier_weight / w_norm - centred_means / m_norm))


def nc4_ncc_mismatch(h, means, classes, classifier_weight):
    """NC4: fraction of samples whose nearest class mean, argmin_k ||h - mu_k||, differs from
    the network's decision argmax_k (W h)_k; `classes` names the rows of means and W."""
    network = classes[np.argmax(h @ classifier_weight.T, axis=1)]
    sq_dist = (h ** 2).sum(1)[:, None] - 2 * h @ means.T + (means ** 2).sum(1)[None, :]
    nearest = classes[np.argmin(sq_dist, axis=1)]
    return float(np.mean(network != nearest))


def nc_metrics(features, labels, classifier_weight, num_classes=NUM_CLASSES):
    """NC1-NC4 of penultimate features (n, d) with labels (n,) and classifier W (K, d).

    Returns floats nc1 (trace ratio), nc1_pinv, nc2, nc2_equinorm, nc2_equiangle, nc3, nc4.
    A class without samples is left out with a warning: every metric is then computed over
    the classes present (K' of them, using the matching rows of W); fewer than two classes
    present gives NaN throughout. d < K-1 is allowed: the values are finite, but an ETF of
    K points does not fit in d dimensions, so NC2 and NC3 cannot reach 0.
    """
    h, w = _float64(features), _float64(classifier_weight)
    y = np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)
    if h.ndim != 2 or y.shape != (len(h),) or w.shape != (num_classes, h.shape[1]):
        raise ValueError(f"nc_metrics expects features (n, d), labels (n,) and classifier "
                         f"weight ({num_classes}, d); got {h.shape}, {y.shape}, {w.shape}")
    classes = np.unique(y)
    if len(classes) < num_classes:
        missing = sorted(set(range(num_classes)) - set(classes.tolist()))
        warnings.warn(f"nc_metrics: classes {missing} have no samples; metrics use the "
                      f"{len(classes)} classes present")
    names = ["nc1", "nc1_pinv", "nc2", "nc2_equinorm", "nc2_equiangle", "nc3", "nc4"]
    if len(classes) < 2:
        return {name: float("nan") for name in names}
    w = w[classes]
    means = class_means(h, y, classes)
    centred_means = means - means.mean(axis=0)
    sigma_w = within_class_cov(h, y, means, classes)
    sigma_b = between_class_cov(centred_means)
    nc2, equinorm, equiangle = nc2_metrics(centred_means)
    return {"nc1": nc1_trace_ratio(sigma_w, sigma_b),
            "nc1_pinv": nc1_pinv(sigma_w, sigma_b, len(classes)),
            "nc2": nc2, "nc2_equinorm": equinorm, "nc2_equiangle": equiangle,
            "nc3": nc3_self_duality(w, centred_means),
            "nc4": nc4_ncc_mismatch(h, means, classes, w)}


def linear_CKA(X, Y):
    """Linear CKA (Kornblith et al. 2019, feature-space form), in float64:
    X, Y column-centred,  CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x, y = _float64(X), _float64(Y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"linear_CKA expects (n, p) and (n, q) with the same n; "
                         f"got {x.shape} and {y.shape}")
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    cross = np.linalg.norm(y.T @ x) ** 2
    return _ratio(cross, np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y), "linear_CKA")
