"""neural_collapse_cka.py -- double descent, neural collapse and CKA on MNIST-1D.

One script, read top to bottom like a paper's appendix. First the study:

    1. hyperparameters (module-level globals; `--set NAME=VALUE` overrides any of them),
                  then the run settings, which change at most rounding
    2. data       MNIST-1D generated locally, cached as .npz, 20% symmetric label noise
    3. models     ResNet-1D(w) and CNN-1D(w), each exposing layers L0..L3
    4. metrics    NC1-NC4 (Papyan, Han & Donoho, PNAS 2020), NC in every layer, linear and
                  debiased CKA, power-law fits of weight spectra; pure functions in float64
    5. training   one loop for every model, many models side by side (FusedModels)
    6. experiments  each one's setup, checkpoint measure and summary
    7. figures    the composite, the per-layer / weight-spectrum figure, the width x epoch
                  picture; then EXPERIMENTS, the index of the experiments

then what runs it, which the study never calls:

    8. records    per-model records and per-group snapshots that make a rerun resume, and
                  the run_* drivers that run one experiment from Python
    9. workers    processes that train groups side by side; progress; stops
    10. the study as a whole: plan, shards, collect, merge
    11. command line

References
    Papyan, Han & Donoho, "Prevalence of neural collapse during the terminal phase of deep
        learning training", PNAS 117(40), 2020.
    Kornblith, Norouzi, Lee & Hinton, "Similarity of neural network representations
        revisited", ICML 2019.
    Nakkiran et al., "Deep double descent", ICLR 2020.
    Greydanus, "Scaling down deep learning" (MNIST-1D), 2020.
    Galanti, Gyorgy & Hutter, "On the role of neural collapse in transfer learning", ICLR
        2022 (CDNV).
    Rangamani, Lindegaard, Galanti & Poggio, "Feature learning in deep classifiers through
        intermediate neural collapse", ICML 2023.
    Song, Smola, Gretton, Bedo & Borgwardt, "Feature selection via dependence maximization",
        JMLR 13, 2012 (the unbiased HSIC estimator).
    Martin & Mahoney, "Implicit self-regularization in deep neural networks: evidence from
        random matrix theory and implications for learning", JMLR 22, 2021.
    Clauset, Shalizi & Newman, "Power-law distributions in empirical data", SIAM Review
        51(4), 2009.
    Alstott, Bullmore & Plenz, "powerlaw: a Python package for analysis of heavy-tailed
        distributions", PLoS ONE 9(1), e85777, 2014.
"""

import argparse
import ast
import contextlib
import dataclasses
import errno
import functools
import hashlib
import importlib
import json
import os
import pickle
import platform
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings

# On the command line a Ctrl-C while this file loads (seconds, mostly torch) waits until
# it has (the end of the file): one raised inside torch's compiled start-up aborts the
# process ("terminate called after throwing an instance of 'pybind11::error_already_set'").
# Worker processes start with it held too (`_ctrl_c_held`).
_CTRL_C_WHILE_LOADING = []
if __name__ == "__main__":
    signal.signal(signal.SIGINT, lambda signum, frame: _CTRL_C_WHILE_LOADING.append(signum))
_IMPORT_START = time.perf_counter()
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

# How long importing torch took here: a worker process pays it again when it starts, so it
# is the unit of the fixed costs in the run-time estimate (`study_estimate`). A fact about
# this process, not a hyperparameter (names with a leading underscore are not).
_IMPORT_SECONDS = max(time.perf_counter() - _IMPORT_START, 0.5)

# ----------------------------------------------------------------------------------------
# 1. Hyperparameters: the study as published; the `full` preset uses these.
# ----------------------------------------------------------------------------------------
SEED = 42                      # root of every derived seed (data noise, inits, data order)
LABEL_NOISE = 0.20             # fraction of training labels moved to a different class
NUM_CLASSES = 10
TRAIN_SUBSET = None            # None: all 4000 training samples; an int: a stratified subset
REPLICATES = 1                 # models per Exp 1-3 point, each with its own derived seed

BATCH_SIZE = 128
SGD_LR = 0.01                  # SGD with momentum, cosine-annealed to 0 over the run
SGD_MOMENTUM = 0.9
SGD_WEIGHT_DECAY = 5e-4
ADAM_LR = 1e-3                 # Adam, constant learning rate
ADAM_WEIGHT_DECAY = 1e-4
# Exp 1: model-wise double descent and NC across widths
WIDTHS = [2, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64]
EPOCHS_MODEL_WISE = 3000
MODEL_WISE_POINTS = 30         # log-spaced epochs at which every model's train and test
                               # error are evaluated: the width x epoch picture (0: none)
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
CKA_ESTIMATOR = "linear"       # "linear" (Kornblith et al. 2019), "debiased" (Song et al. 2012)
CKA_CONV = "pool"              # conv activations (n, C, L): "pool" over L, or "flatten" to C*L

# Metrics: Sigma_B is pseudo-inverted on its top min(K-1, d) eigenpairs, and of those only
# eigenvalues above PINV_RTOL * (largest eigenvalue) are kept (see `nc1_pinv`).
PINV_RTOL = 1e-10

# Run settings: how the study runs, not what it is. None changes a number beyond its last
# digits. Those marked (rounding) can change rounding, so a record's key holds what they
# decide: which models trained fused together, the threads a group trained on and the
# rounding mode, with the device type. The others change no number.
_STUDY_NAMES = set(globals())
DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
FUSED = True                   # (rounding) train models of one architecture side by side
                               # (FusedModels)
CPU_GROUP_WIDTH = 64           # (rounding) CPU: neighbouring widths fused while G x widest
                               # <= this
WORKERS = 0                    # (rounding) CPU worker processes; 0: one per core this
                               # process may use (GPU: 1). With two or more, each group
                               # trains on one thread, so 2 and 16 give the same numbers;
                               # with 1, on all of torch's threads
FLUSH_DENORMALS = True         # (rounding) CPU: subnormal floats (below 1.2e-38) computed
                               # as 0 (FTZ and DAZ): in long runs weight decay drives idle
                               # weights and Adam's moments there, where x86 arithmetic is
                               # many times slower
CUDA_GRAPHS = False            # (rounding) GPU: replay each epoch after the first as one
                               # CUDA graph (EpochGraph); off until a resumed run with
                               # graphs has been seen on a GPU (docs/running.md)
PROGRESS_SECONDS = 30.0        # a progress line for each training group at least this often
SNAPSHOT_SECONDS = 120.0       # a group in training saves its state at least this often, so
                               # a stop loses at most this much of its training (not results)
FIGURE_DPI = 110
RUN_SETTINGS = [name for name in globals() if name.isupper() and not name.startswith("_")
                and name not in _STUDY_NAMES]

# Presets: overrides of the globals above. `full` is the study as specified; `quick` draws
# the whole figure in minutes on a 2-core CPU, on a stratified 1000-sample training subset
# (still exactly 20% noisy) with a larger SGD learning rate and far fewer epochs; `smoke`
# runs every code path in seconds (for tests), its numbers mean nothing.
PRESETS = {
    "full": {},
    "quick": {
        "TRAIN_SUBSET": 1000, "SGD_LR": 0.05, "REPLICATES": 2,
        "WIDTHS": [2, 4, 6, 8, 12, 16, 24, 32, 64], "EPOCHS_MODEL_WISE": 100,
        "EPOCHS_EPOCH_WISE": 300,
        "GEN_NC_WIDTH": 32, "EPOCHS_GEN_NC": 100,
        "EPOCHS_CKA": 100, "CKA_DRIFT_EPOCHS": [1, 5, 20, 50, 100],
    },
    "smoke": {
        "TRAIN_SUBSET": 256, "REPLICATES": 2, "WIDTHS": [2, 4], "EPOCHS_MODEL_WISE": 2,
        "EPOCH_WISE_WIDTHS": {"critical": 2, "large": 4}, "EPOCHS_EPOCH_WISE": 3,
        "EPOCH_WISE_POINTS": 3,
        "GEN_NC_WIDTH": 4, "DIMS": [2, 9, 10], "EPOCHS_GEN_NC": 2,
        "EPOCHS_CKA": 2, "CKA_SMALL_WIDTH": 2, "CKA_LARGE_WIDTH": 4, "CKA_WIDTH": 4,
        "CKA_DRIFT_EPOCHS": [1, 2], "CKA_SUBSET": 100, "FIGURE_DPI": 60,
    },
}
# Everything above is a hyperparameter that `--set` may override, except these facts.
_FIXED = {"NUM_CLASSES", "PRESETS", "RUN_SETTINGS"}
_HYPERPARAMETER_NAMES = [name for name, value in list(globals().items())
                         if name.isupper() and not name.startswith("_") and name not in _FIXED
                         and isinstance(value, (bool, int, float, str, list, dict, type(None)))]
# Their values as this file defines them: `--set` checks a value's type against these.
_DEFAULTS = {name: globals()[name] for name in _HYPERPARAMETER_NAMES}


# ----------------------------------------------------------------------------------------
# 2. Data: MNIST-1D (Greydanus 2020), generated locally, cached as .npz (no pickle)
# ----------------------------------------------------------------------------------------
def _mnist1d_args():
    # imported lazily: it pulls in scipy and matplotlib
    return _library("mnist1d.data").get_dataset_args()


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


def write_atomic(path, write):
    """The one writer of files: `write(f)` fills a temporary file beside `path`, which then
    replaces `path` in one rename, so a reader never sees a half-written file. The
    temporary file's name holds this process's id (`remove_stale_temporaries`). An OSError
    (a full disk, a missing permission) names `path`."""
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    with stops_deferred():
        try:
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".tmp-{os.getpid()}-",
                                       suffix=os.path.basename(path))
            with os.fdopen(fd, "wb") as f:
                write(f)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
            os.replace(tmp, path)
        except BaseException as e:
            if tmp is not None and os.path.exists(tmp):
                os.remove(tmp)
            if isinstance(e, OSError) and e.filename is None:  # a write's ENOSPC names nothing
                raise OSError(e.errno, e.strerror, path) from None
            raise


STALE_SECONDS = 3600  # a temporary file without a process id (older code) is stale after this


def remove_stale_temporaries(folder):
    """Remove the temporary files (`write_atomic`) in `folder` whose writer has died: a
    kill -9 mid-write leaves one. Those of a live process, another run's on the same
    folder, stay."""
    try:
        names = [n for n in os.listdir(folder) if n.startswith(".tmp-")]
    except OSError:
        return
    for name in names:
        pid = name.split("-")[1]
        path = os.path.join(folder, name)
        try:
            if pid.isdigit():
                if int(pid) == os.getpid():
                    continue
                try:
                    os.kill(int(pid), 0)
                    continue  # alive (or another user's, whose files are not ours to touch)
                except ProcessLookupError:
                    pass
                except PermissionError:
                    continue
            elif time.time() - os.path.getmtime(path) < STALE_SECONDS:
                continue
            os.remove(path)
        except OSError:
            pass


@contextlib.contextmanager
def stops_deferred():
    """Ctrl-C and SIGTERM wait until the block is done, then stop the run as usual. Used
    around every write (a stop inside torch.save's writer can abort the process) and while
    a fused group's records are stored: a stop between two of them would leave the group
    part-saved, and a part-saved group is trained again whole."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread receives signals
        return
    caught = []
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    previous = {sig: handler for sig, handler in previous.items()
                if handler not in (None, signal.SIG_IGN)}
    for sig in previous:
        signal.signal(sig, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if caught:
        signal.raise_signal(caught[0])  # now handled as it would have been


def _library(name):
    """The module `name`, imported with Ctrl-C and SIGTERM held until it has loaded (then
    they stop the run as usual): one raised inside a library's compiled start-up can abort
    the process rather than raise."""
    with stops_deferred():
        return importlib.import_module(name)


def load_mnist1d(cache_path=None):
    """Clean MNIST-1D as numpy arrays {x, y, x_test, y_test}, from the cache or generated.

    `mnist1d.data.make_dataset` reseeds NumPy's global RNG (and Python's `random`); the
    label noise below therefore uses its own generator and nothing here reads global state.
    """
    args = _mnist1d_args()
    import mnist1d.data  # loaded by _mnist1d_args
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
        write_atomic(path, lambda f: np.savez(f, **arrays))
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
#
#    Each architecture is written once, as `layers(net, x)`: a few named operations
#    (conv_bn_relu, res_block, ...) applied on `net`. A single model applies them with
#    its own modules (Net1D); FusedModels applies them to G models at once, and
#    `model_work` counts their work, each from this one description.
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


class Net1D(nn.Module):
    """A single model: its architecture's `layers`, each named operation applied with the
    module of that name."""

    def features(self, x):
        return self.layers(self, x.unsqueeze(1) if x.dim() == 2 else x)

    def forward(self, x):
        return self.classifier(self.features(x)[-1])

    def _module(self, name, x):
        return self.get_submodule(name)(x)

    conv_bn_relu = conv_bn_relu_pool = res_block = linear = _module

    def global_pool(self, x):
        return x.mean(dim=2)

    def has(self, name):
        return getattr(self, name, None) is not None


class ResNet1D(Net1D):
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

    @staticmethod
    def layers(net, x):
        l0 = net.conv_bn_relu("stem", x)
        l1 = net.res_block("block1", l0)
        l2 = net.res_block("block2", l1)
        h = net.global_pool(l2)
        if net.has("projector"):
            h = net.linear("projector", h)
        return [l0, l1, l2, h]


class CNN1D(Net1D):
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

    @staticmethod
    def layers(net, x):
        l0 = net.conv_bn_relu_pool("block1", x)
        l1 = net.conv_bn_relu_pool("block2", l0)
        l2 = net.conv_bn_relu("block3", l1)
        h = net.global_pool(net.conv_bn_relu("block4", l2))
        return [l0, l1, l2, h]


def build_model(arch, width, feature_dim=None):
    """An untrained model, initialised from torch's global generator (`make_model` seeds
    it); a feature dimension (the projector) exists for ResNet alone."""
    if arch == "ResNet":
        return ResNet1D(width, feature_dim)
    if arch == "CNN":
        return CNN1D(width)
    raise ValueError(f"unknown architecture {arch!r}; allowed: ResNet, CNN")


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


def nc4_ncc_mismatch(h, means, classes, network_decision):
    """NC4: fraction of samples whose nearest class mean, argmin_k ||h - mu_k||, differs from
    the network's decision argmax_k (W h)_k (given as class labels); `classes` names the
    rows of `means`."""
    sq_dist = (h ** 2).sum(1)[:, None] - 2 * h @ means.T + (means ** 2).sum(1)[None, :]
    nearest = classes[np.argmin(sq_dist, axis=1)]
    return float(np.mean(np.asarray(network_decision) != nearest))


def cdnv(h, y, means, classes):
    """Class-distance normalised variance (Galanti, Gyorgy & Hutter, ICLR 2022): the mean
    over class pairs i < j of (Var_i + Var_j) / (2 ||mu_i - mu_j||^2), Var_k the mean
    squared distance of class k's features to its mean mu_k. 0 at collapse."""
    variances = np.array([np.mean(np.sum((h[y == k] - mu) ** 2, axis=1))
                          for k, mu in zip(classes, means)])
    i, j = np.triu_indices(len(classes), k=1)
    sq_distances = np.sum((means[i] - means[j]) ** 2, axis=1)
    if sq_distances.min() <= np.finfo(np.float64).tiny:
        warnings.warn("CDNV: two class means coincide; returning NaN")
        return float("nan")
    return float(np.mean((variances[i] + variances[j]) / (2 * sq_distances)))


NC_NAMES = ["nc1", "nc1_pinv", "cdnv", "nc2", "nc2_equinorm", "nc2_equiangle", "nc3", "nc4"]
LAYER_NC_NAMES = ["nc1", "nc1_pinv", "cdnv", "nc4"]


def _class_statistics(h, y, num_classes, what):
    """(classes present, class means, centred means, Sigma_W, Sigma_B), or None when fewer
    than two classes have samples. A class without samples is left out with a warning."""
    classes = np.unique(y)
    if len(classes) < num_classes:
        missing = sorted(set(range(num_classes)) - set(classes.tolist()))
        warnings.warn(f"{what}: classes {missing} have no samples; metrics use the "
                      f"{len(classes)} classes present")
    if len(classes) < 2:
        return None
    means = class_means(h, y, classes)
    centred_means = means - means.mean(axis=0)
    return (classes, means, centred_means, within_class_cov(h, y, means, classes),
            between_class_cov(centred_means))


def _labels(labels):
    return np.asarray(labels.detach().cpu() if isinstance(labels, torch.Tensor) else labels)


def nc_metrics(features, labels, classifier_weight, num_classes=NUM_CLASSES):
    """NC1-NC4 of penultimate features (n, d) with labels (n,) and classifier W (K, d).

    Returns floats nc1 (trace ratio), nc1_pinv, cdnv, nc2, nc2_equinorm, nc2_equiangle,
    nc3, nc4.
    A class without samples is left out with a warning: every metric is then computed over
    the classes present (K' of them, using the matching rows of W); fewer than two classes
    present gives NaN throughout. d < K-1 is allowed: the values are finite, but an ETF of
    K points does not fit in d dimensions, so NC2 and NC3 cannot reach 0.
    """
    h, w, y = _float64(features), _float64(classifier_weight), _labels(labels)
    if h.ndim != 2 or y.shape != (len(h),) or w.shape != (num_classes, h.shape[1]):
        raise ValueError(f"nc_metrics expects features (n, d), labels (n,) and classifier "
                         f"weight ({num_classes}, d); got {h.shape}, {y.shape}, {w.shape}")
    stats = _class_statistics(h, y, num_classes, "nc_metrics")
    if stats is None:
        return dict.fromkeys(NC_NAMES, float("nan"))
    classes, means, centred_means, sigma_w, sigma_b = stats
    w = w[classes]
    nc2, equinorm, equiangle = nc2_metrics(centred_means)
    return {"nc1": nc1_trace_ratio(sigma_w, sigma_b),
            "nc1_pinv": nc1_pinv(sigma_w, sigma_b, len(classes)),
            "cdnv": cdnv(h, y, means, classes),
            "nc2": nc2, "nc2_equinorm": equinorm, "nc2_equiangle": equiangle,
            "nc3": nc3_self_duality(w, centred_means),
            "nc4": nc4_ncc_mismatch(h, means, classes, classes[np.argmax(h @ w.T, axis=1)])}


def layer_nc_metrics(features, labels, network_decision, num_classes=NUM_CLASSES):
    """Neural collapse of an intermediate layer (Rangamani et al., ICML 2023): NC1 (both
    forms) and CDNV of the layer's features (n, p) with labels (n,), and NC4 as the fraction of
    samples whose nearest class mean *in this layer* differs from the network's final
    decision `network_decision` (n,) (class labels). NC2 and NC3 need the classifier, which
    acts on the last layer only, so they are not defined here."""
    h, y = _float64(features), _labels(labels)
    decision = _labels(network_decision)
    if h.ndim != 2 or y.shape != (len(h),) or decision.shape != (len(h),):
        raise ValueError(f"layer_nc_metrics expects features (n, p), labels (n,) and "
                         f"decisions (n,); got {h.shape}, {y.shape}, {decision.shape}")
    stats = _class_statistics(h, y, num_classes, "layer_nc_metrics")
    if stats is None:
        return dict.fromkeys(LAYER_NC_NAMES, float("nan"))
    classes, means, _, sigma_w, sigma_b = stats
    return {"nc1": nc1_trace_ratio(sigma_w, sigma_b),
            "nc1_pinv": nc1_pinv(sigma_w, sigma_b, len(classes)),
            "cdnv": cdnv(h, y, means, classes),
            "nc4": nc4_ncc_mismatch(h, means, classes, decision)}


def _centred_pair(X, Y, what):
    x, y = _float64(X), _float64(Y)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise ValueError(f"{what} expects (n, p) and (n, q) with the same n; "
                         f"got {x.shape} and {y.shape}")
    return x - x.mean(axis=0), y - y.mean(axis=0)


def linear_CKA(X, Y):
    """Linear CKA (Kornblith et al. 2019, feature-space form), in float64:
    X, Y column-centred,  CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)."""
    x, y = _centred_pair(X, Y, "linear_CKA")
    cross = np.linalg.norm(y.T @ x) ** 2
    return _ratio(cross, np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y), "linear_CKA")


def debiased_linear_CKA(X, Y):
    """Linear CKA with the unbiased HSIC estimator (Song et al., JMLR 2012), feature-space
    form after column centring (as in Kornblith et al.'s demo). For centred X, with
    r_i = ||x_i||^2 and s_i = ||y_i||^2 (the Gram diagonals), n(n-3) HSIC_u equals
        ||Y^T X||_F^2 - n/(n-2) r.s + (sum r)(sum s) / ((n-1)(n-2)).
    Unlike linear CKA, it is near 0 for independent data even when the feature count is
    comparable to n. It needs n >= 4 and can be slightly negative, or NaN when an HSIC
    estimate of X or Y with itself is not positive."""
    x, y = _centred_pair(X, Y, "debiased_linear_CKA")
    n = len(x)
    if n < 4:
        raise ValueError(f"debiased_linear_CKA needs at least 4 samples, got {n}")

    def unbiased_hsic(a, b):
        ra, rb = (a * a).sum(1), (b * b).sum(1)
        return (np.linalg.norm(b.T @ a) ** 2 - n / (n - 2) * ra @ rb
                + ra.sum() * rb.sum() / ((n - 1) * (n - 2)))

    xx, yy = unbiased_hsic(x, x), unbiased_hsic(y, y)
    if xx <= 0 or yy <= 0:
        warnings.warn("debiased_linear_CKA: an HSIC estimate of X or Y with itself is not "
                      "positive; returning NaN")
        return float("nan")
    return float(unbiased_hsic(x, y) / np.sqrt(xx * yy))


# Heavy-tailed self-regularisation (Martin & Mahoney, JMLR 2021; the weightwatcher tool):
# the empirical spectral density (ESD) of a trained layer's W^T W develops a power-law tail
# p(lambda) ~ lambda^-alpha; alpha of about 2-4 is typical of well-trained layers, larger
# alpha of less correlated (more random-like) weights.
ESD_MIN_EVALS = 50             # fits on fewer eigenvalues are flagged unreliable


def weight_eigenvalues(weight):
    """Eigenvalues of W^T W, ascending: a linear weight (out, in) as it is, a conv weight
    (out, in, k) as k matrices (out, in) whose eigenvalues are pooled. Only the min(out, in)
    eigenvalues that can be nonzero are kept (the squared singular values of W)."""
    w = _float64(weight)
    if w.ndim not in (2, 3):
        raise ValueError(f"weight_eigenvalues expects a (out, in) or (out, in, k) weight, "
                         f"got shape {w.shape}")
    matrices = np.moveaxis(w, -1, 0) if w.ndim == 3 else w[None]
    return np.sort(np.concatenate([np.linalg.svd(m, compute_uv=False) ** 2
                                   for m in matrices]))


def powerlaw_alpha(eigenvalues):
    """Power-law fit of the tail of an ESD as weightwatcher does by default, through the
    `powerlaw` package (Alstott et al. 2014; Clauset, Shalizi & Newman 2009): every
    eigenvalue but the largest is a candidate xmin; for each, the maximum-likelihood
    alpha = 1 + n / sum ln(x_i / xmin) over the n eigenvalues >= xmin and the
    Kolmogorov-Smirnov distance D = max_i |F(x_i) - i/n| between the fitted
    F(x) = 1 - (x / xmin)^(1 - alpha) and the empirical CDF, which `powerlaw` takes as i/n
    at the i-th smallest tail value (i = 0 .. n-1); the xmin with the smallest D is kept.

    Returns alpha, xmin, D, num_evals (positive eigenvalues), num_tail (n at the chosen
    xmin) and reliable (num_evals >= ESD_MIN_EVALS). Fewer than two distinct positive
    eigenvalues: NaN for alpha, xmin and D."""
    x = np.sort(_float64(eigenvalues).ravel())
    x = x[x > np.finfo(np.float64).tiny * max(x.max(initial=0.0), 1.0)]
    best = {"alpha": float("nan"), "xmin": float("nan"), "D": float("nan"), "num_tail": 0}
    for i in range(len(x) - 1):
        tail = x[i:]
        log_sum = np.log(tail / tail[0]).sum()
        if log_sum <= 0:
            continue  # every candidate tail value equals xmin: no slope to fit
        n = len(tail)
        alpha = 1.0 + n / log_sum
        fitted_cdf = 1.0 - (tail / tail[0]) ** (1.0 - alpha)
        d = np.max(np.abs(fitted_cdf - np.arange(n) / n))
        if not d >= best["D"]:  # also true while best D is NaN
            best = {"alpha": float(alpha), "xmin": float(tail[0]), "D": float(d), "num_tail": n}
    return {**best, "num_evals": len(x), "reliable": bool(len(x) >= ESD_MIN_EVALS)}


def esd_metrics(weight):
    """Spectral summary of one weight: the power-law fit of `powerlaw_alpha`, the spectral
    norm (the largest eigenvalue of W^T W, i.e. ||W||_2^2 as weightwatcher reports it) and
    the stable rank sum(lambda) / lambda_max = ||W||_F^2 / ||W||_2^2."""
    w = _float64(weight)
    if not np.isfinite(w).all():
        warnings.warn("esd_metrics: the weight is not finite (a diverged model); returning NaN")
        return {"alpha": float("nan"), "xmin": float("nan"), "D": float("nan"), "num_tail": 0,
                "num_evals": 0, "reliable": False, "spectral_norm": float("nan"),
                "stable_rank": float("nan")}
    evals = weight_eigenvalues(w)
    top = evals[-1] if evals.size else 0.0
    return {**powerlaw_alpha(evals), "spectral_norm": float(top),
            "stable_rank": _ratio(evals.sum(), top, "stable rank")}


# ----------------------------------------------------------------------------------------
# 5. Training: one routine for every model of every experiment
# ----------------------------------------------------------------------------------------
def derive_seed(*parts):
    """The seed of one model, from (SEED, experiment, architecture, optimizer, width or d,
    replicate): a model's result never depends on which other models run, or in what order."""
    digest = hashlib.sha256(repr((SEED,) + parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def resolve_device(name=None):
    if name in (None, "auto"):
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available; use auto or cpu")
    if name not in ("cpu", "cuda"):
        raise ValueError(f"unknown device {name!r}; allowed: auto, cpu, cuda")
    if name == "cuda":
        # cuDNN's fastest convolution algorithms are nondeterministic; a rerun must give
        # the same results from the same seed on the same device.
        torch.backends.cudnn.deterministic = True
        torch.backends.cudnn.benchmark = False
    return torch.device(name)


def make_model(arch, width, seed, feature_dim=None):
    torch.manual_seed(seed)  # the only place initial weights are seeded
    return build_model(arch, width, feature_dim)


def subnormals_survive():
    """Whether a subnormal float32 survives arithmetic on the CPU threads torch computes
    with: True on every thread, False on none, None when only some threads flush it. The
    product spans 64k elements per thread, so every intra-op thread computes a share; its
    input is 2^-129 written as bits, since a float converted on a flushing thread is 0."""
    x = torch.full((65536 * torch.get_num_threads(),), 1 << 20,
                   dtype=torch.int32).view(torch.float32)
    share = (x * 1.0 != 0).float().mean().item()
    return True if share == 1 else False if share == 0 else None


def flush_denormals(on):
    """Make every CPU thread torch computes with flush subnormal floats to zero (on) or keep
    them, IEEE 754's default (off); True when that holds afterwards, False where the CPU
    cannot flush. The flags (FTZ, DAZ) belong to a thread: torch.set_flush_denormal sets
    the calling thread's, and OpenMP's threads copy them from this thread when they start.
    Threads started earlier keep theirs, so then OpenMP is asked to end its threads
    (omp_pause_resource_all), and the ones it starts next copy the new flags."""
    if subnormals_survive() is (not on):
        return True
    torch.set_flush_denormal(on)
    if subnormals_survive() is None:
        _restart_openmp_threads()
    return subnormals_survive() is (not on)


def _restart_openmp_threads():
    import ctypes
    import glob
    torch_lib = os.path.join(os.path.dirname(torch.__file__), "lib")
    for path in sorted(glob.glob(os.path.join(torch_lib, "lib*omp*"))) + ["libgomp.so.1"]:
        try:
            pause_all = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause_all.argtypes, pause_all.restype = [ctypes.c_int], ctypes.c_int
        if pause_all(2) == 0:  # 2: omp_pause_hard, which ends the threads
            return


# What a trained model depends on beyond its spec (architecture, width, epochs, ...): the
# data, its order and the NC1 pseudo-inverse's cut-off, for every model, then its
# optimizer's settings; an experiment may declare more (`Experiment.settings`). With the
# spec they make up the settings in a record's key (`record_key`).
TRAINING_SETTINGS = ["SEED", "LABEL_NOISE", "TRAIN_SUBSET", "BATCH_SIZE", "PINV_RTOL"]
OPTIMIZER_SETTINGS = {"SGD": ["SGD_LR", "SGD_MOMENTUM", "SGD_WEIGHT_DECAY"],
                      "Adam": ["ADAM_LR", "ADAM_WEIGHT_DECAY"]}


def make_optimizer(params, name, epochs):
    """SGD + momentum with cosine annealing to 0 over `epochs`, or constant-rate Adam, over
    the tensors `params`."""
    params = list(params)
    if name == "SGD":
        # fused: one kernel for all tensors, on either device. Its tensor-lr form lets a
        # CUDA graph follow the cosine schedule (RowOptimizers.captured_lr). On a CPU it
        # gives the default loop's weights to the bit, its step 2.5-5x faster on one
        # thread, though too small a part of an epoch to change the epoch measurably
        # (one-off A/Bs)
        opt = torch.optim.SGD(params, lr=SGD_LR, momentum=SGD_MOMENTUM,
                              weight_decay=SGD_WEIGHT_DECAY, fused=True)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs, eta_min=0.0)
    if name == "Adam":
        # fused: one kernel per tensor instead of about ten (one-thread CPU: about 7% of an
        # Adam epoch in a one-off A/B); the same update up to rounding
        return torch.optim.Adam(params, lr=ADAM_LR, weight_decay=ADAM_WEIGHT_DECAY,
                                fused=True), None
    raise ValueError(f"unknown optimizer {name!r}; allowed: SGD, Adam")


EVAL_CHUNK = 500  # inputs per evaluation forward pass: all 4000 at once spill the CPU cache
                  # (ResNet w = 64, one thread: 0.50 s against 0.19 s in chunks; same values)


def _in_chunks(forward, x):
    """forward(x) computed on chunks of EVAL_CHUNK inputs and concatenated; `forward` returns
    a tensor or a list of tensors (then a list comes back)."""
    outs = [forward(x[start:start + EVAL_CHUNK]) for start in range(0, len(x), EVAL_CHUNK)]
    if isinstance(outs[0], torch.Tensor):
        return torch.cat(outs)
    return [torch.cat(parts) for parts in zip(*outs)]


@torch.no_grad()
def evaluate(model, data, collapse=True):
    """Errors, losses and (with `collapse`) NC metrics in eval mode: on the training set
    with the (noisy) labels the model was trained on, and on the test set with clean
    labels."""
    was_training = model.training
    model.eval()
    out = {}
    for split, x, y in [("train", data["x_train"], data["y_train"]),
                        ("test", data["x_test"], data["y_test"])]:
        h = _in_chunks(lambda inputs: model.features(inputs)[-1], x)
        logits = model.classifier(h)
        out[f"{split}_err"] = float((logits.argmax(1) != y).float().mean())
        out[f"{split}_loss"] = float(F.cross_entropy(logits, y))
        if collapse:
            out[f"nc_{split}"] = nc_metrics(h, y, model.classifier.weight)
    model.train(was_training)
    return out


def _block_slice(g, rows_per_model, shape):
    """Model g's block of a fused conv or BatchNorm tensor: its rows, then its own extent."""
    start = g * rows_per_model
    return (slice(start, start + shape[0]),) + tuple(slice(0, n) for n in shape[1:])


def activation_layout(device_type):
    """Memory layout of FusedModels' activations: channels-last on a CPU, where oneDNN's
    grouped convolutions are much faster in it (see FusedModels); PyTorch's default layout
    on a GPU, where cuDNN's grouped 1 x 3 convolutions have not been measured in the other."""
    return torch.channels_last if device_type == "cpu" else torch.contiguous_format


class FusedModels(nn.Module):
    """G models of one architecture as one network: every convolution is grouped (one group
    per model) and every BatchNorm channel belongs to one model, so the models stay exactly
    independent; linear layers are batched matrix products. Narrower models are zero-padded
    to the widest: padded weights and padded BatchNorm affine parameters start at 0, so the
    padded activations are 0, their gradients are exactly 0, and weight decay, momentum and
    Adam (0 / (sqrt(0) + eps) = 0) keep them at 0.

    Input (B, G, L): model g sees x[:, g]. Output logits (B, G, K).

    Inside, activations are (B, G*C, 1, L), so each conv is a 2-D one of kernel (1, 3); on a
    CPU they are kept channels-last (`activation_layout`): oneDNN's grouped convolutions
    are much faster in that layout (ResNet w = 64, 8 models, one thread: 5.4 s an epoch
    against 7.7 s in (B, C, L), a one-off A/B), while a single model runs as fast either
    way."""

    def __init__(self, models):
        super().__init__()
        self.layers = type(models[0]).layers  # the architecture, as the single model has it
        self.size = len(models)
        self.names = []
        for name, _ in models[0].state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            tensors = [m.state_dict()[name] for m in models]
            shape = [max(t.shape[i] for t in tensors) for i in range(tensors[0].dim())]
            if len(shape) == 2:    # linear: (G, out, in)
                fused = torch.zeros([self.size] + shape)
                for g, t in enumerate(tensors):
                    fused[g, :t.shape[0], :t.shape[1]] = t
            else:                  # conv (G*out, in, k) or BatchNorm (G*channels)
                fused = torch.zeros([self.size * shape[0]] + shape[1:])
                if name.endswith("running_var"):
                    fused.fill_(1.0)
                for g, t in enumerate(tensors):
                    fused[_block_slice(g, shape[0], t.shape)] = t
            key = name.replace(".", "_")
            if "running_" in name:
                self.register_buffer(key, fused)
            else:
                self.register_parameter(key, nn.Parameter(fused))
            self.names.append(name)

    def _conv(self, x, name):
        weight = getattr(self, name.replace(".", "_") + "_weight").unsqueeze(2)
        return F.conv2d(x, weight, padding=(0, 1), groups=self.size)

    def _bn(self, x, name):
        key = name.replace(".", "_")
        return F.batch_norm(x, getattr(self, key + "_running_mean"),
                            getattr(self, key + "_running_var"), getattr(self, key + "_weight"),
                            getattr(self, key + "_bias"), training=self.training)

    # The operations of the architectures' `layers`, on all G models at once. ReLU and the
    # skip addition work in place on BatchNorm's output (BatchNorm's backward needs its
    # input, not its output): the same values, one fresh activation fewer each, about 5% of
    # a one-thread CPU epoch (a one-off A/B).
    def conv_bn_relu(self, name, x):
        return F.relu(self._bn(self._conv(x, name + ".0"), name + ".1"), inplace=True)

    def conv_bn_relu_pool(self, name, x):
        return F.max_pool2d(self.conv_bn_relu(name + ".0", x), (1, 2))

    def res_block(self, name, x):
        out = F.relu(self._bn(self._conv(x, name + ".conv1"), name + ".bn1"), inplace=True)
        return F.relu(self._bn(self._conv(out, name + ".conv2"), name + ".bn2").add_(x),
                      inplace=True)

    def global_pool(self, x):
        # sum / L, which equals mean bit for bit on a CPU: mean's backward hands the last
        # ReLU a gradient materialised in the default layout, and a ReLU backward that
        # mixes layouts takes a slow path (2.9 ms against 0.09 ms on a 128 x 128 x 40
        # channels-last tensor, one thread); sum's hands it a broadcast view (0.19 ms).
        # One-thread epochs, interleaved A/B: 12-18% faster, the same weights.
        return (x.sum(dim=(2, 3)) / x.shape[3]).view(len(x), self.size, -1)

    def linear(self, name, h):  # (B, G, in) -> (B, G, out), each model its own matrix
        return torch.einsum("bgi,goi->bgo", h, getattr(self, name + "_weight"))

    def has(self, name):
        return hasattr(self, name + "_weight")

    def forward(self, x):
        out = x.unsqueeze(2).contiguous(memory_format=activation_layout(x.device.type))
        return self.linear("classifier", self.layers(self, out)[-1])

    @torch.no_grad()
    def copy_into(self, g, model):
        """Write model g's slice of the fused weights back into an ordinary `model`."""
        state = model.state_dict()
        for name in self.names:
            fused, target = getattr(self, name.replace(".", "_")), state[name]
            if target.dim() == 2:  # linear
                target.copy_(fused[g, :target.shape[0], :target.shape[1]])
            else:
                target.copy_(fused[_block_slice(g, fused.shape[0] // self.size, target.shape)])
        return model


class RowOptimizers:
    """The optimizers of a fused group whose models may use different ones (`optimizers`,
    one name per model). Each run of consecutive models with the same optimizer gets one
    `make_optimizer` over views of its rows of every fused tensor; SGD and Adam are
    elementwise, so each model's rows update exactly as the model would alone."""

    def __init__(self, fused, optimizers, epochs):
        self.fused, self.parts = fused, []
        starts = [g for g in range(len(optimizers))
                  if g == 0 or optimizers[g] != optimizers[g - 1]]
        for first, stop in zip(starts, starts[1:] + [len(optimizers)]):
            # conv and BatchNorm tensors stack G blocks of rows, linear ones G matrices
            rows = [(param, slice(first * param.shape[0] // fused.size,
                                  stop * param.shape[0] // fused.size))
                    for param in fused.parameters()]
            views = [param[block].detach() for param, block in rows]  # leaves, same storage
            opt, scheduler = make_optimizer(views, optimizers[first], epochs)
            self.parts.append((opt, scheduler, rows, views))
        self.lr_tensors = []  # (SGD param group, its rate on the device), for CUDA graphs

    def step(self):
        for opt, _, rows, views in self.parts:
            for (param, block), view in zip(rows, views):
                view.grad = param.grad[block]
            opt.step()
        for param in self.fused.parameters():
            param.grad = None

    def state_dict(self):
        return [{"optimizer": opt.state_dict(),
                 "scheduler": None if scheduler is None else scheduler.state_dict()}
                for opt, scheduler, _, _ in self.parts]

    def load_state_dict(self, states):
        for (opt, scheduler, _, _), state in zip(self.parts, states, strict=True):
            opt.load_state_dict(state["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(state["scheduler"])

    def end_epoch(self):
        for _, scheduler, _, _ in self.parts:
            if scheduler is not None:
                scheduler.step()
        for group, lr in self.lr_tensors:
            lr.fill_(group["lr"])

    @contextlib.contextmanager
    def captured_lr(self):
        """While a CUDA graph is captured: each SGD param group's rate is a float32 tensor on
        the device (fused SGD reads it there), which `end_epoch` keeps equal to the cosine
        schedule's rate, instead of a float the graph would freeze at capture; the scheduler
        itself keeps working on the float. Adam's rate is constant and fused Adam keeps its
        step counts on the device, so Adam only has to be marked capturable."""
        if not self.lr_tensors:
            self.lr_tensors = [
                (group, torch.tensor(group["lr"], dtype=torch.float32, device=views[0].device))
                for opt, _, _, views in self.parts if isinstance(opt, torch.optim.SGD)
                for group in opt.param_groups]
        adam_groups = [group for opt, _, _, _ in self.parts
                       if isinstance(opt, torch.optim.Adam) for group in opt.param_groups]
        rates = [group["lr"] for group, _ in self.lr_tensors]
        try:
            for group, lr in self.lr_tensors:
                group["lr"] = lr
            for group in adam_groups:
                group["capturable"] = True
            yield
        finally:
            for (group, _), rate in zip(self.lr_tensors, rates):
                group["lr"] = rate
            for group in adam_groups:
                group["capturable"] = False


class EpochGraph:
    """Runs `epoch_steps` (one epoch's training steps, reading and writing only tensors that
    live as long as the run) as a CUDA graph: the first epoch eagerly on a side stream, as
    PyTorch's CUDA-graph notes ask for warm-up before capture (it is a real epoch, and it
    creates the optimizers' state); the second is captured and replayed, and every later
    one replayed. The whole epoch is one graph, so the last batch of an epoch (4000 =
    31 x 128 + 32) is just its last step; no second graph is needed for it."""

    @staticmethod
    def usable(device):
        return device.type == "cuda"

    def __init__(self, epoch_steps, optimizers):
        self.epoch_steps, self.optimizers = epoch_steps, optimizers
        self.warmed_up, self.graph = False, None

    def __call__(self):
        if not self.warmed_up:
            self._warm_up()
            self.warmed_up = True
            return
        if self.graph is None:
            self.graph = self._capture()
        self.graph.replay()  # capture records the kernels without running them

    def _warm_up(self):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.epoch_steps()
        torch.cuda.current_stream().wait_stream(side)

    def _capture(self):
        graph = torch.cuda.CUDAGraph()
        try:
            with self.optimizers.captured_lr(), torch.cuda.graph(graph):
                self.epoch_steps()
        except RuntimeError as err:
            err.add_note("CUDA graph capture of a training epoch failed; "
                         "--set CUDA_GRAPHS=False trains without graphs")
            raise
        return graph


def train_models(models, data, optimizer, epochs, seeds, checkpoints=(), on_checkpoint=None,
                 on_epoch=None, save_snapshot=None, resume=None):
    """Train G models of one architecture side by side on (x_train, y_train): batch
    BATCH_SIZE, each model reshuffled every epoch by its own generator seeded with its own
    seed. The loss is the sum over models of each model's mean batch loss (a mean over
    models would shrink every gradient by G); `optimizer` is one name for every model or a
    list of one per model (`RowOptimizers`), so each model trains exactly as it would alone.

    `on_checkpoint(g, model, epoch)` is called after each epoch in `checkpoints` with model g
    (in eval mode), and `on_epoch(epoch)` after every epoch (progress). A model whose
    epoch loss is NaN or infinite is marked diverged and
    leaves the loss. The trained weights are written back into `models`. Returns one
    {epochs_run, train_loss, diverged} per model.

    `save_snapshot(state)`, when given, is called at the end of an epoch at least every
    SNAPSHOT_SECONDS with the group's whole training state (`training_state`); training
    from `resume=state` then goes on exactly as if it had never stopped.

    On a CPU every thread computes with FLUSH_DENORMALS's rounding (`flush_denormals`).
    On a GPU nothing in a step waits for the host (the epoch's losses are read once, after
    it), and with CUDA_GRAPHS every epoch after the first is one CUDA graph (EpochGraph)."""
    x, y = data["x_train"], data["y_train"]
    device, n, size = x.device, len(y), len(models)
    if device.type == "cpu" and not flush_denormals(FLUSH_DENORMALS):
        warnings.warn(f"FLUSH_DENORMALS={FLUSH_DENORMALS} could not be set on this CPU's "
                      "threads; training goes on, late epochs of long runs may be slow")
    fused = FusedModels(models).to(device).train()
    names = [optimizer] * size if isinstance(optimizer, str) else list(optimizer)
    optimizers = RowOptimizers(fused, names, epochs)
    orders = [torch.Generator(device=device).manual_seed(s) for s in seeds]
    alive = torch.ones(size, dtype=torch.bool, device=device)
    perms = torch.empty(size, n, dtype=torch.long, device=device)
    loss_sums = torch.zeros(size, device=device)
    out = [{"epochs_run": epochs, "train_loss": float("nan"), "diverged": False}
           for _ in models]
    checkpoints = set(checkpoints)
    first_epoch = 1
    if resume is not None:
        fused.load_state_dict(resume["weights"])
        optimizers.load_state_dict(resume["optimizers"])
        for order, state in zip(orders, resume["orders"], strict=True):
            order.set_state(state.cpu())
        alive.copy_(resume["alive"])
        out = [dict(fit) for fit in resume["fits"]]
        first_epoch = resume["epoch"] + 1
    last_snapshot = time.time()

    def epoch_steps():
        # only tensors that outlive the epoch are read or written (perms, loss_sums, alive,
        # the data, the fused weights and optimizer state), so EpochGraph can replay it
        loss_sums.zero_()
        for start in range(0, n, BATCH_SIZE):
            idx = perms[:, start:start + BATCH_SIZE]                     # (G, B)
            logits = fused(x[idx].transpose(0, 1))                       # (B, G, K)
            per_model = F.cross_entropy(logits.permute(0, 2, 1), y[idx].T,
                                        reduction="none").mean(0)        # (G,)
            torch.where(alive, per_model, 0.0).sum().backward()
            optimizers.step()
            loss_sums.add_(per_model.detach() * idx.shape[1])

    run_epoch = (EpochGraph(epoch_steps, optimizers)
                 if CUDA_GRAPHS and EpochGraph.usable(device) else epoch_steps)
    for epoch in range(first_epoch, epochs + 1):
        torch.stack([torch.randperm(n, generator=g, device=device) for g in orders], out=perms)
        run_epoch()
        optimizers.end_epoch()
        epoch_losses = (loss_sums / n).tolist()  # one host sync per epoch
        for g, loss in enumerate(epoch_losses):
            if not out[g]["diverged"]:
                out[g]["train_loss"] = loss
                if not np.isfinite(loss):
                    out[g].update(epochs_run=epoch, diverged=True)
                    alive[g] = False
        if epoch in checkpoints and on_checkpoint is not None:
            for g, model in enumerate(models):
                on_checkpoint(g, fused.copy_into(g, model).to(device).eval(), epoch)
        if on_epoch is not None:
            on_epoch(epoch)
        if not alive.any():
            break
        if save_snapshot is not None and epoch < epochs \
                and time.time() - last_snapshot >= SNAPSHOT_SECONDS:
            save_snapshot(training_state(epoch, fused, optimizers, orders, alive, out))
            last_snapshot = time.time()
    for g, model in enumerate(models):
        fused.copy_into(g, model).to(device)
    return out


def training_state(epoch, fused, optimizers, orders, alive, fits):
    """Everything `train_models` needs to go on after `epoch`: the fused weights and
    BatchNorm statistics, the optimizers' and schedules' states, each model's data-order
    generator, which models are alive, and their fits so far (tensors, lists, dicts and
    numbers only, so it loads with torch.load's weights_only). It shares the live tensors:
    save it before training goes on."""
    return {"epoch": epoch, "weights": fused.state_dict(), "optimizers": optimizers.state_dict(),
            "orders": [order.get_state() for order in orders], "alive": alive.clone(),
            "fits": [dict(fit) for fit in fits]}


def train_model(model, data, optimizer, epochs, seed, checkpoints=(), on_checkpoint=None):
    """One model: `train_models` with G = 1. `on_checkpoint(model, epoch)`."""
    callback = None if on_checkpoint is None else (lambda g, m, e: on_checkpoint(m, e))
    return train_models([model], data, optimizer, epochs, [seed], checkpoints, callback)[0]


# ----------------------------------------------------------------------------------------
# 6. Experiments. Each has a setup (its settings and the spec of each model it trains, from
#    the globals or keyword overrides), a measure for its models' checkpoints, and a
#    summary of its trained models' records: a plain JSON-ready dict. Every trained model is
#    analysed alike (`analyse_model`), one fused group at a time (`fit_group`).
# ----------------------------------------------------------------------------------------
LAYERS = ["L0", "L1", "L2", "L3"]


def _json_ready(obj):
    """NaN and infinities become null: the results stay strict JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_ready(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_ready(v) for v in obj]
    if isinstance(obj, (float, np.floating)):
        return float(obj) if np.isfinite(obj) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def stratified_subset(noise_mask, size, seed):
    """`size` training indices with the same noise fraction as the full set: exactly
    round(LABEL_NOISE * size) corrupted samples (used by the quick and smoke presets)."""
    rng = np.random.default_rng([seed, 1])
    noisy, clean = np.flatnonzero(noise_mask), np.flatnonzero(~noise_mask)
    n_noisy = int(round(LABEL_NOISE * size))
    idx = np.concatenate([rng.choice(noisy, n_noisy, replace=False),
                          rng.choice(clean, size - n_noisy, replace=False)])
    return np.sort(idx)


def experiment_data(device):
    data = get_data(LABEL_NOISE, SEED, device)
    if TRAIN_SUBSET is not None and TRAIN_SUBSET < len(data["y_train"]):
        idx = torch.as_tensor(stratified_subset(data["noise_mask"].cpu().numpy(),
                                                TRAIN_SUBSET, SEED), device=device)
        for key in ("x_train", "y_train", "y_train_clean", "noise_mask"):
            data[key] = data[key][idx]
    return data


CKA_CONV_MODES = ["pool", "flatten"]


@torch.no_grad()
def layer_representations(model, x, conv="pool"):
    """L0..L3 of `model` on inputs x as float64 arrays (n, features); conv activations
    (n, C, L) are globally average-pooled over L ("pool", the default) or flattened to
    C*L features ("flatten")."""
    _check_choice("conv", conv, CKA_CONV_MODES)
    was_training = model.training
    model.eval()
    reps = _in_chunks(lambda inputs: [
        (f.mean(dim=2) if conv == "pool" else f.flatten(1)) if f.dim() == 3 else f
        for f in model.features(inputs)], x)
    model.train(was_training)
    return [r.detach().cpu().double().numpy() for r in reps]


def layer_collapse(model, data):
    """NC1 (both forms) and NC4 of every layer L0..L3 on the training set with the labels
    the model was trained on, conv activations globally average-pooled (Rangamani et al.
    2023). NC4 compares each layer's nearest class mean with the network's decision."""
    reps = layer_representations(model, data["x_train"])
    weight = model.classifier.weight.detach().cpu().double().numpy()
    decision = np.argmax(reps[-1] @ weight.T, axis=1)
    labels = data["y_train"].cpu().numpy()
    return {layer: layer_nc_metrics(rep, labels, decision) for layer, rep in zip(LAYERS, reps)}


def precision_weighted_alpha(fits):
    """The mean of the fits' alpha weighted by each fit's precision: the maximum-likelihood
    alpha of a tail of n values has standard error (alpha - 1) / sqrt(n) (Clauset, Shalizi &
    Newman 2009, eq. 3.2), so weight n / (alpha - 1)^2. A fit of alpha = 674 on a 3-value
    tail then weighs 1e-5 against 10 for alpha = 3 on 40 values, where a plain mean over
    the fits would be dominated by it. NaN without a finite fit."""
    fits = [f for f in fits if np.isfinite(f["alpha"]) and f["num_tail"] > 0]
    if not fits:
        return float("nan")
    alpha = np.array([f["alpha"] for f in fits])
    weight = np.array([f["num_tail"] for f in fits]) / (alpha - 1) ** 2
    return float(np.sum(weight * alpha) / np.sum(weight))


def model_esd(model):
    """`esd_metrics` of every conv and linear weight of `model` and two layer averages of
    alpha: "alpha" the mean over the fits with at least ESD_MIN_EVALS eigenvalues (NaN if
    none) and "alpha_weighted" over every fit, each weighted by its precision
    (`precision_weighted_alpha`)."""
    layers = {name: esd_metrics(p) for name, p in model.named_parameters() if p.dim() >= 2}
    return {"alpha": _nanmean([m["alpha"] for m in layers.values() if m["reliable"]]),
            "alpha_weighted": precision_weighted_alpha(layers.values()),
            "reliable_layers": sum(m["reliable"] for m in layers.values()),
            "layers": layers}


def analyse_model(model, data, diverged=False):
    """Everything recorded about a trained model: `evaluate`'s errors and NC metrics, the
    per-layer collapse and the weight spectra; NaN for all but the spectra when it
    `diverged`."""
    if not diverged:
        return {**evaluate(model, data), "per_layer": layer_collapse(model, data),
                "esd": model_esd(model)}
    nan_nc = dict.fromkeys(NC_NAMES, float("nan"))
    with warnings.catch_warnings():  # NaN weights: NaN spectra, not a warning each
        warnings.simplefilter("ignore")
        esd = model_esd(model)
    return {"train_err": float("nan"), "test_err": float("nan"), "train_loss": float("nan"),
            "test_loss": float("nan"), "nc_train": nan_nc, "nc_test": dict(nan_nc),
            "per_layer": {layer: dict.fromkeys(LAYER_NC_NAMES, float("nan"))
                          for layer in LAYERS},
            "esd": esd}


def model_seed(experiment, spec):
    """A model's seed: its spec's own "seed" (Exp 4's), else derived from its experiment's
    name and its architecture, optimizer, width or d, and replicate (`derive_seed`)."""
    return spec.get("seed", derive_seed(experiment, spec["arch"], spec["optimizer"],
                                        spec.get("d") or spec["width"],
                                        spec.get("replicate", 0)))


def fit_group(experiment, group, data, measure=None, on_epoch=None, load_state=None,
              save_state=None):
    """Train one group of `experiment`'s models fused (`train_models`) and measure them:
    `measure(spec, model, epoch, data)` at each epoch in their checkpoints, `analyse_model`
    once trained. Returns [(record, trained model)], a record being the model's spec, seed,
    parameter count, fit, analysis, checkpoint measurements and seconds.

    `save_state(state)`, when given, keeps the group's state while it trains (at least
    every SNAPSHOT_SECONDS), checkpoint measurements included; `load_state()` returns the
    state a stopped run left, or None, and training goes on from it as if never stopped."""
    start = time.time()
    seeds = [model_seed(experiment, spec) for spec in group]
    models = [make_model(s["arch"], s["width"], seed, s.get("d"))
              for s, seed in zip(group, seeds)]
    resume = load_state() if load_state else None
    if resume is None:
        resume = {"training": None, "measured": [[] for _ in group],
                  "measuring": [0.0] * len(group), "seconds": 0.0, "measure": None}
    measured, measuring = resume["measured"], resume["measuring"]
    if resume["measure"] is not None:
        measure.load_state_dict(resume["measure"])

    def on_checkpoint(g, model, epoch):
        started = time.time()
        measured[g].append(_json_ready(measure(group[g], model, epoch, data)))
        measuring[g] += time.time() - started

    def save_snapshot(training):
        save_state({"training": training, "measured": measured, "measuring": measuring,
                    "seconds": resume["seconds"] + time.time() - start,
                    "measure": measure.state_dict() if hasattr(measure, "state_dict")
                    else None})

    trained = train_models(
        models, data, [s["optimizer"] for s in group], group[0]["epochs"], seeds,
        group[0].get("checkpoints", ()), on_checkpoint, on_epoch,
        save_snapshot if save_state else None, resume["training"])
    # wall time shared by a fused group, its checkpoint measures included
    seconds = (resume["seconds"] + time.time() - start) / len(group)
    return [({**spec, "seed": seed, "params": count_parameters(model), **fit,
              **analyse_model(model, data, diverged=fit["diverged"]), "checkpoints": curve,
              "seconds": seconds, "checkpoint_seconds": checkpoint_seconds,
              "trained_with": len(group), "device": data["x_train"].device.type},
             model.eval())
            for spec, seed, model, fit, curve, checkpoint_seconds
            in zip(group, seeds, models, trained, measured, measuring)]


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_choice(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(allowed)}; got {value!r}")
    return value


def _check_int_list(name, values):
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{name} must be a non-empty list of positive integers, got {values!r}")
    return [_check_positive_int(name, v) for v in values]


def _check_replicates(replicates):
    return _check_positive_int("replicates", REPLICATES if replicates is None else replicates)


def _nanmean(values):
    """Mean of the finite values (a diverged replicate does not hide the others); NaN if
    there are none. None is JSON's NaN."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _transpose(trees):
    """A list of equally shaped nested dicts -> one nested dict whose leaves are lists."""
    if isinstance(trees[0], dict):
        return {key: _transpose([tree[key] for tree in trees]) for key in trees[0]}
    return list(trees)


def _nanstd(values):
    """Sample standard deviation (ddof 1) of the finite values; NaN for fewer than two."""
    finite = [float(v) for v in values if v is not None and np.isfinite(v)]
    return float(np.std(finite, ddof=1)) if len(finite) > 1 else float("nan")


def _over_replicates(tree, statistic):
    if isinstance(tree, dict):
        return {key: _over_replicates(value, statistic) for key, value in tree.items()}
    return [statistic(replicates) for replicates in tree]


def _summarise(points):
    """points: for each point of a sweep (a width, a d, an epoch), one nested dict of floats
    per replicate. Returns the mean over replicates under every name, their sample standard
    deviation under "std" (NaN below two replicates), and each replicate's own values under
    "replicates" (lists over points of lists over replicates)."""
    per_replicate = _transpose([_transpose(replicates) for replicates in points])
    return {**_over_replicates(per_replicate, _nanmean),
            "std": _over_replicates(per_replicate, _nanstd), "replicates": per_replicate}


def _chunks(records, size):
    return [records[i:i + size] for i in range(0, len(records), size)]


def _sweep_summary(points, values):
    """`_summarise` of values(record) for the records of each point, plus the seeds and
    divergence of every replicate (a point counts as diverged if any replicate did)."""
    summary = _summarise([[values(r) for r in records] for records in points])
    summary["replicates"]["seed"] = [[r["seed"] for r in records] for records in points]
    summary["replicates"]["diverged"] = [[r["diverged"] for r in records] for records in points]
    summary["diverged"] = [any(records_diverged) for records_diverged
                           in summary["replicates"]["diverged"]]
    return summary


def log_spaced_epochs(epochs, points):
    """At least `points` distinct epochs in 1..epochs (all of them if fewer), log-spaced, so
    dense early."""
    if epochs <= points:
        return list(range(1, epochs + 1))
    count = points
    while True:
        grid = np.unique(np.round(np.geomspace(1, epochs, count)).astype(int))
        if len(grid) >= points:
            return grid.tolist()
        count += points - len(grid)


def _curve_summary(records, grid, names):
    """`_summarise` over the epochs of `grid` of each replicate's checkpoint values under
    `names` (a replicate that diverged and stopped early has None at later epochs)."""
    curves = [{c["epoch"]: c for c in record["checkpoints"]} for record in records]
    return _summarise([[{name: curve.get(epoch, {}).get(name) for name in names}
                        for curve in curves] for epoch in grid])


def _exp1_values(record):
    return {**{key: record[key] for key in ("train_err", "test_err", "train_loss", "seconds")},
            **record["nc_train"], "nc_test": record["nc_test"],
            "per_layer": record["per_layer"], "esd": record["esd"]}


def model_wise_setup(epochs=None, widths=None, archs=("ResNet", "CNN"),
                     optimizers=("SGD", "Adam"), replicates=None):
    """Exp 1's settings (None: the globals) and the spec of each of its models."""
    epochs = _check_positive_int("epochs", EPOCHS_MODEL_WISE if epochs is None else epochs)
    widths = _check_int_list("widths", WIDTHS if widths is None else widths)
    replicates = _check_replicates(replicates)
    grid = log_spaced_epochs(epochs, MODEL_WISE_POINTS)
    specs = [{"arch": a, "optimizer": o, "width": w, "epochs": epochs, "replicate": r,
              **({"checkpoints": grid} if grid else {})}
             for a in archs for o in optimizers for w in widths for r in range(replicates)]
    return dict(epochs=epochs, widths=widths, archs=archs, optimizers=optimizers,
                replicates=replicates, grid=grid, specs=specs, measure=model_wise_measure)


LEARNING_CURVE_NAMES = ["train_err", "test_err", "train_loss", "test_loss"]


def model_wise_measure(spec, model, epoch, data):
    """What Exp 1 records of a model at each of its checkpoints: its learning curve."""
    scores = evaluate(model, data, collapse=False)
    return {"epoch": epoch, **{name: scores[name] for name in LEARNING_CURVE_NAMES}}


def model_wise_summary(setup, records, models, data):
    """Exp 1's results (`run_model_wise_complete`) from the records of `setup`'s models."""
    epochs, widths, replicates = setup["epochs"], setup["widths"], setup["replicates"]
    points = iter(_chunks(records, replicates))
    out = {}
    for arch in setup["archs"]:
        for opt in setup["optimizers"]:
            by_width = [next(points) for _ in widths]
            curves = {"epoch": setup["grid"]}
            if setup["grid"]:
                curves.update(_transpose([_curve_summary(records, setup["grid"],
                                                         LEARNING_CURVE_NAMES)
                                          for records in by_width]))
            out[f"{arch}_{opt}"] = {"width": widths,
                                    "params": [records[0]["params"] for records in by_width],
                                    **_sweep_summary(by_width, _exp1_values),
                                    "curves": curves,
                                    "epochs": epochs, "replicate_count": replicates}
    return out


CURVE_NAMES = ["train_err", "test_err", "nc1", "alpha", "alpha_weighted"]


def epoch_wise_setup(epochs=None, widths=None, replicates=None):
    """Exp 2's settings (None: the globals) and the spec of each of its models."""
    epochs = _check_positive_int("epochs", EPOCHS_EPOCH_WISE if epochs is None else epochs)
    widths = dict(EPOCH_WISE_WIDTHS if widths is None else widths)
    for name, w in widths.items():
        _check_positive_int(f"width of {name!r}", w)
    replicates = _check_replicates(replicates)
    grid = log_spaced_epochs(epochs, EPOCH_WISE_POINTS)
    specs = [{"arch": "ResNet", "optimizer": "Adam", "width": w, "epochs": epochs,
              "checkpoints": grid, "replicate": r}
             for w in widths.values() for r in range(replicates)]
    return dict(epochs=epochs, widths=widths, replicates=replicates, grid=grid, specs=specs,
                measure=epoch_wise_measure)


def epoch_wise_measure(spec, model, epoch, data):
    """What Exp 2 records of a model at each of its checkpoints."""
    scores, spectra = evaluate(model, data), model_esd(model)
    return {"epoch": epoch, "train_err": scores["train_err"], "test_err": scores["test_err"],
            "nc1": scores["nc_train"]["nc1"], "alpha": spectra["alpha"],
            "alpha_weighted": spectra["alpha_weighted"]}


def epoch_wise_summary(setup, records, models, data):
    """Exp 2's results (`run_epoch_wise_dynamics`) from the records of `setup`'s models."""
    widths, grid = setup["widths"], setup["grid"]
    out = {}
    for name, records in zip(widths, _chunks(records, setup["replicates"])):
        summary = _curve_summary(records, grid, CURVE_NAMES)
        summary["replicates"]["seed"] = [record["seed"] for record in records]
        out[name] = {"width": widths[name], "epoch": grid, **summary,
                     "diverged": any(record["diverged"] for record in records)}
    return out


def _exp3_values(record):
    return {**{key: record[key] for key in ("train_err", "test_err")}, **record["nc_train"],
            "nc_test": record["nc_test"]}


def generalized_nc_setup(epochs=None, dims=None, width=None, replicates=None):
    """Exp 3's settings (None: the globals) and the spec of each of its models."""
    epochs = _check_positive_int("epochs", EPOCHS_GEN_NC if epochs is None else epochs)
    dims = _check_int_list("dims", DIMS if dims is None else dims)
    width = _check_positive_int("width", GEN_NC_WIDTH if width is None else width)
    replicates = _check_replicates(replicates)
    specs = [{"arch": "ResNet", "optimizer": "SGD", "width": width, "d": d, "epochs": epochs,
              "replicate": r} for d in dims for r in range(replicates)]
    return dict(epochs=epochs, dims=dims, width=width, replicates=replicates, specs=specs,
                measure=None)


def generalized_nc_summary(setup, records, models, data):
    """Exp 3's results (`run_generalized_nc`) from the records of `setup`'s models."""
    by_d = _chunks(records, setup["replicates"])
    return {"width": setup["width"], "d": setup["dims"], **_sweep_summary(by_d, _exp3_values),
            "epochs": setup["epochs"], "replicate_count": setup["replicates"]}


def cka_inputs(data):
    """The fixed, seeded subset of CKA_SUBSET training inputs every CKA is computed on."""
    n = len(data["x_train"])
    idx = np.random.default_rng([SEED, 2]).choice(n, min(CKA_SUBSET, n), replace=False)
    return data["x_train"][torch.as_tensor(np.sort(idx), device=data["x_train"].device)]


CKA_ESTIMATORS = {"linear": linear_CKA, "debiased": debiased_linear_CKA}


def cka_setup(epochs=None, small_width=None, large_width=None, width=None, seeds=None,
              drift_epochs=None, estimator=None, conv=None):
    """Exp 4's settings (None: the globals) and the spec of each of its models: the small
    and the large width, then one model per seed at `width`, the first with checkpoints."""
    epochs = _check_positive_int("epochs", EPOCHS_CKA if epochs is None else epochs)
    small = _check_positive_int("small_width", CKA_SMALL_WIDTH if small_width is None else small_width)
    large = _check_positive_int("large_width", CKA_LARGE_WIDTH if large_width is None else large_width)
    width = _check_positive_int("width", CKA_WIDTH if width is None else width)
    seeds = list(CKA_SEEDS if seeds is None else seeds)
    if len(seeds) < 2 or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"seeds must be a list of at least two integers, got {seeds!r}")
    drift = list(CKA_DRIFT_EPOCHS if drift_epochs is None else drift_epochs)
    outside = [e for e in drift if isinstance(e, bool) or not isinstance(e, int)
               or not 1 <= e <= epochs]
    if outside:
        raise ValueError(f"drift epochs {outside} are not epochs of the run; allowed: "
                         f"integers in 1..{epochs}")
    drift = sorted(set(drift) | {1})  # epoch 1 is the reference the others are compared with
    estimator = _check_choice("estimator", CKA_ESTIMATOR if estimator is None else estimator,
                              list(CKA_ESTIMATORS))
    conv = _check_choice("conv", CKA_CONV if conv is None else conv, CKA_CONV_MODES)
    base = {"arch": "ResNet", "optimizer": "Adam", "epochs": epochs}
    specs = ([{**base, "width": w} for w in (small, large)]
             + [{**base, "width": width, "seed": s} for s in seeds])
    # the drift model's checkpoints measure CKA: how is part of what its record holds
    specs[2].update(checkpoints=drift, cka_estimator=estimator, cka_conv=conv)
    return dict(epochs=epochs, small=small, large=large, width=width, seeds=seeds,
                estimator=estimator, conv=conv, specs=specs,
                measure=DriftMeasure(estimator, conv))


class DriftMeasure:
    """Exp 4B's checkpoint measurement: the CKA of each layer with the same model's layer at
    epoch 1, its first checkpoint. An object rather than a closure so that a worker process
    can run it; it keeps each model's epoch-1 representations."""

    def __init__(self, estimator, conv):
        self.estimator, self.conv, self.reference = estimator, conv, {}

    # a group's snapshot keeps the epoch-1 representations, which a resumed run cannot redo
    # (as tensors: a snapshot holds no numpy arrays, so it loads with weights_only)
    def state_dict(self):
        return {"reference": {spec: [torch.from_numpy(r) for r in reps]
                              for spec, reps in self.reference.items()}}

    def load_state_dict(self, state):
        self.reference = {spec: [r.cpu().numpy() for r in reps]
                          for spec, reps in state["reference"].items()}

    def __call__(self, spec, model, epoch, data):
        reps = layer_representations(model, cka_inputs(data), self.conv)
        first = self.reference.setdefault(json.dumps(spec, sort_keys=True), reps)
        similarity = CKA_ESTIMATORS[self.estimator]
        return {"epoch": epoch, **{layer: similarity(r, r1)
                                   for layer, r, r1 in zip(LAYERS, reps, first)}}


def cka_summary(setup, records, trained, data):
    """Exp 4's results (`run_cka_experiment`) from the records of `setup`'s models and the
    trained models themselves (their representations of `cka_inputs`)."""
    small, large, width, seeds = setup["small"], setup["large"], setup["width"], setup["seeds"]
    conv, specs = setup["conv"], setup["specs"]
    similarity = CKA_ESTIMATORS[setup["estimator"]]
    x_cka = cka_inputs(data)
    models = {}
    for spec, record, model in zip(specs, records, trained):
        models[(spec["width"], spec.get("seed"))] = (record,
                                                     layer_representations(model, x_cka, conv))
    small_reps, large_reps = models[(small, None)][1], models[(large, None)][1]
    drift_curve = models[(width, seeds[0])][0]["checkpoints"]
    pairs = [[a, b] for i, a in enumerate(seeds) for b in seeds[i + 1:]]
    return {
        "layers": LAYERS, "small_width": small, "large_width": large, "width": width,
        "cross_arch": [[similarity(a, b) for b in large_reps] for a in small_reps],
        "epochs": [c["epoch"] for c in drift_curve],
        "drift": {layer: [c[layer] for c in drift_curve] for layer in LAYERS},
        "seed_pairs": pairs,
        "cross_seed": {layer: [similarity(models[(width, a)][1][i], models[(width, b)][1][i])
                               for a, b in pairs] for i, layer in enumerate(LAYERS)},
        "test_err": {f"w{spec['width']}" + (f"_seed{spec['seed']}" if "seed" in spec else ""):
                     models[(spec["width"], spec.get("seed"))][0]["test_err"]
                     for spec in specs},
        "cka_subset": len(x_cka), "cka_conv": conv, "estimator": setup["estimator"],
        "epochs_trained": setup["epochs"]}


# ----------------------------------------------------------------------------------------
# 7. Figures, drawn from a results dict alone: the composite (each experiment's panels,
#    `plot_results`), the per-layer / weight-spectrum figure and the width x epoch picture.
# ----------------------------------------------------------------------------------------
CONFIG_STYLE = {"ResNet_SGD": ("tab:blue", "o"), "ResNet_Adam": ("tab:cyan", "s"),
                "CNN_SGD": ("tab:red", "^"), "CNN_Adam": ("tab:orange", "v")}
EPOCH_WISE_COLORS = ["tab:purple", "tab:green", "tab:brown"]
LAYER_COLORS = ["tab:blue", "tab:orange", "tab:green", "tab:red"]
# dashed L3 over a thicker L2: with pooled conv activations a ResNet's L2 and L3 coincide
LAYER_STYLES = [("-", 1.3), ("-", 1.3), ("-", 2.2), ((0, (4, 3)), 1.3)]


def _values(seq):
    return np.array([np.nan if v is None else v for v in seq], dtype=float)


def _fmt(value):
    return "nan" if value is None or not np.isfinite(value) else f"{value:.3g}"


def _duration(seconds):
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m" if seconds >= 3600 else (
        f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s")


def _not_run(ax, what):
    ax.text(0.5, 0.5, f"{what}\nnot run", ha="center", va="center", fontsize=12,
            color="0.45", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor("0.8")
        spine.set_linestyle("--")


def _band(ax, x, replicates, color):
    """Shade the spread over replicates (a list over points of lists over replicates):
    the mean +- one sample standard deviation where a point has three or more finite
    values, the min-max range where it has two (`_band_name` names it)."""
    if not replicates:
        return
    per_point = [_values(r) for r in replicates]
    per_point = [v[np.isfinite(v)] for v in per_point]
    if max(len(v) for v in per_point) < 2:
        return
    low, high = [], []
    for v in per_point:
        if len(v) >= 3:
            low.append(v.mean() - v.std(ddof=1))
            high.append(v.mean() + v.std(ddof=1))
        else:
            low.append(v.min() if len(v) else np.nan)
            high.append(v.max() if len(v) else np.nan)
    ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)


def _band_name(replicates):
    return "bands: mean ± 1 std" if replicates >= 3 else "bands: min-max"


def _replicates_of(series, *path):
    """series["replicates"][path...], or None for results without replicates."""
    node = series.get("replicates")
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _positive_log(ax, values):
    """Log scale where the data allow it (NC1 can be NaN or 0 in degenerate runs)."""
    finite = values[np.isfinite(values)]
    if finite.size and (finite > 0).all():
        ax.set_yscale("log")


def _plot_exp1(axes, exp1):
    panels = [("test_err", "Test error", "Exp 1: model-wise double descent"),
              ("nc1", "NC1  Tr(Σ_W)/Tr(Σ_B)", "Exp 1: NC1 (within-class variability)"),
              ("nc2", "NC2  ‖G − G_ETF‖_F", "Exp 1: NC2 (distance to simplex ETF)"),
              ("nc3", "NC3  ‖Ŵ − M̂‖_F", "Exp 1: NC3 (self-duality)"),
              ("nc4", "NC4  NCC mismatch", "Exp 1: NC4 (nearest class centre)")]
    for ax, (key, label, title) in zip(axes, panels):
        if not exp1:
            _not_run(ax, title)
            continue
        everything = []
        for name, series in exp1.items():
            color, marker = CONFIG_STYLE.get(name, (None, "o"))
            y = _values(series[key])
            everything.append(y)
            ax.plot(series["params"], y, marker=marker, ms=4, color=color,
                    label=name.replace("_", " + "))
            _band(ax, series["params"], _replicates_of(series, key), color)
            if key == "test_err":
                ax.plot(series["params"], _values(series["train_err"]), ls=":", color=color,
                        lw=1)
        if key == "nc1":
            _positive_log(ax, np.concatenate(everything))
        ax.set_xscale("log")
        ax.set_xlabel("Parameters")
        ax.set_ylabel(label)
        ax.set_title(title)
        if key == "test_err":
            ax.legend(fontsize=7, title="dotted: train error (noisy labels)",
                      title_fontsize=7)


def _plot_exp2(axes, exp2):
    (ax,) = axes
    title = "Exp 2: epoch-wise double descent (Adam)"
    if not exp2:
        return _not_run(ax, title)
    for (name, series), color in zip(exp2.items(), EPOCH_WISE_COLORS):
        # each replicate's own curve, thin: their spikes fall at other epochs, which a
        # mean or a band would smooth into a bump no single model has
        seeds = _replicates_of(series, "test_err") or []
        count = len(seeds[0]) if seeds else 1
        for curve in zip(*seeds) if count > 1 else []:
            ax.plot(series["epoch"], _values(list(curve)), color=color, lw=0.6, alpha=0.45)
        ax.plot(series["epoch"], _values(series["test_err"]), color=color,
                label=f"{name} (w={series['width']}) test"
                      + (f": mean, thin: each of {count} seeds" if count > 1 else ""))
        ax.plot(series["epoch"], _values(series["train_err"]), color=color, ls=":", lw=1,
                label=f"{name} train")
    ax.set_xscale("log")
    ax.set_xlabel("Epoch")
    ax.set_ylabel("Error")
    ax.set_title(title)
    ax.legend(fontsize=7)


def _plot_exp3(axes, exp3):
    ax_nc1, ax_nc2 = axes
    titles = ("Exp 3: NC1 vs feature dim d", "Exp 3: NC2 vs feature dim d")
    if not exp3:
        _not_run(ax_nc1, titles[0])
        return _not_run(ax_nc2, titles[1])
    for ax, key, label, title in [(ax_nc1, "nc1", "NC1  Tr(Σ_W)/Tr(Σ_B)", titles[0]),
                                  (ax_nc2, "nc2", "NC2  ‖G − G_ETF‖_F", titles[1])]:
        y = _values(exp3[key])
        ax.plot(exp3["d"], y, marker="o", color="tab:blue")
        _band(ax, exp3["d"], _replicates_of(exp3, key), "tab:blue")
        if key == "nc1":
            _positive_log(ax, y)
        ax.axvline(NUM_CLASSES - 1, color="0.4", ls="--", lw=1,
                   label=f"d = K−1 = {NUM_CLASSES - 1}")
        ax.set_xlabel("Feature dimension d")
        ax.set_ylabel(label)
        ax.set_title(title)
        ax.legend(fontsize=7)


def _cka_name(exp4):
    name = "Debiased linear CKA" if exp4.get("estimator") == "debiased" else "Linear CKA"
    return name + (", flattened convs" if exp4.get("cka_conv") == "flatten" else "")


def _plot_exp4(axes, exp4):
    ax_a, ax_b, ax_c = axes
    titles = ("Exp 4A: CKA small vs large", "Exp 4B: CKA to epoch-1 self",
              "Exp 4C: CKA across seeds")
    if not exp4:
        for ax, title in zip((ax_a, ax_b, ax_c), titles):
            _not_run(ax, title)
        return
    layers = exp4["layers"]
    matrix = np.array([_values(row) for row in exp4["cross_arch"]])
    ax_a.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    for i in range(len(layers)):
        for j in range(len(layers)):
            ax_a.text(j, i, _fmt(matrix[i, j]), ha="center", va="center", fontsize=8,
                      color="white" if matrix[i, j] < 0.6 else "black")
    ax_a.set_xticks(range(len(layers)), layers)
    ax_a.set_yticks(range(len(layers)), layers)
    ax_a.set_xlabel(f"Large model (w={exp4.get('large_width', '?')})")
    ax_a.set_ylabel(f"Small model (w={exp4.get('small_width', '?')})")
    ax_a.set_title(titles[0])
    for layer, color, (style, width) in zip(layers, LAYER_COLORS, LAYER_STYLES):
        ax_b.plot(exp4["epochs"], _values(exp4["drift"][layer]), marker="o", ms=3,
                  color=color, ls=style, lw=width, label=layer)
    ax_b.set_xscale("log")
    ax_b.set_ylim(0, 1.05)
    ax_b.set_xlabel("Epoch")
    cka_name = _cka_name(exp4)
    ax_b.set_ylabel(cka_name)
    ax_b.set_title(titles[1] + f" (w={exp4.get('width', '?')})")
    ax_b.legend(fontsize=7)
    per_layer = [_values(exp4["cross_seed"][layer]) for layer in layers]
    ax_c.bar(layers, [np.nanmean(v) for v in per_layer],
             yerr=[np.nanstd(v) for v in per_layer], capsize=4, color="tab:gray")
    ax_c.set_ylim(0, 1.05)
    ax_c.set_ylabel(f"{cka_name} (mean ± std over pairs)")
    ax_c.set_title(titles[2] + f" {exp4['seed_pairs'] and sorted({s for p in exp4['seed_pairs'] for s in p})}")


def _run_summary(results):
    config, env = results.get("config", {}), results.get("env", {})
    # a collect's wall time is that of reading records, not of training the models
    walls = {} if env.get("collected_from_records") else env.get("wall_seconds", {})
    run = [e.name for e in EXPERIMENTS.values() if results.get(e.name)]
    lines = [f"Preset        {config.get('preset', '?')}",
             f"Device        {env.get('device', '?')}",
             f"              {str(env.get('device_name', ''))[:28]}",
             f"Seed          {config.get('SEED', '?')}",
             f"Label noise   {config.get('LABEL_NOISE', '?')}",
             f"Train samples {config.get('TRAIN_SUBSET') or 4000}",
             f"Epochs        Exp1 {config.get('EPOCHS_MODEL_WISE')}, "
             f"Exp2 {config.get('EPOCHS_EPOCH_WISE')}",
             f"              Exp3 {config.get('EPOCHS_GEN_NC')}, Exp4 {config.get('EPOCHS_CKA')}",
             f"SGD lr        {config.get('SGD_LR')} (cosine to 0)",
             f"Adam lr       {config.get('ADAM_LR')} (constant)",
             f"CKA seeds     {config.get('CKA_SEEDS')}",
             f"CKA           {config.get('CKA_ESTIMATOR', 'linear')}, "
             f"convs {config.get('CKA_CONV', 'pool')}",
             f"Replicates    {config.get('REPLICATES', 1)}"
             + (f" ({_band_name(config.get('REPLICATES', 1))})"
                if config.get("REPLICATES", 1) > 1 else ""),
             f"Run           {', '.join(run) or 'none'}",
             *[f"{'Parts' if i == 0 else '':<14}{', '.join(part['experiments'])}: "
               f"{_commit_of(part)[:7]}, {part['env'].get('device_name', '?')}"
               for i, part in enumerate(results.get("parts", []))],
             *[f"{'Wall time' if i == 0 else '':<14}{k} {_duration(v)}"
               for i, (k, v) in enumerate(walls.items())],
             f"torch {env.get('torch', '?')}",
             f"{env.get('started', '')}"]
    return "\n".join(lines)


def _commit_of(part):
    return (part["env"].get("provenance") or {}).get("git_commit") or "?"


def _figure(rows, cols, size):
    _library("matplotlib").use("Agg")
    return _library("matplotlib.pyplot").subplots(rows, cols, figsize=size)


def _save_figure(fig, results, title, path, tight=True):
    import matplotlib.pyplot as plt
    noise = results.get("config", {}).get("LABEL_NOISE", LABEL_NOISE)
    fig.suptitle(f"{title} on MNIST-1D with {noise:.0%} label noise", fontsize=15)
    if tight:
        fig.tight_layout(rect=(0, 0, 1, 0.97))
    fmt = os.path.splitext(path)[1].lstrip(".") or "png"
    write_atomic(path, lambda f: fig.savefig(f, format=fmt, dpi=FIGURE_DPI))
    plt.close(fig)


def _plot_layer_nc1(ax, name, series):
    title = f"NC1 per layer: {name.replace('_', ' + ')}"
    if not series or "per_layer" not in series:
        return _not_run(ax, title)
    everything = []
    for layer, color, (style, width) in zip(LAYERS, LAYER_COLORS, LAYER_STYLES):
        y = _values(series["per_layer"][layer]["nc1"])
        everything.append(y)
        ax.plot(series["width"], y, marker="o", ms=3, color=color, ls=style, lw=width,
                label=layer)
        _band(ax, series["width"], _replicates_of(series, "per_layer", layer, "nc1"), color)
    _positive_log(ax, np.concatenate(everything))
    _width_axis(ax, series["width"])
    ax.set_ylabel("NC1  Tr(Σ_W)/Tr(Σ_B), training set")
    ax.set_title(title)
    ax.legend(fontsize=7, title="L3 = penultimate", title_fontsize=7)


def _width_axis(ax, widths):
    import matplotlib.ticker
    ax.set_xscale("log")
    ax.set_xticks(widths, [str(w) for w in widths])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("Width w")


def _plot_alpha(ax, title, curves, by_width):
    """Layer-averaged power-law alpha: one (label, x, spectra, replicates of alpha, color,
    marker) per curve, where spectra holds "alpha" (solid) and "alpha_weighted" (dotted;
    results of older versions lack it); x is the width (by_width) or the epoch."""
    if not curves:
        return _not_run(ax, title)
    reliable = [np.nan]
    for label, x, spectra, replicates, color, marker in curves:
        ax.plot(x, _values(spectra["alpha"]), marker=marker, ms=4, color=color, label=label)
        _band(ax, x, replicates, color)
        if "alpha_weighted" in spectra:
            ax.plot(x, _values(spectra["alpha_weighted"]), ls=":", lw=1, color=color)
        reliable += [v for r in (replicates or []) for v in _values(r)]
    clipped = np.isfinite(reliable).any()
    if clipped:
        # scale the axis to the reliable fits; the dotted curves may leave it
        ax.set_ylim(0, max(6.0, 1.2 * np.nanmax(reliable)))
    else:
        ax.text(0.5, 0.5, f"no weight has {ESD_MIN_EVALS} eigenvalues:\nno reliable fit",
                ha="center", va="center", color="0.45", transform=ax.transAxes)
    if by_width:
        _width_axis(ax, sorted({w for curve in curves for w in curve[1]}))
    else:
        ax.set_xscale("log")
        ax.set_xlabel("Epoch")
    ax.set_ylabel("Layer-averaged α")
    ax.set_title(title)
    ax.legend(fontsize=7, title=f"solid: weights with ≥ {ESD_MIN_EVALS} eigenvalues\n"
                                "dotted: every weight, by precision of fit"
                                + (" (clipped)" if clipped else ""), title_fontsize=7)


def plot_layers(results, path):
    """The second figure: NC1 in every layer against width, one panel per Exp 1
    configuration, and the layer-averaged power-law alpha of the weight spectra against
    width (Exp 1) and epoch (Exp 2); written atomically to `path`."""
    fig, axes = _figure(2, 3, (17, 10))
    exp1 = results.get("exp1") or {}
    for ax, name in zip([axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]], CONFIG_STYLE):
        _plot_layer_nc1(ax, name, exp1.get(name))
    _plot_alpha(axes[0, 2], "Weight spectra: power-law α vs width (Exp 1)",
                [(name.replace("_", " + "), series["width"], series["esd"],
                  _replicates_of(series, "esd", "alpha"), *CONFIG_STYLE.get(name, (None, "o")))
                 for name, series in exp1.items() if "esd" in series], by_width=True)
    exp2 = results.get("exp2") or {}
    _plot_alpha(axes[1, 2], "Weight spectra: power-law α vs epoch (Exp 2)",
                [(f"{name} (w={series['width']})", series["epoch"], series,
                  _replicates_of(series, "alpha"), color, None)
                 for (name, series), color in zip(exp2.items(), EPOCH_WISE_COLORS)
                 if "alpha" in series], by_width=False)
    for ax in axes.flat:
        ax.grid(alpha=0.3) if ax.axison else None
    _save_figure(fig, results, "Neural collapse in every layer and heavy-tailed weight spectra",
                 path)


def _log_edges(centres):
    """Cell edges for points on a log axis: geometric midpoints, the outer cells as wide
    (in log) as their neighbours."""
    c = np.log(np.asarray(centres, dtype=float))
    if len(c) == 1:
        return np.exp([c[0] - 0.5, c[0] + 0.5])
    mids = (c[1:] + c[:-1]) / 2
    return np.exp(np.concatenate([[2 * c[0] - mids[0]], mids, [2 * c[-1] - mids[-1]]]))


def plot_width_epoch(results, path):
    """The third figure (Nakkiran et al. 2020, Figure 1): Exp 1's test error (the mean over
    replicates) over width and training epoch, one heatmap per configuration on one colour
    scale; a row read across is epoch-wise, a column read up is model-wise double descent.
    Written atomically to `path`."""
    import matplotlib.ticker
    fig, axes = _figure(1, 4, (21, 5.4))
    fig.subplots_adjust(left=0.04, right=0.91, bottom=0.13, top=0.83, wspace=0.22)
    exp1 = results.get("exp1") or {}
    drawn = [(ax, name, exp1[name]) for ax, name in zip(axes, CONFIG_STYLE)
             if exp1.get(name, {}).get("curves", {}).get("epoch")]
    for ax, name in zip(axes, CONFIG_STYLE):
        if all(ax is not a for a, _, _ in drawn):
            _not_run(ax, f"Test error over width and epoch: {name.replace('_', ' + ')}")
    errors = [_values(np.ravel(series["curves"]["test_err"])) for _, _, series in drawn]
    top = max([np.nanmax(e) for e in errors if np.isfinite(e).any()], default=1.0)
    image = None
    for ax, name, series in drawn:
        epochs, widths = series["curves"]["epoch"], series["width"]
        test_err = np.array([_values(row) for row in series["curves"]["test_err"]])
        image = ax.pcolormesh(_log_edges(epochs), _log_edges(widths), test_err,
                              cmap="viridis", vmin=0, vmax=top, shading="flat")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_yticks(widths, [str(w) for w in widths])
        ax.yaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("Epoch")
        ax.set_ylabel("Width w")
        seeds = series.get("replicate_count", 1)
        ax.set_title(f"Test error: {name.replace('_', ' + ')}"
                     + (f", mean of {seeds} seeds" if seeds > 1 else ""))
    if image is not None:
        fig.colorbar(image, cax=fig.add_axes((0.925, 0.13, 0.01, 0.70)), label="Test error")
    _save_figure(fig, results, "Model-wise and epoch-wise double descent as one surface "
                 "(Exp 1)", path, tight=False)


# ----------------------------------------------------------------------------------------
# The study's experiments: everything the command line, the presets, the composite figure
# and the record keys know of each. Another experiment is one more entry and its functions.
#
# Everything above is the study; everything below runs it, and the study never calls it.
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Experiment:
    number: int
    title: str           # what it shows, for --help
    setup: object        # keyword overrides (None: the globals) -> dict(its settings, "specs":
                         # one dict per model, "measure": what checkpoints record, or None)
    summarise: object    # (setup, records, trained models, data) -> its results dict
    settings: tuple      # globals its models' numbers depend on beyond their specs, the
                         # training's and their optimizer's (`model_settings`)
    panels: int          # axes of the composite figure it draws on
    plot: object         # (its axes, its results or None) -> draws them

    @property
    def name(self):
        return f"exp{self.number}"


EXPERIMENTS = {experiment.number: experiment for experiment in [
    Experiment(1, "model-wise double descent", model_wise_setup, model_wise_summary, (),
               5, _plot_exp1),
    Experiment(2, "epoch-wise double descent", epoch_wise_setup, epoch_wise_summary, (),
               1, _plot_exp2),
    Experiment(3, "generalised NC", generalized_nc_setup, generalized_nc_summary, (),
               2, _plot_exp3),
    Experiment(4, "CKA", cka_setup, cka_summary, ("CKA_SUBSET",), 3, _plot_exp4),
]}


def model_settings(experiment, spec):
    """{name: value} of the settings a model of `experiment` (its name) depends on beyond
    its spec: TRAINING_SETTINGS, its optimizer's and its experiment's own."""
    declared = {e.name: e.settings for e in EXPERIMENTS.values()}.get(experiment, ())
    names = [*TRAINING_SETTINGS, *OPTIMIZER_SETTINGS.get(spec["optimizer"], ()), *declared]
    return {name: globals()[name] for name in names}


def plot_results(results, path):
    """Draw the composite figure of `results` (a dict as the drivers return it, or as
    loaded from the results JSON), each experiment's panels in turn, four to a row, then
    the run's summary, and write it atomically to `path`."""
    cells = sum(e.panels for e in EXPERIMENTS.values()) + 1
    rows = -(-cells // 4)
    fig, axes = _figure(rows, 4, (20, 14 / 3 * rows))
    axes = list(axes.flat)
    start = 0
    for experiment in EXPERIMENTS.values():
        experiment.plot(axes[start:start + experiment.panels], results.get(experiment.name))
        start += experiment.panels
    info = axes[start]
    info.axis("off")
    info.set_title("This run")
    info.text(0.0, 1.0, _run_summary(results), va="top", ha="left", fontsize=9.5,
              family="monospace", transform=info.transAxes)
    for ax in axes[start + 1:]:
        ax.axis("off")
    for ax in axes:
        ax.grid(alpha=0.3) if ax.axison and not ax.images else None
    _save_figure(fig, results, "Double descent, neural collapse and CKA", path)


# ----------------------------------------------------------------------------------------
# 8. Records: which models train together, each finished model saved as a record (JSON and
#    its weights) under a key of what can change its numbers, so that a rerun skips it, and
#    snapshots of a group in training that a stopped run resumes from. Then the run_*
#    drivers, which run one experiment from Python.
# ----------------------------------------------------------------------------------------
def save_json(path, obj):
    text = json.dumps(_json_ready(obj), indent=1, allow_nan=False)
    write_atomic(path, lambda f: f.write(text.encode()))


REPOSITORY = os.path.dirname(os.path.abspath(__file__))


def portable_path(path):
    """A path as a results file gives it: relative to the repository (this script's folder)
    when inside it, else only its last part after ".../": an absolute path names one
    machine's folders, and results files are published and compared across machines."""
    if not os.path.isabs(path):
        return path
    inside = os.path.relpath(path, REPOSITORY)
    if inside == os.curdir:
        return "."
    return (inside if not inside.startswith(os.pardir)
            else ".../" + os.path.basename(os.path.normpath(path)))


def _portable_command(command):
    tokens = []
    for token in shlex.split(command):
        name, sep, value = token.partition("=")
        if os.path.isabs(token):
            token = portable_path(token)
        elif sep and os.path.isabs(value):  # --set DATA_DIR=/...
            token = f"{name}={portable_path(value)}"
        tokens.append(token)
    return shlex.join(tokens)


def publishable(results):
    """`results` as its JSON file holds them: DATA_DIR, the files of merged parts and every
    command line of its provenance with their paths made portable (`portable_path`)."""
    if isinstance(results, list):
        return [publishable(item) for item in results]
    if not isinstance(results, dict):
        return results
    out = {}
    for key, value in results.items():
        if key in ("DATA_DIR", "file") and isinstance(value, str):
            value = portable_path(value)
        elif key == "command" and isinstance(value, str):
            value = _portable_command(value)
        out[key] = publishable(value)
    return out


class WorkCount:
    """Counts the work of one input through `model` by running its architecture's `layers`
    on shapes, (channels, length): the multiply-adds and output values of every
    convolution, the multiply-adds of every linear layer."""

    def __init__(self, model):
        self.model, self.macs, self.activations = model, 0, 0

    def _conv(self, conv, shape):
        channels, length = shape
        self.macs += conv.kernel_size[0] * channels * conv.out_channels * length
        self.activations += conv.out_channels * length
        return conv.out_channels, length

    def conv_bn_relu(self, name, shape):
        return self._conv(self.model.get_submodule(name)[0], shape)

    def conv_bn_relu_pool(self, name, shape):
        channels, length = self.conv_bn_relu(name + ".0", shape)
        return channels, length // 2

    def res_block(self, name, shape):
        block = self.model.get_submodule(name)
        return self._conv(block.conv2, self._conv(block.conv1, shape))

    def global_pool(self, shape):
        return shape[0]

    def linear(self, name, features):
        layer = self.model.get_submodule(name)
        self.macs += layer.in_features * layer.out_features
        return layer.out_features

    def has(self, name):
        return self.model.has(name)


def model_work(spec):
    """The work of one input through one model (`WorkCount`), as multiply-adds plus 50 per
    activation value (BatchNorm, ReLU and their backward are memory-bound) plus 20,000 of
    fixed per-step overhead. On a 2-core CPU this tracks measured epoch times within about
    30% across widths 2-64 of both architectures, where the parameter count would put
    ResNet's time per parameter at 2.7x CNN's."""
    return _work(spec["arch"], spec["width"], spec.get("d"))


@functools.lru_cache(maxsize=None)
def _work(arch, width, feature_dim):
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised
        model = build_model(arch, width, feature_dim)
    count = WorkCount(model)
    count.linear("classifier", model.layers(count, (1, 40)))  # MNIST-1D: length 40
    return count.macs + 50 * count.activations + 20_000


def model_cost(spec):
    return spec["epochs"] * model_work(spec)


def group_cost(group):
    return sum(map(model_cost, group))


def fused_groups(specs, device_type):
    """Which models train side by side (`FusedModels`): same architecture, epochs and
    checkpoints. On a GPU, where a step costs its kernel launches, models of every width
    and one optimizer go together (the narrower zero-padded). On a CPU a narrow model's
    step costs mostly per-operation overhead, which fusing shares, and a wide one's its
    arithmetic, which padding wastes and the worker processes already spread over the
    cores; so there models of both optimizers go together in order of width while the
    group's size times its widest width stays within CPU_GROUP_WIDTH, and two models of
    one width always pair up (a pair of w = 64 trains about 1.2x faster than the two
    alone; a larger group gains less). Exp 1's groups: widths 2-8 (both optimizers),
    10-12, then each width's SGD and Adam model together.

    On a CPU each replicate's models group among themselves, as they would with
    REPLICATES = 1: adding replicates never changes the group, and so the numbers, of a
    model already trained (`record_key`), and REPLICATES = 3 reuses the records of a run
    with 1. On a GPU, where a step costs mostly its kernel launches, all replicates go
    together.

    The groups depend on the specs and the device type alone, so a resumed run and every
    shard of a sharded one form exactly the groups of an uninterrupted run."""
    if not FUSED:
        return [[spec] for spec in specs]
    cpu = device_type == "cpu"
    by_key = {}
    for spec in specs:
        key = (spec["arch"], spec["epochs"], "d" in spec, tuple(spec.get("checkpoints", ())))
        key += (spec.get("replicate", 0),) if cpu else (spec["optimizer"],)
        by_key.setdefault(key, []).append(spec)
    if not cpu:
        return list(by_key.values())
    groups = []
    for members in by_key.values():
        group = []
        for spec in sorted(members, key=lambda s: s["width"]):
            pair = len(group) == 1 and group[0]["width"] == spec["width"]
            if group and not pair and (len(group) + 1) * spec["width"] > CPU_GROUP_WIDTH:
                groups.append(group)
                group = []
            group.append(spec)
        groups.append(group)
    # each optimizer's models contiguous: one optimizer per run (RowOptimizers)
    return [sorted(group, key=lambda s: s["optimizer"]) for group in groups]


def worker_count(device_type):
    """Processes that train groups at once: on a CPU WORKERS, or with WORKERS = 0 one per
    core this process may use (its affinity: a SLURM task's or `taskset`'s share, not the
    node's); on a GPU one. With two or more, every group trains on one thread, so the count
    changes no number, only how many groups train at once."""
    if device_type != "cpu":
        return 1
    if WORKERS:
        return WORKERS
    cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
             else os.cpu_count() or 1)
    return cores


@contextlib.contextmanager
def torch_threads(count):
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def group_threads(device_type):
    """The threads a group trains on (`ModelRuns._fit_groups`): on a CPU one with two or
    more workers, else all of torch's; None on a GPU, where the count is not ours."""
    if device_type != "cpu":
        return None
    return 1 if worker_count(device_type) > 1 else torch.get_num_threads()


def rounding_context(device_type):
    """What besides a model's group can change its rounding on `device_type`: the device
    type, the threads its group trains on and the rounding mode (FLUSH_DENORMALS on a
    CPU, CUDA_GRAPHS on a GPU). Part of every record's key."""
    context = {"device": device_type, "threads": group_threads(device_type)}
    if device_type == "cpu":
        context["flush_denormals"] = FLUSH_DENORMALS
    else:
        context["cuda_graphs"] = CUDA_GRAPHS
    return context


def record_key(spec, group, settings, rounding):
    """A model's record key: a digest of what can change its numbers and nothing else:
    its spec, the specs of the group it trains fused with (padding and grouped kernels
    round differently in another group), the settings its experiment and optimizer
    declare (`model_settings`) and the rounding context (`rounding_context`). A setting
    no experiment declares, a run setting such as PROGRESS_SECONDS, or a worker count
    that gives the same threads never changes a key."""
    blob = json.dumps({"model": spec, "group": group, "settings": settings,
                       "rounding": rounding}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


def _first_line(error):
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:120] if text else ''}"


@functools.lru_cache(maxsize=None)
def _code_identity():
    """(sha256 of this script, its git commit or None, whether the script differs from that
    commit or None): asked of git once per process, never of a network."""
    with open(os.path.abspath(__file__), "rb") as f:
        sha256 = hashlib.sha256(f.read()).hexdigest()
    here, name = os.path.split(os.path.abspath(__file__))

    def git(*args):
        done = subprocess.run(["git", "-C", here, *args], capture_output=True, text=True,
                              timeout=20)
        return done.stdout.strip() if done.returncode == 0 else None
    try:
        commit = git("rev-parse", "HEAD")
        dirty = None if commit is None else bool(git("status", "--porcelain", "--", name))
    except (OSError, subprocess.SubprocessError):
        commit = dirty = None
    return sha256, commit, dirty


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def provenance(device_type):
    """Which code, command and machine made a result: the script's sha256 and git commit
    (git_dirty: the script has changes the commit lacks), the command line, torch and
    numpy versions, the CPU's model name and the GPU's. Kept in the results JSON and in
    every record, never in a record's key: it cannot change a number."""
    sha256, commit, dirty = _code_identity()
    return {"script_sha256": sha256, "git_commit": commit, "git_dirty": dirty,
            "command": shlex.join(["python", *sys.argv]), "torch": torch.__version__,
            "numpy": np.__version__, "cpu": cpu_name(),
            "gpu": torch.cuda.get_device_name() if device_type == "cuda" else None}


class NotCollectable(RuntimeError):
    """A collect found a model without a readable record."""


def prepare_records(records_dir, experiments):
    """Before anything trains: each experiment's records folder under `records_dir` made
    and proven writable (an OSError naming it, else), and the temporary files a killed run
    left there removed (`remove_stale_temporaries`). `experiments`: names ("exp1")."""
    for experiment in experiments:
        folder = os.path.join(records_dir, experiment)
        try:
            os.makedirs(folder, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as e:
            raise OSError(e.errno, e.strerror, folder) from None
        remove_stale_temporaries(folder)


class GroupClaims:
    """The groups this run is training, each claimed by an exclusive lock (flock) on a file
    beside its snapshot, so that two runs on one records folder never train one group at
    once: the other leaves it to its holder (`ModelRuns.run_many`). The operating system
    drops a lock when its holder's process ends, a kill -9 included, so a dead run's
    groups are free again. Without a records folder (or on a system without flock) every
    claim succeeds."""

    def __init__(self, runs):
        self.runs, self.held = runs, {}

    def take(self, group):
        """Claim `group` (True), or find it claimed by another run (False); never waits."""
        path = self.runs.lock_path(group)
        if path is None or path in self.held:
            return True
        try:
            import fcntl
        except ImportError:
            return True
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # a holder removes the file as it lets go (`release`): a lock taken on a file
            # removed meanwhile claims nothing, so open the path again
            try:
                current = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                current = False
            if current:
                self.held[path] = fd
                return True
            os.close(fd)

    def release(self, group):
        path = self.runs.lock_path(group)
        fd = self.held.pop(path, None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.remove(path)
            os.close(fd)

    def close(self):
        for path, fd in list(self.held.items()):
            with contextlib.suppress(OSError):
                os.remove(path)
            os.close(fd)
        self.held.clear()


# What every model record holds (`fit_group`), all of which the summaries and the model
# table read; and what each experiment's checkpoint measure adds at every checkpoint.
RECORD_FIELDS = ["arch", "optimizer", "width", "epochs", "seed", "params", "diverged",
                 "epochs_run", "train_err", "test_err", "train_loss", "test_loss", "nc_train",
                 "nc_test", "per_layer", "esd", "checkpoints", "seconds"]
CHECKPOINT_FIELDS = {"exp1": ["epoch", *LEARNING_CURVE_NAMES], "exp2": ["epoch", *CURVE_NAMES],
                     "exp4": ["epoch", *LAYERS]}


def record_problem(record, experiment, spec):
    """What keeps `record` from being the finished record of `spec`'s model of `experiment`
    (a field missing or of another kind), or None. A record written by other means, or cut
    short by a full disk or a shared file system, can be valid JSON and still hollow."""
    if not isinstance(record, dict):
        return "not a JSON object"
    missing = [name for name in RECORD_FIELDS if name not in record]
    if missing:
        return "no " + ", ".join(missing)
    shapes = [(record["nc_train"], NC_NAMES, "nc_train"), (record["nc_test"], NC_NAMES, "nc_test"),
              (record["esd"], ["alpha"], "esd"), (record["per_layer"], LAYERS, "per_layer")]
    if isinstance(record["per_layer"], dict):
        shapes += [(record["per_layer"].get(layer), LAYER_NC_NAMES, f"per_layer {layer}")
                   for layer in LAYERS]
    for part, names, what in shapes:
        if not isinstance(part, dict) or any(name not in part for name in names):
            return f"{what} lacks some of {', '.join(names)}"
    checkpoints = record["checkpoints"]
    if not isinstance(checkpoints, list) or not all(isinstance(c, dict) for c in checkpoints):
        return "checkpoints is not a list of measurements"
    names = CHECKPOINT_FIELDS.get(experiment, ["epoch"]) if spec.get("checkpoints") else []
    if any(name not in c for c in checkpoints for name in names):
        return "a checkpoint lacks some of " + ", ".join(names)
    epochs = [c.get("epoch") for c in checkpoints]
    expected = list(spec.get("checkpoints", ()))
    if epochs != expected and not (record["diverged"] and epochs == expected[:len(epochs)]):
        return "its checkpoint epochs are not its spec's"
    return None


class ModelRuns:
    """The record store of one experiment: trains its models (`fit_group`), or loads their
    records from `records_dir` when an earlier run with the same key finished them; prints
    one progress line per model with an ETA. With train=False (a collect) it only loads.

    `rounding` is the rounding context the records are keyed under (default: this
    process's, on the data's device); `run` is the command line's {"estimates", "taken"}
    of every experiment, for the time left in the whole run (`_left`); `workers`, the
    run's worker processes (RunWorkers), kept from one experiment to the next."""

    def __init__(self, experiment, data, records_dir=None, log=print, rounding=None,
                 train=True, run=None, workers=None):
        self.experiment, self.data, self.records_dir, self.log = experiment, data, records_dir, log
        self.rounding = rounding or rounding_context(data["x_train"].device.type)
        self.device_type, self.train, self.run = self.rounding["device"], train, run
        self.workers = workers
        self.count, self.trained_cost = 0, 0
        self.train_start, self.todo_cost, self.finished, self.last_progress = None, 0, set(), 0.0
        self.partial_cost = 0  # work done in groups that workers are still training
        self.resumed = {}  # {snapshot path: the epoch a stopped group resumes after}

    def key(self, spec, group):
        return record_key(spec, group, model_settings(self.experiment, spec), self.rounding)

    def _paths(self, spec, group):
        name = f"{spec['arch']}_{spec['optimizer']}_w{spec['width']}"
        if spec.get("replicate"):
            name += f"_r{spec['replicate']}"
        stem = os.path.join(self.records_dir, self.experiment,
                            f"{name}_{self.key(spec, group)}")
        return stem + ".json", stem + ".pt"

    def snapshot_path(self, group):
        """Where a group in training keeps its latest state (`train_models`); named by its
        models' keys, so a change of configuration never resumes from a stale one."""
        if not self.records_dir:
            return None
        keys = " ".join(self.key(spec, group) for spec in group)
        digest = hashlib.sha256(keys.encode()).hexdigest()[:20]
        return os.path.join(self.records_dir, self.experiment, f"group_{digest}.snapshot")

    def lock_path(self, group):
        """The file a run training `group` holds locked (`GroupClaims`)."""
        path = self.snapshot_path(group)
        return path and path[:-len(".snapshot")] + ".lock"

    def groups(self, specs):
        return fused_groups(specs, self.device_type)

    def stored_records(self, specs):
        """The JSON record each finished model of `specs` left, or None (no weights are
        loaded), in the order of `specs`."""
        found = {}
        for group in self.groups(specs):
            for spec in group:
                try:
                    with open(self._paths(spec, group)[0]) as f:
                        record = json.load(f)
                except (OSError, ValueError, TypeError):
                    continue
                if record_problem(record, self.experiment, spec) is None:
                    found[json.dumps(spec, sort_keys=True)] = record
        return [found.get(json.dumps(spec, sort_keys=True)) for spec in specs]

    def load(self, spec, group, keep_model=False):
        """(record, model or None) of a finished model, or None when it has no readable
        record: none yet, or one that a crash, a full disk or a shared filesystem left
        truncated or corrupt (then with a one-line warning: it counts as missing)."""
        if not self.records_dir:
            return None
        json_path, weights_path = self._paths(spec, group)
        if not os.path.exists(json_path):
            return None
        try:
            with open(json_path) as f:
                record = json.load(f)
            problem = record_problem(record, self.experiment, spec)
            if problem:
                raise ValueError(f"not a finished model's record: {problem}")
            # the weights are checked too: a record without usable weights is no record
            model = self._rebuild(spec, torch.load(weights_path, weights_only=True))
        except Exception as e:
            warnings.warn(f"record {json_path} is unreadable ({_first_line(e)}); it counts "
                          "as missing and its group is trained again")
            return None
        return record, (model if keep_model else None)

    def run_many(self, specs, measure=None, keep_models=False, select=None):
        """Records of the models of `specs`, in order: loaded when an earlier run finished
        them, else trained (fused in `groups`). `measure(spec, model, epoch, data)` is
        called at the epochs in spec["checkpoints"]; its dicts are kept in
        record["checkpoints"]. With keep_models, returns (records, trained models).
        `select(group)` (a shard's share) limits which unfinished groups train; the
        records of the others are None.

        Groups are formed from all of `specs`, finished or not, so a resumed run trains
        exactly the groups of an uninterrupted one; a group stopped in training goes on
        from its snapshot (`snapshot_path`), and one a kill left partly saved is trained
        again whole (fused models round differently in another group, see FusedModels)."""
        index = {json.dumps(spec, sort_keys=True): i for i, spec in enumerate(specs)}
        done, todo = {}, []
        for group in self.groups(specs):
            loaded = [self.load(spec, group, keep_models) for spec in group]
            if any(item is None for item in loaded):
                todo.append(group)
                continue
            for spec, item in zip(group, loaded):
                done[index[json.dumps(spec, sort_keys=True)]] = item
                self._report(spec, item[0], cached=True)
            if self.train:  # a collect writes nothing
                self._drop_snapshot(group)  # one a kill left just after the records
        todo = [group for group in todo if select is None or select(group)]
        if todo and not self.train:
            raise NotCollectable(f"{sum(map(len, todo))} models of {self.experiment} have no "
                                 "readable record")
        if todo and self.records_dir:
            prepare_records(self.records_dir, [self.experiment])
        for group in todo:  # for the estimates; a snapshot is used once its group is claimed
            state = load_snapshot(self.snapshot_path(group), quiet=True)
            if state is not None:
                self.resumed[self.snapshot_path(group)] = state["training"]["epoch"]
        todo.sort(key=lambda g: -self._cost_to(g))
        self.train_start = self.last_progress = time.time()
        self.todo_cost = sum(self._cost_to(g) for g in todo)
        with contextlib.closing(GroupClaims(self)) as claims:
            elsewhere = []  # groups another run on this folder is training
            # closing: an interruption shuts the worker pool down at once, not at collection
            with contextlib.closing(self._fit_groups(todo, measure, claims)) as fits:
                for group, fitted in fits:
                    if fitted is None:
                        elsewhere.append(group)
                    else:
                        self._keep(group, fitted, done, index, claims)
            if elsewhere:
                self._await(elsewhere, measure, keep_models, claims, done, index)
        missing = (None, None)
        records = [done.get(i, missing)[0] for i in range(len(specs))]
        return (records, [done.get(i, missing)[1] for i in range(len(specs))]) \
            if keep_models else records

    def _keep(self, group, fitted, done, index, claims):
        """Store a trained group's records (its models finish together), then let it go."""
        self.trained_cost += self._cost_to(group)
        with stops_deferred():
            for spec, (record, model) in zip(group, fitted):
                done[index[json.dumps(spec, sort_keys=True)]] = (
                    self._store(spec, group, record, model), model)
            self._drop_snapshot(group)
            claims.release(group)

    def _await(self, groups, measure, keep_models, claims, done, index):
        """Wait for the groups another run is training (`GroupClaims`): as each is let go,
        read its records, or, when its run ended before finishing it, train it here (from
        the snapshot that run left)."""
        if self.log is not None:
            self.log(f"[{self.experiment}] {len(groups)} group(s) are being trained by "
                     f"another run on {self.records_dir}: "
                     f"{'; '.join(map(_describe_group, groups))}; waiting for them")
        waiting = list(groups)
        while waiting:
            for group in [g for g in waiting if claims.take(g)]:
                waiting.remove(group)
                loaded = [self.load(spec, group, keep_models) for spec in group]
                if all(item is not None for item in loaded):
                    for spec, item in zip(group, loaded):
                        done[index[json.dumps(spec, sort_keys=True)]] = item
                        self._report(spec, item[0], cached=True)
                    claims.release(group)
                    continue
                for _, fitted in self._fit_groups([group], measure, claims):
                    self._keep(group, fitted, done, index, claims)
            if waiting:
                time.sleep(1.0)

    def _claim(self, claims, group):
        """Claim `group` for this run (`GroupClaims`); once claimed, say where it resumes."""
        if claims is not None and not claims.take(group):
            return False
        self._note_snapshot(group)
        return True

    def _fit_groups(self, groups, measure, claims=None):
        """(group, [(record, model), ...]) for every group, in the order given (longest
        first), or (group, None) for one that another run has claimed (`GroupClaims`; each
        is claimed just before it starts). On a CPU with two or more workers, every group
        trains on one thread: in worker processes while two or more are left (two
        one-thread processes use two cores better than one process on two threads), here
        when only one is. The thread count changes rounding, so a model's numbers never
        depend on how many groups a run, a resumed run or a shard has left. Progress lines
        come from this process: workers write the epoch they are at into shared memory.
        The worker processes are the run's (`workers`, a RunWorkers), else this call's
        own."""
        workers = worker_count(self.data["x_train"].device.type)
        with torch_threads(group_threads(self.device_type) or torch.get_num_threads()):
            if workers < 2 or len(groups) < 2:
                for i, group in enumerate(groups):
                    if not self._claim(claims, group):
                        yield group, None
                        continue
                    path = self.snapshot_path(group)
                    yield group, fit_group(self.experiment, group, self.data, measure,
                                           self._epoch_counter(i, group),
                                           *snapshot_files(path))
                return
            calls = [(_worker_fit, (self.experiment, self.data, group, measure, i,
                                    self.snapshot_path(group))) for i, group in enumerate(groups)]
            shared = self.workers or RunWorkers(min(workers, len(groups)), len(groups))
            with contextlib.nullcontext() if self.workers else shared:
                pool, epochs_done = shared.start(len(groups))
                for i, result in pool.map_unordered(
                        calls, PROGRESS_SECONDS,
                        lambda: self._progress(self._training(groups, epochs_done)),
                        claim=lambda i: self._claim(claims, groups[i])):
                    self.finished.add(i)
                    if result is None:
                        yield groups[i], None
                        continue
                    self.partial_cost = sum(self._cost_to(g, epoch) for g, epoch
                                            in self._training(groups, epochs_done).values())
                    yield groups[i], [(record, self._rebuild(spec, state))
                                      for spec, (record, state) in zip(groups[i], result[1])]

    def _training(self, groups, epochs_done):
        """{index: (group, epochs done)} of the groups that workers are training now."""
        return {i: (group, epochs_done[i]) for i, group in enumerate(groups)
                if 0 < epochs_done[i] and i not in self.finished}

    def _epoch_counter(self, i, group):
        """on_epoch for a group trained in this process: a progress line when one is due."""
        def on_epoch(epoch):
            if time.time() - self.last_progress >= PROGRESS_SECONDS:
                self._progress({i: (group, epoch)})
        return on_epoch

    def _progress(self, training):
        """One line per group in training ({index: (group, epochs done)}): its epoch and
        the time left in this experiment and in the whole run, from this run's pace."""
        self.last_progress = time.time()
        if self.log is None:
            return
        progressed = self.trained_cost + sum(self._cost_to(g, epoch)
                                             for g, epoch in training.values())
        left = _eta(time.time() - self.train_start, progressed, self.todo_cost)
        for group, epoch in training.values():
            self.log(f"[{self.experiment}] {_describe_group(group)}: epoch {epoch} of "
                     f"{group[0]['epochs']}; {_left(self.experiment, left, self.run)}")

    def _rebuild(self, spec, state):
        model = make_model(spec["arch"], spec["width"], 0, spec.get("d"))
        model.load_state_dict(state)
        if self.data is None:  # the plan's check of a record: no device to move it to
            return model.eval()
        return model.to(self.data["x_train"].device).eval()

    def _note_snapshot(self, group):
        """Before training: the epoch a stopped group's snapshot holds, logged and kept
        for the time estimates (an unreadable snapshot is removed: the group starts over)."""
        path = self.snapshot_path(group)
        state = load_snapshot(path)
        if state is None:
            self._drop_snapshot(group)
            return
        epoch = self.resumed[path] = state["training"]["epoch"]
        if self.log is not None:
            self.log(f"[{self.experiment}] {_describe_group(group)}: resumes at epoch "
                     f"{epoch + 1} of {group[0]['epochs']} from the snapshot a stopped run left")

    def share_done(self, group):
        """How much of a group earlier runs did: 1 when all its records are there and
        readable (`load`: as the run will find them), its snapshot's epoch over its
        epochs, else 0 (for the plan)."""
        if not self.records_dir:
            return 0.0
        # an unreadable record or snapshot is reported when the run meets it
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if all(self.load(spec, group) is not None for spec in group):
                return 1.0
            state = load_snapshot(self.snapshot_path(group))
        return 0.0 if state is None else state["training"]["epoch"] / group[0]["epochs"]

    def _drop_snapshot(self, group):
        """Remove a group's snapshot: its records, once written, supersede it."""
        path = self.snapshot_path(group)
        if path and os.path.exists(path):
            os.remove(path)

    def _cost_to(self, group, epoch=None):
        """The cost of training a group from where this run starts it (a snapshot's epoch,
        or 0) to `epoch` (None: to its end)."""
        start = self.resumed.get(self.snapshot_path(group), 0)
        end = group[0]["epochs"] if epoch is None else epoch
        return group_cost(group) * max(end - start, 0) / group[0]["epochs"]

    def _store(self, spec, group, record, model):
        """Save a finished model's record and weights (when there is a records_dir), report
        it, and return the record as it reads back from JSON."""
        record = {**record, "rounding": self.rounding,
                  "provenance": provenance(self.device_type)}
        if self.records_dir:
            json_path, weights_path = self._paths(spec, group)
            state = {k: v.cpu() for k, v in model.state_dict().items()}
            write_atomic(weights_path, lambda f: torch.save(state, f))
            save_json(json_path, record)  # written last: its presence marks it done
        record = json.loads(json.dumps(_json_ready(record)))
        self._report(spec, record, cached=False)
        return record

    def _report(self, spec, record, cached):
        self.count += 1
        if self.log is None:
            return
        eta = ""
        if not cached:
            left = _eta(time.time() - self.train_start,
                        self.trained_cost + self.partial_cost, self.todo_cost)
            eta = (_left(self.experiment, left, self.run)
                   if self.trained_cost < self.todo_cost else "")
        what = f"{spec['arch']} {spec['optimizer']} w={spec['width']}"
        if spec.get("d") is not None:
            what += f" d={spec['d']}"
        if _shows_replicate(spec):
            what += f" rep={spec['replicate']}"
        if "seed" in spec:
            what += f" seed={spec['seed']}"
        status = "DIVERGED" if record["diverged"] else (
            f"test_err {_fmt(record['test_err'])} NC1 {_fmt(record['nc_train']['nc1'])}")
        timing = "cached" if cached else f"{record['seconds']:.1f}s"
        self.log(f"[{self.experiment}] {what:<28} {status}  ({timing})  "
                 f"{self.count} done{'; ' + eta if eta else ''}")


def load_snapshot(path, quiet=False):
    """The state a stopped group saved, or None: none, or unreadable (with a warning unless
    `quiet`; the group then starts over)."""
    if not path or not os.path.exists(path):
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        if not quiet:
            warnings.warn(f"snapshot {path} is unreadable ({_first_line(e)}); its group "
                          "starts over")
        return None


def snapshot_files(path):
    """(load_state, save_state) for `fit_group`, on the snapshot file `path` (None: no
    snapshots)."""
    if path is None:
        return None, None
    return (lambda: load_snapshot(path),
            lambda state: write_atomic(path, lambda f: torch.save(state, f)))


def run_experiment(number, setup, device=None, records_dir=None, log=print, rounding=None,
                   train=True, run=None, workers=None):
    """Experiment `number` as `setup` (what its setup function returns) describes it: its
    models trained, or loaded from `records_dir`, then summarised, as a plain JSON-ready
    dict. The run_* drivers and the command line both come here; `rounding`, `train`,
    `run` and `workers` are as in ModelRuns."""
    experiment = EXPERIMENTS[number]
    data = experiment_data(resolve_device(device))
    runs = ModelRuns(experiment.name, data, records_dir, log, rounding, train, run, workers)
    records, models = runs.run_many(setup["specs"], setup["measure"], keep_models=True)
    return _json_ready(experiment.summarise(setup, records, models, data))


def run_model_wise_complete(epochs=None, widths=None, archs=("ResNet", "CNN"),
                            optimizers=("SGD", "Adam"), replicates=None, device=None,
                            records_dir=None, log=print):
    """Exp 1, model-wise double descent: every architecture x optimizer x width, trained for
    `epochs`, `replicates` times (own derived seeds). Per configuration ("ResNet_SGD", ...),
    lists over widths of the mean over replicates: train/test error, train loss, seconds,
    NC1-NC4 on the training set (noisy labels) and under "nc_test" on the test set (clean
    labels); "per_layer": NC1 (both forms) and NC4 of every layer L0..L3; "esd": the weight
    spectra (layer-averaged power-law alpha and every weight's fit). Every replicate's value
    is kept under "replicates"; "diverged" says whether any replicate diverged. "curves":
    the learning curves, train and test error and loss at the log-spaced epochs
    curves["epoch"] (MODEL_WISE_POINTS of them), as lists over widths of lists over epochs
    (each replicate's under curves["replicates"]); evaluating them leaves training as it
    would be without them."""
    return run_experiment(1, model_wise_setup(epochs, widths, archs, optimizers, replicates),
                          device, records_dir, log)


def run_epoch_wise_dynamics(epochs=None, widths=None, replicates=None, device=None,
                            records_dir=None, log=print):
    """Exp 2, epoch-wise double descent: ResNet-1D at a "critical" and a "large" width, Adam,
    `replicates` models each; at log-spaced epochs, the mean over replicates of train/test
    error, NC1 (training set) and the layer-averaged power-law alpha of the weight spectra
    ("alpha": layers with enough eigenvalues for a reliable fit; "alpha_weighted": every
    layer, weighted by the precision of its fit),
    with every replicate's values under "replicates"."""
    return run_experiment(2, epoch_wise_setup(epochs, widths, replicates), device,
                          records_dir, log)


def run_generalized_nc(epochs=None, dims=None, width=None, replicates=None, device=None,
                       records_dir=None, log=print):
    """Exp 3, generalised NC: ResNet-1D(width) with a bias-free projector to d dimensions,
    SGD, `replicates` models per d; NC metrics (training set) against d, the mean over
    replicates, with every replicate's values under "replicates". d < K-1 = 9 cannot hold a
    simplex ETF."""
    return run_experiment(3, generalized_nc_setup(epochs, dims, width, replicates), device,
                          records_dir, log)


def run_cka_experiment(epochs=None, small_width=None, large_width=None, width=None,
                       seeds=None, drift_epochs=None, estimator=None, conv=None, device=None,
                       records_dir=None, log=print):
    """Exp 4, layer-wise CKA between ResNet-1D models trained with Adam:
    4A small vs large width (4x4 layer pairs, rows small, columns large); 4B one model at
    `width` against its epoch-1 self at `drift_epochs` (the model of the first seed);
    4C the models of `seeds` compared pairwise, layer by layer. `estimator` (CKA_ESTIMATOR)
    is "linear" or "debiased"; `conv` (CKA_CONV) pools conv activations over length or
    flattens them."""
    return run_experiment(4, cka_setup(epochs, small_width, large_width, width, seeds,
                                       drift_epochs, estimator, conv),
                          device, records_dir, log)


# ----------------------------------------------------------------------------------------
# 9. Workers: processes that train groups side by side, progress and stops.
# ----------------------------------------------------------------------------------------
@contextlib.contextmanager
def _main_hidden_from_workers():
    """While worker processes start, hide the caller's __main__ from them, unless it is
    this script (the command line). A spawned worker imports the parent's __main__ to
    unpickle what it defines; workers need only this module, and a researcher's script
    without an `if __name__ == "__main__":` guard would run again in every worker (and
    start workers of its own), while one piped into `python -` has no file to import.
    Hidden, workers start as they do under `python -c`, where nothing is imported."""
    main = sys.modules.get("__main__")
    script = os.path.abspath(__file__)
    if main is None or os.path.abspath(getattr(main, "__file__", None) or "") == script:
        yield
        return
    import types
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt: the workers are
    stopped, temporary files are removed, and finished records stay."""


def _stop_on_sigterm(signum, frame):
    raise Terminated()


class OutputClosed(KeyboardInterrupt):
    """Whoever read the command line's output stopped reading (`| head`): it stops as at
    Ctrl-C, since what it prints goes nowhere (a shell's SIGPIPE, which Python ignores)."""


def to_devnull(stream):
    """Point a stream whose pipe was closed at /dev/null, else the interpreter's last flush
    of it fails once more."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, stream.fileno())
    os.close(devnull)


def say(*parts):
    """A line of the command line's output, on stdout."""
    try:
        print(*parts, flush=True)
    except BrokenPipeError:
        to_devnull(sys.stdout)
        raise OutputClosed() from None


def _shrugged_off(signum, frame):
    """The handler of a signal to ignore: a worker's Ctrl-C (it reaches the whole process
    group; the parent decides), or a second SIGTERM to a process that is ending already,
    which must not cut its way out short. A Python function rather than SIG_IGN: CPython
    reports a signal that lands while a handler changes from a Python function to SIG_IGN
    as a traceback ("OSError: Signal 15 ignored due to race condition"), and a parent that
    closes its workers' pipes, then sends SIGTERM to those still running, lands one there
    now and then. Between two Python functions there is no such moment."""


@contextlib.contextmanager
def _ctrl_c_held():
    """Ctrl-C (SIGINT) blocked in this thread while it starts a worker process, which
    inherits the mask: a Ctrl-C to the process group then waits in the new process until
    `_worker_main` shrugs it off, instead of striking its start-up (seconds of imports) as a
    traceback. Here a held Ctrl-C arrives once the block ends. CPython starts its resource
    tracker the same way, and unblocks SIGINT after it, so that tracker is started first."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    from multiprocessing import resource_tracker
    resource_tracker.ensure_running()  # a spawned process's start would start it otherwise
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _shared_counters(count):
    """`count` integers in shared memory that workers write and this process reads."""
    import multiprocessing
    return multiprocessing.get_context("spawn").Array("i", count, lock=False)


class WorkerError(RuntimeError):
    """A job raised in a worker process; the message holds the worker's traceback."""


class Workers:
    """Worker processes, each taking one call at a time through a pipe of its own.

    Nothing else joins them to each other or to this process, so a worker that a signal
    ends anywhere (starting, idle, training, writing) blocks nobody. multiprocessing.Pool
    could not promise that: its workers share one task queue behind one lock, and a
    SIGTERM to the whole process group that caught an idle worker holding it (`timeout`,
    a cluster's time limit, `docker stop`) hung the parent's shutdown for good.

    A worker ignores Ctrl-C (it reaches the whole process group; this process decides)
    and ends on SIGTERM, removing a half-written file on the way (`write_atomic`). A
    worker that SIGTERM ended stops the run as a SIGTERM here would; one that died
    otherwise (out of memory, say) raises WorkerError. Leaving the `with` block ends every
    worker within seconds, whatever it was doing.

    Calls and results travel as plain pickles, tensors by value: multiprocessing's own
    pickler would hand tensors over as shared memory, through a helper thread that a stop
    landing mid-handshake left printing a traceback. Every worker applies `settings` (the
    hyperparameters) before its first call. `shared`, when given (shared memory, which
    cannot travel through a pipe), is handed to every call as its first argument."""

    def __init__(self, count, settings, shared=None):
        import multiprocessing
        context = multiprocessing.get_context("spawn")
        self.processes, self.pipes = [], []
        try:
            with _main_hidden_from_workers():
                for _ in range(count):
                    pipe, worker_end = context.Pipe()
                    process = context.Process(target=_worker_main, daemon=True,
                                              args=(worker_end, settings, shared))
                    with _ctrl_c_held():
                        process.start()
                    worker_end.close()
                    self.processes.append(process)
                    self.pipes.append(pipe)
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def map_unordered(self, calls, timeout=None, on_wait=None, claim=None):
        """(index, function(*args)) for each (function, args) in `calls`, in the order
        they finish; `on_wait()` after every `timeout` seconds that bring no result.
        `claim(index)`, when given, is asked just before a call is sent to a worker: a call
        it declines (False) is not run and comes back as (index, None)."""
        from multiprocessing.connection import wait
        waiting = list(enumerate(calls))[::-1]
        busy = {}  # worker number: index of the call it runs
        while waiting or busy:
            for w in range(len(self.processes)):
                while waiting and w not in busy:
                    index, call = waiting.pop()
                    if claim is not None and not claim(index):
                        yield index, None
                        continue
                    busy[w] = index
                    try:
                        self.pipes[w].send_bytes(pickle.dumps(call))
                    except OSError:  # the worker has ended
                        self._lost(w)
            if not busy:
                continue
            ready = set(wait([self.pipes[w] for w in busy] +
                             [self.processes[w].sentinel for w in busy], timeout))
            if not ready and on_wait is not None:
                on_wait()
            for w in list(busy):
                if self.pipes[w] not in ready and self.processes[w].sentinel not in ready:
                    continue
                try:
                    ok, value = pickle.loads(self.pipes[w].recv_bytes())
                except (EOFError, OSError):
                    self._lost(w)
                if not ok:
                    raise value if isinstance(value, BaseException) else WorkerError(value)
                yield busy.pop(w), value

    def _lost(self, w):
        """A worker ended without answering: how it ended decides what the run does."""
        process = self.processes[w]
        process.join(5)
        code = process.exitcode
        if code in (-signal.SIGTERM, 128 + signal.SIGTERM):
            raise Terminated()
        if code in (-signal.SIGINT, 128 + signal.SIGINT):
            raise KeyboardInterrupt()
        raise WorkerError(f"a worker process ended with exit code {code} (a negative one is "
                          "a signal's number: 9 may be the kernel out of memory); finished "
                          "models are saved, rerun the same command to resume")

    def close(self):
        """End every worker: close the pipes (an idle worker then returns by itself),
        SIGTERM each one still running, and SIGKILL any still there after 5 s."""
        for pipe in self.pipes:
            pipe.close()
        for process in self.processes:
            if process.exitcode is None:
                process.terminate()
        deadline = time.time() + 5
        for process in self.processes:
            process.join(max(deadline - time.time(), 0))
            if process.exitcode is None:
                process.kill()
                process.join()


class RunWorkers:
    """The worker processes of a whole run: `count` of them, started when an experiment
    first trains two or more groups and kept for the experiments after it (each start
    costs every worker seconds of importing torch), with `slots` shared epoch counters;
    ended when the `with` block ends."""

    def __init__(self, count, slots):
        self.count, self.slots, self.pool, self.counters = count, slots, None, None

    def start(self, groups):
        """(Workers, epoch counters) for an experiment of `groups` groups, its counters
        at 0."""
        if groups > self.slots:
            raise ValueError(f"{groups} groups but {self.slots} progress counters")
        if self.pool is None:
            self.counters = _shared_counters(self.slots)
            self.pool = Workers(self.count, hyperparameters(), self.counters)
        self.counters[:groups] = [0] * groups
        return self.pool, self.counters

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.pool is not None:
            self.pool.close()


def _worker_main(pipe, settings, shared):
    """A worker process: runs the calls that come through `pipe` until it closes."""
    signal.signal(signal.SIGINT, _shrugged_off)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if hasattr(signal, "pthread_sigmask"):  # a Ctrl-C held since it started, shrugged off
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    torch.set_num_threads(1)
    apply_settings(settings)
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    while True:
        try:
            function, args = pickle.loads(pipe.recv_bytes())
        except (EOFError, OSError):
            # the parent has closed the pipe: EOFError, or ConnectionResetError when it
            # ended (a full disk, say) without reading a result this worker had sent
            signal.signal(signal.SIGTERM, _shrugged_off)  # nothing left to undo
            return
        try:
            reply = (True, function(*args) if shared is None else function(shared, *args))
        except (OSError, MemoryError) as e:  # the machine's failure: the parent says it in one line
            reply = (False, e)
        except Exception:
            import traceback
            reply = (False, "in a worker process:\n" + traceback.format_exc())
        try:
            pipe.send_bytes(pickle.dumps(reply))
        except OSError:
            # BrokenPipeError: the parent ended (a full disk, say) while this worker trained;
            # it has said why in one line, and this reply has no reader
            signal.signal(signal.SIGTERM, _shrugged_off)
            return


def _exit_on_sigterm(signum, frame):
    # once: a second SIGTERM (the parent's, after the group's) must not strike the way out
    signal.signal(signal.SIGTERM, _shrugged_off)
    sys.exit(128 + signum)  # an exception, so that `finally` blocks run on the way out


def _exit_with_parent(parent):
    """A worker ends when its parent does, however the parent ended (a SIGKILL or a
    cluster's time limit included), instead of training on for nobody."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _worker_fit(epochs_done, experiment, data, group, measure, index, snapshot_path):
    """In a worker process: train one group on the parent's data (a worker that loaded
    it itself would pay about 0.9 s importing mnist1d and scipy), writing the epoch it has
    reached into epochs_done[index]; the records and weights go back to the parent, which
    alone writes them and prints progress. The group's snapshots, only this process has."""
    on_epoch = functools.partial(epochs_done.__setitem__, index)
    return index, [(record, {k: v.cpu() for k, v in model.state_dict().items()})
                   for record, model in fit_group(experiment, group, data, measure, on_epoch,
                                                  *snapshot_files(snapshot_path))]


def _eta(elapsed, progressed, total):
    """Seconds left at the pace so far: `progressed` of `total` cost done in `elapsed`
    seconds (with workers, the partial epochs of groups in training count, so the pace
    includes every worker)."""
    return elapsed / progressed * max(total - progressed, 0) if progressed > 0 else None


def _left(experiment, seconds, run=None):
    """'exp1 ~5m left, run ~1h02m left': this experiment's time left and, in a command-line
    run (`run`: the plan's estimate of each experiment, and the seconds taken by those
    already finished), the run's, where each later experiment takes its estimate scaled by
    this run's pace so far (the seconds the finished experiments took over their
    estimates)."""
    if seconds is None:
        return ""
    text = f"{experiment} ~{_duration(seconds)} left"
    if run and run["estimates"]:
        later = [e for e in run["estimates"] if e not in run["taken"] and e != experiment]
        finished = [e for e in run["taken"] if e in run["estimates"]]
        estimated = sum(run["estimates"][e] for e in finished)
        pace = sum(run["taken"][e] for e in finished) / estimated if estimated else 1.0
        total = seconds + pace * sum(run["estimates"][e] for e in later)
        text += f", run ~{_duration(total)} left"
    return text


# ----------------------------------------------------------------------------------------
# 10. The study as a whole: its plan and time estimate, shards, collecting and merging.
# ----------------------------------------------------------------------------------------
RESULTS_NAME = "neural_collapse_cka_results"
LAYERS_NAME = "neural_collapse_layers"
WIDTH_EPOCH_NAME = "neural_collapse_width_epoch"
MODELS_NAME = "neural_collapse_cka_models"


# The study as a whole: every fused group of the chosen experiments, how long each should
# take here, and how to split them over shards (processes, GPUs or cluster jobs) that each
# train their own groups into one shared records folder, to be collected into one results
# file. A group is the unit of work: its models train together, so a shard always trains
# whole groups, and each group exactly as an unsharded run would.
def study_groups(experiments, device_type):
    """[(experiment name, group)] for every fused group of `experiments`, from the
    hyperparameters alone, as a run on `device_type` forms them."""
    return [(EXPERIMENTS[n].name, group) for n in experiments
            for group in fused_groups(EXPERIMENTS[n].setup()["specs"], device_type)]


def assign_shards(costs, count):
    """The shard (0..count-1) of each item of `costs`: longest first onto the least loaded
    shard, then, while it lowers the most loaded shard, moving one of its items to another
    shard or swapping one for a smaller one there. Every swap or move lowers the sum of
    squared loads, so it ends; ties go to the lower index, so every shard computes the
    same split from the same costs, without talking to the others."""
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads, shard = [0] * count, [0] * len(costs)
    for i in order:
        target = min(range(count), key=lambda k: (loads[k], k))
        shard[i] = target
        loads[target] += costs[i]

    def improve():
        top = max(range(count), key=lambda k: (loads[k], -k))
        for i in (i for i in order if shard[i] == top):
            for k in range(count):
                if k != top and loads[k] + costs[i] < loads[top]:
                    shard[i], loads[top], loads[k] = k, loads[top] - costs[i], loads[k] + costs[i]
                    return True
            for j in (j for j in order if shard[j] != top and costs[j] < costs[i]):
                k, delta = shard[j], costs[i] - costs[j]
                if loads[k] + delta < loads[top]:
                    shard[i], shard[j] = k, top
                    loads[top], loads[k] = loads[top] - delta, loads[k] + delta
                    return True
        return False

    while count > 1 and improve():
        pass
    return shard


def parse_shard(text):
    """'I/N' -> (I, N) with 0 <= I < N, else ValueError naming what is allowed."""
    index, sep, count = text.partition("/")
    try:
        index, count = int(index), int(count)
    except ValueError:
        index = count = None
    if not sep or index is None or not 0 <= index < count:
        raise ValueError(f"--shard {text!r} is not allowed; expected I/N with 0 <= I < N, "
                         "like 0/4 (shard 0 of 4)")
    return index, count


def _dataset_sizes():
    n_train, n_test = (shape[0] for key, shape in _expected_shapes(_mnist1d_args()).items()
                       if key in ("y", "y_test"))
    return min(n_train, TRAIN_SUBSET or n_train), n_test


PROBE_SAMPLES = 512  # the most inputs a probe trains on, whatever BATCH_SIZE is


def probe_step_seconds(group, device, steps=2):
    """Seconds per training step of `group` fused on `device`: four epochs of `steps` steps
    on random inputs (a step's time does not depend on the values), timing the last two
    from the end of one epoch to the end of another, so that one-off set-up, with
    CUDA_GRAPHS the capture, and the copies of the trained weights back into the models
    are left out. A batch larger than half of PROBE_SAMPLES is timed as one step of
    PROBE_SAMPLES inputs and scaled by its size (a step's arithmetic grows with its batch),
    so that a probe costs seconds and little memory whatever BATCH_SIZE is. Each epoch's
    own cost (its shuffle, its one host sync) is shared by its `steps` steps: a share
    that weighs on a GPU, where a step takes milliseconds (tools/gpu_check.py measures
    it against longer epochs)."""
    n = min(steps * BATCH_SIZE, steps * PROBE_SAMPLES // 2)
    fake = {"x_train": torch.randn(n, 40, device=device),
            "y_train": torch.randint(0, NUM_CLASSES, (n,), device=device)}
    models = [make_model(s["arch"], s["width"], 0, s.get("d")) for s in group]
    epoch_ends = []  # on a GPU each comes after the epoch's one host sync
    train_models(models, fake, [s["optimizer"] for s in group], 4, list(range(len(group))),
                 on_epoch=lambda epoch: epoch_ends.append(time.time()))
    steps_per_epoch = -(-n // BATCH_SIZE)
    step = (epoch_ends[3] - epoch_ends[1]) / (2 * steps_per_epoch)
    return step * BATCH_SIZE / min(BATCH_SIZE, n)


# A model's analysis beyond its forward passes (NC metrics, per-layer NC, spectra and their
# power-law fits): about this many times _IMPORT_SECONDS, which scales with the machine.
ANALYSIS_IMPORTS = 0.1


def estimate_group_seconds(groups, device):
    """Estimated seconds of each (experiment, group) on `device`, and the one-off seconds
    a process spends before its first step (first kernels, oneDNN's set-up): its training
    steps at the probed step time, plus its models' analysis (two passes over the training
    set and one over the test set, each input at a third of its share of a training step)
    and, for every checkpoint, a pass over both sets (Exp 1's learning curves need no
    more; what Exp 2's measure adds is left out, small beside its hours of training).
    Groups of the same models are probed once."""
    n_train, n_test = _dataset_sizes()
    steps = -(-n_train // BATCH_SIZE)
    probed, seconds, first_use = {}, [], 0.0
    threads = group_threads(device.type) or torch.get_num_threads()
    with torch_threads(threads):
        for _, group in groups:
            signature = tuple((s["arch"], s["width"]) for s in group)
            if signature not in probed:
                start = time.time()
                probed[signature] = probe_step_seconds(group, device)
                if len(probed) == 1:  # the first probe also pays the process's first use
                    first_use = max(time.time() - start - 8 * probed[signature], 0.0)
            step = probed[signature]
            forward = step / 3 / len(group) / BATCH_SIZE  # one input through one model
            fixed = ANALYSIS_IMPORTS * _IMPORT_SECONDS
            analysis = (2 * n_train + n_test) * forward + fixed
            checkpoint = (n_train + n_test) * forward
            seconds.append(group[0]["epochs"] * steps * step
                           + len(group) * (analysis + checkpoint
                                           * len(group[0].get("checkpoints", ()))))
    return seconds, first_use


def schedule_seconds(seconds, workers):
    """Wall time of jobs of `seconds` handed, in this order, to `workers` processes."""
    free = [0.0] * max(1, workers)
    for job in seconds:
        free[free.index(min(free))] += job
    return max(free)


def study_estimate(groups, seconds, device, first_use):
    """{experiment: estimated wall seconds}: each experiment's groups, longest first by
    cost as a run takes them, over this device's workers; the first experiment that needs
    worker processes pays their start-up (importing torch, then their first use of it),
    and the later ones share them (RunWorkers)."""
    workers = worker_count(device.type)
    walls, started = {}, False
    for experiment in dict.fromkeys(name for name, _ in groups):
        mine = sorted(((group_cost(g), t) for (name, g), t in zip(groups, seconds)
                       if name == experiment), key=lambda pair: -pair[0])
        pool = workers > 1 and sum(t > 0 for _, t in mine) > 1  # finished groups take 0 s
        walls[experiment] = (schedule_seconds([t for _, t in mine], workers)
                             + (_IMPORT_SECONDS + first_use if pool and not started else 0.0))
        started = started or pool
    return walls


# After the experiments: the figures (importing matplotlib, drawing two large figures) and
# the end of the process take about this many times _IMPORT_SECONDS.
FINISH_IMPORTS = 3.0


def _describe_group(group):
    widths = sorted({s["width"] for s in group})
    optimizers = "+".join(sorted({s["optimizer"] for s in group}))
    dims = sorted({s["d"] for s in group if s.get("d") is not None})
    # each replicate's models train in groups of their own: without it, two groups in
    # training print the same line
    replicates = sorted({s["replicate"] for s in group if _shows_replicate(s)})
    text = f"{group[0]['arch']} {optimizers} w={','.join(map(str, widths))}"
    text += f" d={','.join(map(str, dims))}" if dims else ""
    text += f" rep={','.join(map(str, replicates))}" if replicates else ""
    return text + f" ({len(group)} models)"


def _shows_replicate(spec):
    """Whether a model's log lines name its replicate: in a study of several, or past the
    first (Exp 4's models have seeds, not replicates)."""
    return spec.get("replicate", 0) > 0 or (REPLICATES > 1 and "replicate" in spec)


def plan_study(experiments, device, shard=None, detail=False, log=print, records_dir=None):
    """Print the plan of a run (or with `shard` = (I, N), of a sharded one): its groups and
    their estimated time on this device, measured by a probe of a few seconds, less what
    earlier runs left in `records_dir` (finished groups, snapshots). Returns {"groups",
    "owner" (each group's shard, or None), "seconds" (this process's estimated total),
    "experiments" (each experiment's estimated seconds)}."""
    groups = study_groups(experiments, device.type)
    rounding = rounding_context(device.type)
    done = [ModelRuns(name, None, records_dir, None, rounding).share_done(group)
            for name, group in groups]
    left = [i for i, share in enumerate(done) if share < 1]  # only these are probed
    probe_start = time.time()
    probed, first_use = estimate_group_seconds([groups[i] for i in left], device)
    probe = time.time() - probe_start
    seconds = [0.0] * len(groups)
    for i, t in zip(left, probed):
        seconds[i] = t * (1 - done[i])
    owner = (assign_shards([group_cost(g) for _, g in groups], shard[1])
             if shard else None)
    workers = worker_count(device.type)
    finish = FINISH_IMPORTS * _IMPORT_SECONDS
    walls = study_estimate(groups, seconds, device, first_use)
    total = sum(walls.values()) + finish
    models = sum(len(g) for _, g in groups)
    earlier = ""
    if any(done):
        finished = sum(len(g) for (_, g), share in zip(groups, done) if share == 1)
        started = sum(0 < share < 1 for share in done)
        earlier = (f"; {finished} models finished and {started} group"
                   f"{'s' if started != 1 else ''} part-trained by earlier runs, the rest")
    log(f"plan: {models} models in {len(groups)} groups on {device.type}, {workers} worker "
        f"process{'es' if workers > 1 else ''}{earlier or ';'} estimated {_duration(total)} "
        f"on this machine (probe {probe:.1f}s)")
    for experiment, wall in walls.items():
        mine = [g for name, g in groups if name == experiment]
        log(f"  {experiment}: {sum(map(len, mine))} models in {len(mine)} groups, "
            f"~{_duration(wall)}")
    longest = max(range(len(groups)), key=lambda i: seconds[i])
    log(f"  critical path (the longest group, which no split can shorten): "
        f"{groups[longest][0]} {_describe_group(groups[longest][1])}, "
        f"~{_duration(seconds[longest])}")
    if detail:
        for (name, group), t in zip(groups, seconds):
            log(f"  {name} {_describe_group(group):<44} cost {group_cost(group):.3g}  "
                f"~{_duration(t)}")
    plan = {"groups": groups, "owner": owner, "seconds": total, "experiments": walls}
    if not shard:
        return plan
    index, count = shard
    costs = [group_cost(g) for _, g in groups]
    ideal = sum(costs) / count
    shard_walls, shard_costs = [], []
    for k in range(count):
        mine = [(name, g) for (name, g), o in zip(groups, owner) if o == k]
        wall = sum(study_estimate(mine, [t for t, o in zip(seconds, owner) if o == k],
                                  device, first_use).values())
        shard_walls.append(wall)
        shard_costs.append(sum(c for c, o in zip(costs, owner) if o == k))
        if detail or k == index:
            log(f"  shard {k}/{count}: {sum(map(len, (g for _, g in mine)))} models in "
                f"{len(mine)} groups, cost {shard_costs[k] / ideal:.2f} x total/N, "
                f"~{_duration(wall)}" + (" (this one)" if k == index and not detail else ""))
    log(f"  largest shard: cost {max(shard_costs) / ideal:.2f} x total/N, "
        f"~{_duration(max(shard_walls))}")
    mine = [(name, g) for (name, g), o in zip(groups, owner) if o == index]
    return {**plan, "seconds": shard_walls[index],
            "experiments": study_estimate(mine, [t for t, o in zip(seconds, owner)
                                                 if o == index], device, first_use)}


def run_workers(experiments, device_type):
    """The worker processes that every experiment of a run shares (RunWorkers): as many as
    the most groups one experiment has, up to `worker_count`."""
    sizes = {}
    for name, _ in study_groups(experiments, device_type):
        sizes[name] = sizes.get(name, 0) + 1
    most = max(sizes.values(), default=1)
    return RunWorkers(min(worker_count(device_type), most), most)


def run_study(experiments, out_dir, device, preset, log=print, env=None, estimates=None,
              collect_from=None):
    """Run the chosen experiments with the current globals, then write the results JSON and
    the figure into `out_dir` (both atomically). Finished models are kept under
    out_dir/records, so rerunning after an interruption resumes. `estimates` (seconds per
    experiment, from `plan_study`) let progress lines give the time left in the run. With
    `collect_from` (a rounding context), every model is read from its record made under
    it, and nothing trains."""
    run = {"estimates": dict(estimates or {}), "taken": {}}
    records_dir = os.path.join(out_dir, "records")
    results = {"config": {"preset": preset, "experiments": experiments, **hyperparameters()},
               "env": {**environment(device), **(env or {})}}
    walls = results["env"]["wall_seconds"] = {}
    start = time.time()
    if collect_from is None:
        prepare_records(records_dir, [EXPERIMENTS[n].name for n in experiments])
        remove_stale_temporaries(out_dir)
    with run_workers(experiments, device.type) as workers:
        for number in experiments:
            t0 = time.time()
            experiment = EXPERIMENTS[number]
            results[experiment.name] = run_experiment(
                number, experiment.setup(), device.type, records_dir, log,
                rounding=collect_from, train=collect_from is None, run=run, workers=workers)
            walls[experiment.name] = run["taken"][experiment.name] = time.time() - t0
    walls["total"] = time.time() - start
    json_path = os.path.join(out_dir, RESULTS_NAME + ".json")
    save_json(json_path, publishable(results))
    table = write_model_table(experiments, records_dir,
                              collect_from or rounding_context(device.type),
                              os.path.join(out_dir, MODELS_NAME + ".csv"))
    figures = draw_figures(results, out_dir)
    log(f"wrote {json_path}, {os.path.basename(table)}, "
        f"{', '.join(map(os.path.basename, figures))} in {_duration(walls['total'])}")
    return results


NC_COLUMNS = ["nc1", "nc1_pinv", "cdnv", "nc2", "nc3", "nc4"]
MODEL_COLUMNS = (["experiment", "architecture", "optimizer", "width", "d", "replicate", "seed",
                  "parameters", "epochs", "epochs_run", "train_err", "test_err", "train_loss",
                  "test_loss"]
                 + [f"{name}_{split}" for split in ("train", "test") for name in NC_COLUMNS]
                 + [f"nc1_{layer}" for layer in LAYERS]
                 + ["alpha", "alpha_weighted", "seconds", "diverged"])


def model_row(experiment, record):
    """A trained model's line of the per-model table, from its record: NC metrics on the
    training set (noisy labels) and the test set, NC1 of every layer (training set)."""
    row = {"experiment": experiment, "architecture": record["arch"],
           "optimizer": record["optimizer"], "width": record["width"], "d": record.get("d"),
           "replicate": record.get("replicate", 0), "seed": record["seed"],
           "parameters": record["params"], "epochs": record["epochs"],
           "seconds": record["seconds"], "diverged": record["diverged"]}
    for name in ("epochs_run", "train_err", "test_err", "train_loss", "test_loss"):
        row[name] = record[name]
    for split in ("train", "test"):
        row.update({f"{name}_{split}": record[f"nc_{split}"].get(name) for name in NC_COLUMNS})
    row.update({f"nc1_{layer}": record["per_layer"][layer]["nc1"] for layer in LAYERS})
    row.update(alpha=record["esd"]["alpha"], alpha_weighted=record["esd"].get("alpha_weighted"))
    return row


def write_model_table(experiments, records_dir, rounding, path):
    """One CSV row per trained model of `experiments` (`MODEL_COLUMNS`), from the records
    this configuration left under `records_dir`; an empty cell is a value that is NaN or
    does not apply (d outside Exp 3). Returns `path`."""
    import csv
    import io
    text = io.StringIO()
    writer = csv.DictWriter(text, MODEL_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for number in experiments:
        runs = ModelRuns(f"exp{number}", None, records_dir, None, rounding)
        for record in runs.stored_records(EXPERIMENTS[number].setup()["specs"]):
            if record is not None:
                writer.writerow({key: "" if value is None else value
                                 for key, value in model_row(f"exp{number}", record).items()})
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))
    return path


def _shard_marker(records_dir, count, experiments):
    return os.path.join(records_dir, f"shards_{count}_exp{''.join(map(str, experiments))}.json")


def run_shard(experiments, out_dir, device, shard, log=print):
    """Train shard I of N: its share of the study's groups (`assign_shards`, from the
    hyperparameters alone), into out_dir/records; nothing else is written. Returns the
    number of models it trained or found finished."""
    index, count = shard
    records_dir = os.path.join(out_dir, "records")
    plan = plan_study(experiments, device, shard, log=log, records_dir=records_dir)
    groups, owner = plan["groups"], plan["owner"]
    run = {"estimates": plan["experiments"], "taken": {}}
    prepare_records(records_dir, [EXPERIMENTS[n].name for n in experiments])
    save_json(_shard_marker(records_dir, count, experiments),
              {"shards": count, "experiments": experiments})  # tells --collect who owns what
    mine = {}
    for (experiment, group), shard_index in zip(groups, owner):
        if shard_index == index:
            mine.setdefault(experiment, set()).add(_group_id(group))
    with run_workers(experiments, device.type) as workers:
        for number in experiments:
            experiment = EXPERIMENTS[number].name
            if experiment in mine:
                start = time.time()
                setup = EXPERIMENTS[number].setup()
                runs = ModelRuns(experiment, experiment_data(device), records_dir, log,
                                 run=run, workers=workers)
                runs.run_many(setup["specs"], setup["measure"],
                              select=lambda group: _group_id(group) in mine[experiment])
                run["taken"][experiment] = time.time() - start
    return sum(len(group) for (_, group), o in zip(groups, owner) if o == index)


def _group_id(group):
    return tuple(json.dumps(spec, sort_keys=True) for spec in group)


def _roundings_in(records_dir, experiments):
    """The distinct rounding contexts the model records of `experiments` under
    `records_dir` were made in, as their records say."""
    found = []
    for number in experiments:
        folder = os.path.join(records_dir, EXPERIMENTS[number].name)
        for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
            try:
                with open(os.path.join(folder, name)) as f:
                    rounding = json.load(f).get("rounding") if name.endswith(".json") else None
            except (OSError, ValueError, AttributeError):
                rounding = None
            if isinstance(rounding, dict) and rounding not in found:
                found.append(rounding)
    return found


def _describe_rounding(rounding):
    threads = rounding.get("threads")
    return rounding.get("device", "?") + (f", {threads} thread{'s' if threads != 1 else ''}"
                                          if threads else "") + "".join(
        f", {name}={value}" for name, value in rounding.items()
        if name not in ("device", "threads"))


def collect_study(experiments, out_dir, preset, log=print):
    """The results JSON and both figures from the records under out_dir/records alone (left
    by shards, or by any runs of this configuration), training nothing; the shards' device
    need not be this machine's: records are looked up under the rounding context they say
    they were made in. NotCollectable (one line) when a model has no readable record, or
    when the records come from two rounding contexts (two device types, say)."""
    records_dir = os.path.join(out_dir, "records")
    cpu_data = {"x_train": torch.empty(0)}
    found = []
    for rounding in _roundings_in(records_dir, experiments):  # those this study's records use
        for number in experiments:
            runs = ModelRuns(EXPERIMENTS[number].name, cpu_data, records_dir, None, rounding)
            if any(runs.stored_records(EXPERIMENTS[number].setup()["specs"])):
                found.append(rounding)
                break
    if len(found) > 1:
        raise NotCollectable(f"the records under {records_dir} come from {len(found)} "
                             "rounding contexts (" + "; ".join(map(_describe_rounding, found))
                             + "); one study's shards must all run on one device type with "
                             "the same threads per group")
    rounding = found[0] if found else rounding_context("cpu")
    device_type = rounding["device"]
    groups = study_groups(experiments, device_type)
    missing = []
    for i, (experiment, group) in enumerate(groups):
        runs = ModelRuns(experiment, cpu_data, records_dir, None, rounding)
        if any(runs.load(spec, group) is None for spec in group):
            missing.append(i)
    if missing:
        count = sum(len(groups[i][1]) for i in missing)
        total = sum(len(group) for _, group in groups)
        owners = []
        for name in sorted(os.listdir(records_dir)) if os.path.isdir(records_dir) else []:
            shards = name[len("shards_"):].split("_")[0] if name.startswith("shards_") else ""
            if shards.isdigit() and name == os.path.basename(
                    _shard_marker(records_dir, int(shards), experiments)):
                owner = assign_shards([group_cost(g) for _, g in groups], int(shards))
                owned = sorted({owner[i] for i in missing})
                owners.append(f"shard{'s' if len(owned) > 1 else ''} "
                              f"{', '.join(map(str, owned))} of {shards}")
        where = (f"they belong to {' / '.join(owners)}: run "
                 f"{'it' if len(owners) == 1 and ',' not in owners[0] else 'them'} "
                 "(a rerun resumes), then collect again" if owners
                 else f"no shard of these experiments has run into {out_dir}")
        raise NotCollectable(f"cannot collect: {count} of {total} models have no readable "
                             f"record under {records_dir}; {where}")
    return run_study(experiments, out_dir, torch.device("cpu"), preset, log,
                     env={"device": device_type, "collected_from_records": True},
                     collect_from=rounding)


def draw_figures(results, out_dir):
    """The three figures of `results` into `out_dir`; returns their paths. Results that
    one of them cannot be drawn from (a results file edited by hand) are a ValueError
    naming it."""
    paths = [os.path.join(out_dir, name + ".png")
             for name in (RESULTS_NAME, LAYERS_NAME, WIDTH_EPOCH_NAME)]
    for plot, path in zip((plot_results, plot_layers, plot_width_epoch), paths):
        try:
            plot(results, path)
        except (KeyError, TypeError, AttributeError, IndexError, ValueError) as e:
            raise ValueError(f"cannot draw {os.path.basename(path)} from these results "
                             f"({_first_line(e)})") from None
    return paths


def merge_results(parts):
    """One results dict from [(name, results), ...] of runs that each ran some of the
    study's experiments: a study run in parts, each on its own machine or from its own
    commit. Each experiment comes from one part, and the parts must agree on every
    setting of the study; they may differ in run settings (RUN_SETTINGS), which change at
    most rounding, as the device does. "parts" keeps each one's experiments, config and
    env."""
    merged = {"config": {}, "env": {"wall_seconds": {}}, "parts": []}
    source = {}
    for name, results in parts:
        experiments = [e.name for e in EXPERIMENTS.values() if results.get(e.name)]
        for key in experiments:
            if key in source:
                raise ValueError(f"{key} is in both {source[key]} and {name}; each "
                                 "experiment must come from one file")
            source[key] = name
            merged[key] = results[key]
        config = results["config"]
        for setting, value in config.items():
            known = merged["config"].get(setting, value)
            if setting not in {*RUN_SETTINGS, "experiments"} and known != value:
                raise ValueError(f"{name} has {setting}={value!r} but an earlier file has "
                                 f"{known!r}: they are not parts of one study")
            merged["config"].setdefault(setting, value)
        env = results.get("env", {})
        for setting, value in env.items():
            if setting not in ("wall_seconds", "collected_from_records"):
                merged["env"].setdefault(setting, value)
        if not env.get("collected_from_records"):  # a collect's wall time is not training's
            merged["env"]["wall_seconds"].update(env.get("wall_seconds", {}))
        merged["parts"].append({"file": name, "experiments": experiments,
                                "config": config, "env": env})
    merged["config"]["experiments"] = sorted(int(key[3:]) for key in source)
    merged["env"]["wall_seconds"].pop("total", None)
    return merged


def merge_model_tables(paths, parts, out_dir):
    """The per-model tables beside the results files `paths` (`write_model_table`), their
    rows of the experiments each part supplies (`merge_results`' "parts"), as one table
    in `out_dir`; [its path], or [] when a part has no table. Columns an older part lacks
    are left empty."""
    import csv
    import io
    tables = [os.path.join(os.path.dirname(os.path.abspath(p)), MODELS_NAME + ".csv")
              for p in paths]
    if not all(os.path.exists(t) for t in tables):
        return []
    text = io.StringIO()
    writer = csv.DictWriter(text, MODEL_COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    for table, part in zip(tables, parts):
        with open(table, newline="") as f:
            writer.writerows(row for row in csv.DictReader(f)
                             if row.get("experiment") in part["experiments"])
    path = os.path.join(out_dir, MODELS_NAME + ".csv")
    write_atomic(path, lambda f: f.write(text.getvalue().encode()))
    return [path]


def load_results(path):
    """A results JSON written by this script, or ValueError saying what is wrong with it."""
    try:
        with open(path) as f:
            results = json.load(f)
    except OSError as e:
        raise ValueError(f"cannot read results file {path!r}: {e.strerror}")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"results file {path!r} is not valid JSON ({e})")
    if not isinstance(results, dict) or not isinstance(results.get("config"), dict):
        raise ValueError(f"{path!r} is not a results file of this script (no 'config' entry)")
    for experiment in EXPERIMENTS.values():
        problem = _shape_problem(experiment, results.get(experiment.name))
        if problem:
            raise ValueError(f"results file {path!r}: {experiment.name} {problem}")
    return results


def _shape_problem(experiment, value):
    """Why `value` cannot be `experiment`'s results as this script writes them, or None (an
    experiment not run is None). Its panels are drawn on a figure that is then thrown
    away and its headline numbers read: what they read is what a results file must hold."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"is a JSON {type(value).__name__}, not an object of results"
    fig, axes = _figure(1, experiment.panels, (4 * experiment.panels, 3))
    import matplotlib.pyplot as plt
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            experiment.plot(list(np.atleast_1d(axes)), value)
            headline_numbers({experiment.name: value})  # what --compare reads
    except Exception as e:
        return f"is not in the shape this script writes ({_first_line(e)})"
    finally:
        plt.close(fig)
    return None

# ----------------------------------------------------------------------------------------
# Did a run reproduce the study? `--compare` sets a results file's headline numbers beside
# those of each seed of a reference run of the same preset.
# ----------------------------------------------------------------------------------------
REFERENCES = {"full": os.path.join("docs", "full", RESULTS_NAME + ".json"),
              "quick": os.path.join("docs", "quick_results.json")}  # in the repository
# A headline number reproduces the reference when it lies near the mean of the
# reference's seeds: within COMPARE_SPREAD times their range, or COMPARE_POOLED times the
# standard deviation of one seed pooled over every number of its experiment and kind (two
# or three seeds can agree by chance on one number; over dozens they cannot), or its
# kind's floor, whichever is widest. Another seed of the same code then passes, as the
# tests check for every seed held out of the others. The floors are what one seed of
# `quick` against the other needs (measured: test errors 0.03-0.04 apart at one width,
# peaks one or two widths apart, Exp 2's peak epochs a factor of 3.1 apart and its late
# fluctuations 1.5 and 1.7): 0.05 for a test error or a CKA value, and for quantities that
# vary by factors, compared as log10, a factor of 2 for a width, 4 for an epoch, 1.5 for
# an NC metric and 2 for a fluctuation ("change").
COMPARE_SPREAD = 2.0
COMPARE_POOLED = 4.0
COMPARE_FLOORS = {"error": 0.05, "cka": 0.05, "width": np.log10(2.0), "epoch": np.log10(4.0),
                  "nc": np.log10(1.5), "change": np.log10(2.0)}
_LOG_KINDS = {"width", "epoch", "nc", "change"}
MEMORISED = 0.01  # training error at or below this: the noisy labels are fitted


def largest_rise(values):
    """(i, j), i < j, with the largest values[j] - values[i] (NaN skipped), or None when the
    values never rise: the model-wise and epoch-wise bump."""
    best, lowest = None, None
    for j, v in enumerate(values):
        if not np.isfinite(v):
            continue
        if lowest is not None and v > values[lowest] and (
                best is None or v - values[lowest] > values[best[1]] - values[best[0]]):
            best = (lowest, j)
        if lowest is None or v < values[lowest]:
            lowest = j
    return best


def running_median3(values):
    """Each value the median of itself and its two neighbours (the ends kept): Exp 2's
    test error without its single-checkpoint spikes."""
    if len(values) < 3:
        return list(values)
    return [values[0], *(float(np.median(values[i - 1:i + 2]))
                         for i in range(1, len(values) - 1)), values[-1]]


def memorised_epoch(epochs, train_err):
    """The first epoch whose training error is at or below MEMORISED, or None: when Exp 2's
    model has fitted the noisy labels."""
    return next((e for e, t in zip(epochs, train_err) if t is not None and t <= MEMORISED),
                None)


def late_fluctuation(test_err):
    """The median absolute change of test error between neighbouring checkpoints over the
    second half of them: how much Exp 2's test error still moves once training settles."""
    late = _floats(test_err[len(test_err) // 2:])
    return float(np.nanmedian(np.abs(np.diff(late))))


def _floats(values):
    return [float("nan") if v is None else float(v) for v in values]


def _per_seed(replicates):
    """A list over points of lists over seeds -> a list over seeds of lists over points."""
    return [_floats(curve) for curve in zip(*replicates)]


def _seed_values(series, name):
    """A list over points of lists over seeds of `name`; results written before replicates
    were kept hold one seed's values only."""
    values = _replicates_of(series, name)
    return [[value] for value in series[name]] if values is None else values


def headline_numbers(results):
    """{(experiment, name): (kind, [its value in each seed])} of the numbers a reproduction
    is judged by: Exp 1's peak (the largest rise of test error over width: the width and
    test error where it ends, the lowest test error before it) and its test error at the
    widest width, per configuration; Exp 2's first minimum and peak of its smoothed test
    error (epoch and value), its last test error, the epoch it fits the noisy labels
    (`memorised_epoch`) and its `late_fluctuation`, per width; Exp 3's NC2 at every d;
    Exp 4's cross-architecture CKA of each layer with itself, its cross-seed CKA (mean of
    the seed pairs) and its drift at the last epoch, per layer (one value: its seeds are
    the point of 4C). Kinds: those of COMPARE_FLOORS."""
    out = {}
    for name, series in (results.get("exp1") or {}).items():
        widths = series["width"]
        for seed, curve in enumerate(_per_seed(_seed_values(series, "test_err"))):
            rise = largest_rise(curve)
            i, j = rise if rise else (None, None)
            values = {"peak width": ("width", widths[j] if rise else float("nan")),
                      "peak test error": ("error", curve[j] if rise else float("nan")),
                      "lowest test error before the peak": (
                          "error", curve[i] if rise else float("nan")),
                      f"test error at w = {widths[-1]}": ("error", curve[-1])}
            for what, (kind, value) in values.items():
                out.setdefault(("exp1", f"{name} {what}"), (kind, []))[1].append(value)
    for name, series in (results.get("exp2") or {}).items():
        epochs = series["epoch"]
        for curve, train_err in zip(_per_seed(_seed_values(series, "test_err")),
                                    _per_seed(_seed_values(series, "train_err"))):
            smooth = running_median3(curve)
            rise = largest_rise(smooth)
            i, j = rise if rise else (None, None)
            nan = float("nan")
            memorised = memorised_epoch(epochs, train_err)
            values = {"first minimum epoch": ("epoch", epochs[i] if rise else nan),
                      "first minimum test error": ("error", smooth[i] if rise else nan),
                      "peak epoch": ("epoch", epochs[j] if rise else nan),
                      "peak test error": ("error", smooth[j] if rise else nan),
                      f"test error at epoch {epochs[-1]}": ("error", curve[-1]),
                      f"first epoch with training error <= {MEMORISED}": (
                          "epoch", nan if memorised is None else memorised),
                      "median change of test error between checkpoints, second half": (
                          "change", late_fluctuation(curve))}
            for what, (kind, value) in values.items():
                out.setdefault(("exp2", f"w = {series['width']} {what}"), (kind, []))[1].append(
                    value)
    exp3 = results.get("exp3")
    if exp3:
        for d, seeds in zip(exp3["d"], _seed_values(exp3, "nc2")):
            out[("exp3", f"NC2 at d = {d}")] = ("nc", _floats(seeds))
    exp4 = results.get("exp4")
    if exp4:
        for i, layer in enumerate(exp4["layers"]):
            out[("exp4", f"4A CKA {layer}-{layer}")] = ("cka", _floats([exp4["cross_arch"][i][i]]))
            out[("exp4", f"4B drift {layer} at the end")] = ("cka", _floats(
                [exp4["drift"][layer][-1]]))
            out[("exp4", f"4C cross-seed CKA {layer}")] = ("cka", [float(np.nanmean(
                _floats(exp4["cross_seed"][layer])))])
    return out


def _scale(kind, value):
    """The value as compared: log10 for the kinds that vary by factors (NaN if not > 0)."""
    if kind not in _LOG_KINDS:
        return value
    return float(np.log10(value)) if value > 0 else float("nan")


def compare_numbers(numbers, reference):
    """[(experiment, name, in?, line)] for every headline number of `numbers` that
    `reference` holds too (both as `headline_numbers` gives them): the run's value (its
    seeds' mean) against the reference seeds' mean, range and the band it must lie in."""
    scaled = {key: (kind, [v for v in (_scale(kind, x) for x in values) if np.isfinite(v)])
              for key, (kind, values) in reference.items()}
    variances = {}
    for (experiment, _), (kind, values) in scaled.items():
        if len(values) > 1:
            variances.setdefault((experiment, kind), []).append(np.var(values, ddof=1))
    pooled = {group: float(np.sqrt(np.mean(v))) for group, v in variances.items()}
    rows = []
    for key, (kind, values) in numbers.items():
        if key not in reference:
            continue
        ref = [v for v in (_scale(kind, x) for x in reference[key][1]) if np.isfinite(v)]
        own = [v for v in (_scale(kind, x) for x in values) if np.isfinite(v)]
        # a value some reference seeds lack (no peak at all, say): lacking it is in too
        lacking_is_in = len(ref) < len(reference[key][1])
        show = (lambda v: f"{10 ** v:.3g}") if kind in _LOG_KINDS else (lambda v: f"{v:.3f}")
        if not ref:
            ok = not own
            line = f"reference none (no such value), yours {show(np.mean(own)) if own else 'none'}"
        else:
            centre, spread = float(np.mean(ref)), max(ref) - min(ref)
            # (plus a hair: a width twice the reference's must pass despite log10's rounding)
            tolerance = max(COMPARE_FLOORS[kind], COMPARE_SPREAD * spread,
                            COMPARE_POOLED * pooled.get((key[0], kind), 0.0)) + 1e-9
            mine = float(np.mean(own)) if own else float("nan")
            ok = abs(mine - centre) <= tolerance if own else lacking_is_in
            seeds = (f" ({show(min(ref))}-{show(max(ref))} over {len(ref)} seeds)"
                     if len(ref) > 1 else " (1 seed)")
            if lacking_is_in:
                seeds += f", none in {len(reference[key][1]) - len(ref)} more"
            line = (f"reference {show(centre)}{seeds}, yours "
                    f"{show(mine) if own else 'none'}, allowed {show(centre - tolerance)}-"
                    f"{show(centre + tolerance)}")
        rows.append((key[0], key[1], ok, line))
    return rows


def compare_results(path, reference_path=None, log=print):
    """--compare: each headline number of the results file `path` against the reference
    of its preset (`REFERENCES`, or `reference_path`), one line each. Returns the exit
    code: 0 when all are in, 1 when any is out; ValueError (exit 2) when the two cannot be
    compared: not results files, another preset or other study settings, or experiments
    the reference lacks."""
    results = load_results(path)
    preset = results["config"].get("preset")
    if reference_path is None:
        if preset not in REFERENCES:
            raise ValueError(f"{path!r} is a {preset!r} run, and only {', '.join(REFERENCES)} "
                             "have a committed reference: give one with --reference FILE")
        reference_path = os.path.join(REPOSITORY, REFERENCES[preset])
    reference = load_results(reference_path)
    if reference["config"].get("preset") != preset:
        raise ValueError(f"{path!r} is a {preset!r} run but the reference "
                         f"{portable_path(reference_path)!r} is "
                         f"{reference['config'].get('preset')!r}: compare runs of one preset")
    ignored = {*RUN_SETTINGS, "experiments", "REPLICATES"}
    differ = [name for name, value in results["config"].items()
              if name not in ignored and name in reference["config"]
              and reference["config"][name] != value]
    if differ:
        raise ValueError(f"{path!r} differs from the reference in {', '.join(differ)}: the "
                         "numbers of another study cannot be compared")
    mine = [e.name for e in EXPERIMENTS.values() if results.get(e.name)]
    lacking = [name for name in mine if not reference.get(name)]
    if not mine or lacking:
        raise ValueError(f"{path!r} has " + (f"{', '.join(lacking)}, which the reference "
                                             f"{portable_path(reference_path)!r} lacks"
                                             if lacking else "no experiment's results"))
    rows = compare_numbers(headline_numbers(results), headline_numbers(reference))
    for experiment, name, ok, line in rows:
        log(f"{'in ' if ok else 'OUT'} {experiment} {name}: {line}")
    out = sorted({experiment for experiment, _, ok, _ in rows if not ok})
    # a run of some experiments is compared on those; the summary says which were not
    unrun = [e.name for e in EXPERIMENTS.values()
             if reference.get(e.name) and e.name not in mine]
    log(f"{len(rows) - sum(not ok for *_, ok, _ in rows)} of {len(rows)} headline numbers "
        f"within the reference's spread ({portable_path(reference_path)})"
        + (f"; out: {', '.join(out)}" if out else "")
        + (f"; not in yours, so not compared: {', '.join(unrun)}" if unrun else ""))
    return 1 if out else 0


# ----------------------------------------------------------------------------------------
# 11. Command line
# ----------------------------------------------------------------------------------------
# Integers that must be >= 1 (every other number must be >= 0).
_AT_LEAST_ONE = {"BATCH_SIZE", "EPOCH_WISE_POINTS", "GEN_NC_WIDTH", "CKA_SMALL_WIDTH",
                 "CKA_LARGE_WIDTH", "CKA_WIDTH", "CKA_SUBSET", "FIGURE_DPI", "TRAIN_SUBSET",
                 "WIDTHS", "DIMS", "CKA_DRIFT_EPOCHS", "EPOCH_WISE_WIDTHS", "REPLICATES",
                 "CPU_GROUP_WIDTH"}
# String globals and the values they may take.
_CHOICES = {"CKA_ESTIMATOR": list(CKA_ESTIMATORS), "CKA_CONV": CKA_CONV_MODES}
# Upper bounds, so that a slip of the keyboard fails here, in one line, and not an hour
# (or 300 GB) into a run: epochs at most a million (the study's longest run is 15000),
# widths and d at most 1024 (the widest model is 64), counts of points, replicates and
# workers at most 10000, 100 and 1024. Bounds that depend on the data (TRAIN_SUBSET,
# BATCH_SIZE, CKA_SUBSET) and on other settings (CKA_DRIFT_EPOCHS) are `check_study`'s.
MAX_EPOCHS, MAX_WIDTH = 1_000_000, 1024
_AT_MOST = {"WIDTHS": MAX_WIDTH, "EPOCH_WISE_WIDTHS": MAX_WIDTH, "GEN_NC_WIDTH": MAX_WIDTH,
            "CKA_SMALL_WIDTH": MAX_WIDTH, "CKA_LARGE_WIDTH": MAX_WIDTH,
            "CKA_WIDTH": MAX_WIDTH, "DIMS": MAX_WIDTH, "CKA_DRIFT_EPOCHS": MAX_EPOCHS,
            "MODEL_WISE_POINTS": 10_000, "EPOCH_WISE_POINTS": 10_000, "REPLICATES": 100,
            "WORKERS": 1024, "CPU_GROUP_WIDTH": 1_000_000, "FIGURE_DPI": 1200,
            "SEED": 2**63 - 1, "CKA_SEEDS": 2**63 - 1}


def hyperparameters():
    """The current value of every hyperparameter global (what the results file records)."""
    return {name: globals()[name] for name in _HYPERPARAMETER_NAMES}


def check_setting(name, value):
    """`value` if it is allowed for the global `name` (same type as its default, in range),
    else ValueError naming what is allowed."""
    if name not in _HYPERPARAMETER_NAMES:
        raise ValueError(f"unknown hyperparameter {name!r}; allowed: "
                         + ", ".join(_HYPERPARAMETER_NAMES))
    default = _DEFAULTS[name]
    low = 1 if name in _AT_LEAST_ONE or name.startswith("EPOCHS_") else 0
    high = MAX_EPOCHS if name.startswith("EPOCHS_") else _AT_MOST.get(name)
    # integers with no bound of their own (TRAIN_SUBSET, BATCH_SIZE, CKA_SUBSET) are
    # bounded by the data in `check_study`; this keeps them within numpy's integers
    high = 2**63 - 1 if high is None else high

    def is_int(v):
        return isinstance(v, int) and not isinstance(v, bool)

    def fail(allowed):
        raise ValueError(f"{name}={value!r} is not allowed; expected {allowed}")

    if isinstance(default, bool):
        if not isinstance(value, bool):
            fail("True or False")
    elif default is None or is_int(default):
        if not (is_int(value) and low <= value <= high) and not (default is None
                                                                 and value is None):
            fail(f"an integer in {low}..{high}" + (" or None" if default is None else ""))
    elif isinstance(default, float):
        if not (is_int(value) or isinstance(value, float)) or not np.isfinite(value) or value < 0:
            fail("a finite number >= 0")
        if name.endswith("_LR") and value <= 0:
            fail("a learning rate > 0")
        if name == "PROGRESS_SECONDS" and value <= 0:
            fail("a number of seconds > 0")
        if name == "LABEL_NOISE" and value >= 1:
            fail("a fraction in [0, 1)")
        value = float(value)
    elif isinstance(default, list):
        if not isinstance(value, list) or not value or not all(
                is_int(v) and low <= v <= high for v in value):
            fail(f"a non-empty list of integers in {low}..{high}, like {default}")
    elif isinstance(default, dict):
        if not isinstance(value, dict) or not value or not all(
                isinstance(k, str) and is_int(v) and 1 <= v <= high for k, v in value.items()):
            fail(f"a non-empty dict of name: width in 1..{high}, like {default}")
    elif name in _CHOICES and value not in _CHOICES[name]:
        fail("one of " + ", ".join(_CHOICES[name]))
    elif isinstance(default, str) and not isinstance(value, str):
        fail("a string")
    return value


def check_study(values):
    """The checks across settings and against the data, on `values` (every hyperparameter
    by name): TRAIN_SUBSET within MNIST-1D's training set, BATCH_SIZE and CKA_SUBSET within
    the training samples the run uses, CKA_DRIFT_EPOCHS within the CKA run. ValueError
    naming what is allowed."""
    n_train = _expected_shapes(_mnist1d_args())["y"][0]
    subset = values["TRAIN_SUBSET"]
    if subset is not None and subset > n_train:
        raise ValueError(f"TRAIN_SUBSET={subset} is more than the {n_train} training samples "
                         f"MNIST-1D has; allowed: 1..{n_train}, or None for all of them")
    used = subset or n_train
    for name in ("BATCH_SIZE", "CKA_SUBSET"):
        if values[name] > used:
            raise ValueError(f"{name}={values[name]} is more than the {used} training "
                             f"samples the run uses; allowed: 1..{used}")
    beyond = [e for e in values["CKA_DRIFT_EPOCHS"] if e > values["EPOCHS_CKA"]]
    if beyond:
        raise ValueError(f"CKA_DRIFT_EPOCHS has epochs after the CKA run's last, "
                         f"EPOCHS_CKA={values['EPOCHS_CKA']}: {beyond}; allowed: epochs in "
                         f"1..{values['EPOCHS_CKA']}")


# Folders of the operating system, which neither the data cache nor results may be
# written into (as root a run could): these and everything under them, and the roots below.
SYSTEM_FOLDERS = ["/bin", "/boot", "/dev", "/etc", "/lib", "/lib64", "/proc", "/sbin", "/sys",
                  "/usr"]
SYSTEM_ROOTS = ["/", "/var", "/run"]


def is_system_folder(path):
    real = os.path.realpath(path)
    return real in SYSTEM_ROOTS or any(real == f or real.startswith(f + "/")
                                       for f in SYSTEM_FOLDERS)


def check_data_dir(path):
    """Can `path` hold the data cache? Not a system folder, and writable (created if
    missing) unless it already holds the cache: `prove_writable`'s errors otherwise."""
    if is_system_folder(path):
        raise ValueError(f"DATA_DIR={path!r} is a folder of the operating system; give a "
                         "folder of your own for the data cache")
    with contextlib.suppress(OSError):
        if any(n.startswith("mnist1d_") and n.endswith(".npz") for n in os.listdir(path)):
            return
    prove_writable(path, f"DATA_DIR={path!r}", "; the data cache is written there")


# A folder the machine will not let a run write (its permissions, a read-only or full
# file system) is the machine's failure, not a wrong path: EXIT_MACHINE, not EXIT_BAD_INPUT.
MACHINE_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def prove_writable(path, name, why=""):
    """Create the folder `path` if needed and write a file in it. A path that cannot be a
    folder (a file in the way, a name too long) is a ValueError naming it as `name`; a
    folder the machine will not let us write, an OSError naming the folder."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        if e.errno in MACHINE_ERRNOS:
            raise OSError(e.errno, e.strerror, path) from None
        raise ValueError(f"{name} is not a writable folder ({e.strerror}){why}") from None


def parse_setting(text):
    """'NAME=VALUE' -> (NAME, value), VALUE read as a Python literal (a bare word is a string)."""
    name, sep, raw = text.partition("=")
    name = name.strip()
    if not sep or not name:
        raise ValueError(f"--set expects NAME=VALUE, got {text!r}")
    try:
        value = ast.literal_eval(raw.strip())
    except (ValueError, SyntaxError):
        value = raw.strip()  # a bare word: only a string global accepts it
    return name, check_setting(name, value)


def apply_settings(settings):
    # globals() rather than sys.modules[__name__]: in a spawned worker of a script run as
    # __main__, the two are different namespaces, and the functions read globals().
    for name, value in settings.items():
        globals()[name] = check_setting(name, value)


def environment(device):
    matplotlib, mnist1d = _library("matplotlib"), _library("mnist1d")
    info = {"python": platform.python_version(), "torch": torch.__version__,
            "numpy": np.__version__, "matplotlib": matplotlib.__version__,
            "mnist1d": getattr(mnist1d, "__version__", _package_version("mnist1d")),
            "platform": platform.platform(), "device": device.type,
            "torch_threads": torch.get_num_threads(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    info["device_name"] = (torch.cuda.get_device_name(device) if device.type == "cuda"
                           else cpu_name())
    return {**info, "provenance": provenance(device.type)}


def _package_version(name):
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line and exit code 2, never a usage dump
        self.exit(2, f"{self.prog}: error: {message}\n")


def build_parser():
    p = _Parser(prog="neural_collapse_cka.py",
                description="Double descent, neural collapse (NC1-NC4) and layer-wise CKA on "
                            "MNIST-1D with 20%% label noise. Writes %s.png and .json into "
                            "--out." % RESULTS_NAME)
    p.add_argument("--preset", default="full", choices=list(PRESETS),
                   help="full: the paper-scale study (a GPU box); quick: the whole figure in "
                        "minutes on a CPU; smoke: every code path in seconds (default: full)")
    every = ",".join(map(str, EXPERIMENTS))
    p.add_argument("--experiments", default=every,
                   help="comma-separated subset of " + ", ".join(
                       f"{n} ({e.title})" for n, e in EXPERIMENTS.items())
                   + f" (default: {every})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: CUDA when available, else CPU (default: auto)")
    p.add_argument("--out", default="results",
                   help="output folder for the figure, the JSON and the per-model records "
                        "that make a rerun resume (default: results)")
    p.add_argument("--seed", type=int, default=None,
                   help="root seed SEED for label noise, initialisation and data order "
                        "(default: 42)")
    p.add_argument("--plot-only", metavar="FILE", nargs="+",
                   help="redraw the figures from a results JSON, without training; written "
                        "into --out if given, else beside FILE. Several files, each with "
                        "other experiments of one study (run in parts), are merged into "
                        "one results JSON in --out, then drawn")
    p.add_argument("--set", action="append", default=[], metavar="NAME=VALUE",
                   help="override a hyperparameter global, type-checked against its default, "
                        "e.g. --set EPOCHS_MODEL_WISE=500 --set \"WIDTHS=[2,8,32]\"; "
                        "applied after the preset")
    p.add_argument("--shard", metavar="I/N",
                   help="train only shard I of N (0 <= I < N) of the study's groups into "
                        "--out/records, for N processes, GPUs or cluster jobs sharing one "
                        "--out; then run the same command with --collect instead")
    p.add_argument("--collect", action="store_true",
                   help="write the results JSON and figures from the records under --out "
                        "alone, training nothing (after all shards have finished)")
    p.add_argument("--compare", metavar="FILE",
                   help="does the results file FILE reproduce the study? Each headline "
                        "number beside the committed reference of its preset (docs/), in "
                        "or out of the reference seeds' spread; exit 0 when all are in, 1 "
                        "when any is out")
    p.add_argument("--reference", metavar="FILE",
                   help="with --compare: the results file to compare with, instead of the "
                        "committed one")
    p.add_argument("--plan", action="store_true",
                   help="print every group, its estimated time on this machine and, with "
                        "--shard I/N, every shard's share; train and write nothing")
    p.epilog = (f"Exit codes: 0 done; {EXIT_BAD_INPUT} bad input (a value, flag or file), "
                f"nothing done; {EXIT_MACHINE} the machine failed the run (full disk, "
                "missing permission, out of memory): what was saved stays, and the same "
                "command resumes once that is fixed; 1 an error in the code (a traceback); "
                "130 / 143 stopped by Ctrl-C / SIGTERM, finished models saved.")
    return p


def _parse_experiments(text):
    try:
        numbers = sorted({int(part) for part in text.split(",") if part.strip()})
    except ValueError:
        numbers = []
    if not numbers or any(n not in EXPERIMENTS for n in numbers):
        raise ValueError(f"--experiments {text!r} is not allowed; expected a comma-separated "
                         f"subset of {','.join(map(str, EXPERIMENTS))}")
    return numbers


def _writable_dir(path):
    """`prove_writable` for --out, after refusing a folder of the operating system."""
    if is_system_folder(path):
        raise ValueError(f"--out {path!r} is a folder of the operating system; give a folder "
                         "of your own for the results")
    prove_writable(path, f"--out {path!r}")


def _one_line_warning(message, category, filename, lineno, line=None):
    return f"warning: {message}\n"


def _check_modes(args):
    """The flags that choose what a run does, and which of them go together."""
    if args.reference and not args.compare:
        raise ValueError("--reference names what --compare compares with; give --compare")
    if args.compare and (args.plot_only or args.shard or args.collect or args.plan):
        raise ValueError("--compare only reads two results files; it cannot be combined "
                         "with --plot-only, --shard, --collect or --plan")
    if args.plot_only and (args.shard or args.collect or args.plan):
        raise ValueError("--plot-only only redraws a results file; it cannot be combined "
                         "with --shard, --collect or --plan")
    if args.collect and (args.shard or args.plan):
        raise ValueError("--collect gathers the records of every shard; it cannot be "
                         "combined with --shard or --plan")
    return parse_shard(args.shard) if args.shard else None


def _command_without(argv, flag, takes_value):
    """The command line of this run without `flag` (and its value), for the hint a shard
    prints about collecting."""
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == flag:
            skip = takes_value
        elif not word.startswith(flag + "="):
            words.append(word)
    return " ".join(shlex.quote(w) for w in ["python", os.path.basename(__file__)] + words)


def _plot_only(paths, out_dir):
    """--plot-only: draw one results file, or merge several (`merge_results`) into one
    results JSON in `out_dir`, then draw it."""
    if len(paths) == 1:
        results = load_results(paths[0])
        out_dir = out_dir or os.path.dirname(os.path.abspath(paths[0]))
        _writable_dir(out_dir)
        written = draw_figures(results, out_dir)
    else:
        if out_dir is None:
            raise ValueError("--plot-only with several files merges them: give --out, the "
                             "folder for the merged results")
        merged_path = os.path.join(out_dir, RESULTS_NAME + ".json")
        if any(os.path.abspath(p) == os.path.abspath(merged_path) for p in paths):
            raise ValueError(f"--out {out_dir!r} would overwrite {merged_path!r}, one of the "
                             "files to merge: choose another folder")
        results = merge_results([(p, load_results(p)) for p in paths])
        _writable_dir(out_dir)
        save_json(merged_path, publishable(results))
        written = [merged_path, *merge_model_tables(paths, results["parts"], out_dir),
                   *draw_figures(results, out_dir)]
    say("wrote " + ", ".join(written))
    return 0


EXIT_BAD_INPUT = 2     # a value, flag or file the script cannot use: nothing was done
EXIT_MACHINE = 3       # the machine failed the run (a full disk, a missing permission, out
                       # of memory): what was saved stays, and once it is fixed the same
                       # command resumes
EXIT_OUTPUT_CLOSED = 141  # the reader of stdout went away (`| head`), as a shell reports
                          # a program its SIGPIPE ended: 128 + 13


def machine_failure(error, folder=None):
    """The one line that says how the machine failed the run (`EXIT_MACHINE`): what, and
    the file it happened to, else the run's `folder`."""
    if isinstance(error, OSError):
        where = error.filename or (folder and f"writing under {folder}")
        where = f" ({where})" if where else ""
        what = (error.strerror or _first_line(error)).lower()
    else:  # MemoryError, torch.cuda.OutOfMemoryError
        where, what = "", f"out of memory ({_first_line(error)})"
    return (f"{what}{where}; finished models are saved, and once this is fixed the same "
            "command resumes")


def main(argv=None):
    warnings.formatwarning = _one_line_warning  # on the command line, a warning is one line
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _main(parser, args, argv)
    except (OSError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        print(f"{parser.prog}: error: {machine_failure(e, args.out)}", file=sys.stderr,
              flush=True)
        return EXIT_MACHINE
    except OutputClosed:  # outside a run (`--plan | head`): the reader has what it wanted
        return EXIT_OUTPUT_CLOSED
    except KeyboardInterrupt:  # outside a run (checks, --plan, --plot-only, --compare)
        print("stopped by Ctrl-C; every file is written whole or not at all, so nothing "
              "half-written is left", file=sys.stderr, flush=True)
        return 130


def _main(parser, args, argv):
    try:
        shard = _check_modes(args)
        if args.compare:
            return compare_results(args.compare, args.reference, log=say)
        if args.plot_only:
            return _plot_only(args.plot_only, args.out if "--out" in argv else None)
        experiments = _parse_experiments(args.experiments)
        settings = dict(PRESETS[args.preset])
        if args.seed is not None:
            settings["SEED"] = args.seed
        for text in args.set:
            name, value = parse_setting(text)
            settings[name] = value
        for name, value in settings.items():
            check_setting(name, value)
        check_study({**hyperparameters(), **settings})
        device = resolve_device("cpu" if args.collect else args.device)
        if not args.plan:
            check_data_dir(settings.get("DATA_DIR", DATA_DIR))
            _writable_dir(args.out)
    except ValueError as e:
        parser.error(str(e))
    apply_settings(settings)
    log = say  # every line the command line prints, on stdout
    if args.plan:
        plan_study(experiments, device, shard, detail=True, log=log,
                   records_dir=os.path.join(args.out, "records"))
        return 0
    # SIGTERM (kill, timeout, a cluster's time limit) stops the run as Ctrl-C does
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    what = "collect" if args.collect else f"shard {shard[0]}/{shard[1]}" if shard else "run"
    log(f"{what}: preset {args.preset}, experiments {experiments}, device {device}, "
        f"out {args.out}")
    try:
        if args.collect:
            collect_study(experiments, args.out, args.preset, log=log)
        elif shard:
            models = run_shard(experiments, args.out, device, shard, log=log)
            log(f"shard {shard[0]}/{shard[1]} finished ({models} models); when every shard "
                f"has, collect with: {_command_without(argv, '--shard', True)} --collect")
        else:
            plan = plan_study(experiments, device, log=log,
                              records_dir=os.path.join(args.out, "records"))
            if args.preset == "full" and device.type == "cpu":
                log(f"note: full is sized for a GPU: about {_duration(plan['seconds'])} on "
                    "this CPU; --preset quick draws the whole figure in minutes (this run "
                    "goes on)")
            run_study(experiments, args.out, device, args.preset, log=log,
                      estimates=plan["experiments"])
    except NotCollectable as e:
        parser.error(str(e))
    except WorkerError as e:  # not the user's doing: the worker's traceback, if it has one
        print(f"{parser.prog}: error: {e}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt as stop:
        signal.signal(signal.SIGTERM, _shrugged_off)
        how, code = "Ctrl-C", 130
        if isinstance(stop, Terminated):
            how, code = "SIGTERM", 143
        elif isinstance(stop, OutputClosed):
            how, code = "a closed pipe (its output's reader went away)", EXIT_OUTPUT_CLOSED
        try:
            print(f"stopped by {how}: finished models are saved under "
                  f"{os.path.join(args.out, 'records')}; rerun the same command to resume",
                  file=sys.stderr, flush=True)
        except BrokenPipeError:  # stderr went into the same closed pipe
            to_devnull(sys.stderr)
        return code
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if _CTRL_C_WHILE_LOADING:
        print("stopped by Ctrl-C while loading the libraries; nothing was written",
              file=sys.stderr, flush=True)
        sys.exit(130)
    sys.exit(main())
