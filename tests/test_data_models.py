"""Data and models."""
import shutil
import socket
import warnings

import numpy as np
import pytest
import torch

import neural_collapse_cka as ncc


# ---- data ------------------------------------------------------------------------------
def test_generation_needs_no_network(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    d = ncc.get_data(cache_path=str(tmp_path / "c.npz"))
    assert d["x_train"].shape == (4000, 40) and d["x_test"].shape == (1000, 40)
    assert (tmp_path / "c.npz").exists()


def test_shapes_dtypes_and_label_range(data_cache):
    d = ncc.get_data(cache_path=data_cache)
    assert set(d) == {"x_train", "y_train", "y_train_clean", "noise_mask", "x_test", "y_test"}
    assert d["x_train"].dtype == torch.float32 and d["y_train"].dtype == torch.int64
    assert d["noise_mask"].dtype == torch.bool
    for key in ("y_train", "y_train_clean", "y_test"):
        assert d[key].min() >= 0 and d[key].max() <= 9
    # the clean training set is the mnist1d standard one: 400 +- noise per class
    assert torch.bincount(d["y_train_clean"], minlength=10).min() > 300


def test_exactly_800_labels_moved_to_a_different_class(data_cache):
    d = ncc.get_data(cache_path=data_cache)
    changed = d["y_train"] != d["y_train_clean"]
    assert int(d["noise_mask"].sum()) == 800
    assert torch.equal(changed, d["noise_mask"])  # every chosen label really changed
    # "uniformly random different class": every (clean -> noisy) shift 1..9 occurs
    shifts = (d["y_train"] - d["y_train_clean"])[changed] % 10
    counts = torch.bincount(shifts, minlength=10)
    assert counts[0] == 0 and counts[1:].min() > 50


def test_test_labels_never_corrupted(data_cache):
    clean = ncc.load_mnist1d(data_cache)
    d = ncc.get_data(label_noise=0.5, cache_path=data_cache)
    assert np.array_equal(d["y_test"].numpy(), clean["y_test"])


def test_noise_depends_on_seed_alone_not_on_cache_state(tmp_path):
    path = str(tmp_path / "c.npz")
    np.random.seed(1)
    fresh = ncc.get_data(seed=7, cache_path=path)       # generates: make_dataset reseeds NumPy
    np.random.seed(999)
    cached = ncc.get_data(seed=7, cache_path=path)      # loads the cache: no reseeding
    assert torch.equal(fresh["y_train"], cached["y_train"])
    other = ncc.get_data(seed=8, cache_path=path)
    assert not torch.equal(fresh["noise_mask"], other["noise_mask"])


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip file", "truncate"])
def test_bad_cache_is_regenerated_with_a_warning(tmp_path, data_cache, content):
    path = tmp_path / "c.npz"
    if content == "truncate":
        raw = open(data_cache, "rb").read()
        path.write_bytes(raw[: len(raw) // 2])
    else:
        path.write_bytes(content)
    with pytest.warns(UserWarning, match="invalid"):
        d = ncc.get_data(cache_path=str(path))
    assert d["x_train"].shape == (4000, 40)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the regenerated file is valid: no second warning
        again = ncc.get_data(cache_path=str(path))
    assert torch.equal(d["x_train"], again["x_train"])


def test_cache_with_wrong_shape_or_label_range_is_rejected(tmp_path, data_cache):
    good = ncc.load_mnist1d(data_cache)
    for key, bad_value in [("x", good["x"][:10]), ("y", good["y"] + 5),
                           ("y_test", good["y_test"].astype(np.float32))]:
        path = tmp_path / f"{key}.npz"
        np.savez(path, **{**good, key: bad_value})
        with pytest.warns(UserWarning, match="invalid"):
            ncc.load_mnist1d(str(path))


def test_cache_holding_a_pickled_object_is_never_unpickled(tmp_path, data_cache):
    good = ncc.load_mnist1d(data_cache)
    path = tmp_path / "obj.npz"
    np.savez(path, **{**good, "x": np.array([{"evil": 1}], dtype=object)})
    with pytest.warns(UserWarning, match="invalid"):
        d = ncc.load_mnist1d(str(path))
    assert d["x"].dtype == np.float32


def test_cached_and_generated_data_are_identical(tmp_path, data_cache):
    shutil.copy(data_cache, tmp_path / "copy.npz")
    loaded = ncc.load_mnist1d(str(tmp_path / "copy.npz"))
    generated = ncc.load_mnist1d(str(tmp_path / "new.npz"))
    for key in loaded:
        assert np.array_equal(loaded[key], generated[key])


# ---- models ----------------------------------------------------------------------------
@pytest.mark.parametrize("w", [1, 2, 7, 12, 64])
def test_parameter_counts_match_closed_forms(w):
    # ResNet: stem 3w + BN 2w; two blocks of 2 x (3w^2 + 2w); classifier 10w.
    assert ncc.count_parameters(ncc.ResNet1D(w)) == 12 * w**2 + 23 * w
    # CNN: 5w + (3w^2 + 2w) + (6w^2 + 4w) + (12w^2 + 4w) + classifier 20w.
    assert ncc.count_parameters(ncc.CNN1D(w)) == 21 * w**2 + 35 * w
    for d in (2, 9, 16):
        assert (ncc.count_parameters(ncc.ResNet1D(w, feature_dim=d))
                == 12 * w**2 + 13 * w + w * d + 10 * d)


@pytest.mark.parametrize("model, shapes", [
    (ncc.ResNet1D(6), [(5, 6, 40), (5, 6, 40), (5, 6, 40), (5, 6)]),
    (ncc.ResNet1D(6, feature_dim=3), [(5, 6, 40), (5, 6, 40), (5, 6, 40), (5, 3)]),
    (ncc.CNN1D(6), [(5, 6, 20), (5, 6, 10), (5, 12, 10), (5, 12)]),
])
def test_features_are_layers_L0_to_L3_and_feed_the_classifier(model, shapes):
    model.eval()
    x = torch.randn(5, 40)
    feats = model.features(x)
    assert [tuple(f.shape) for f in feats] == shapes
    assert model.classifier.bias is None
    assert model.classifier.weight.shape == (10, shapes[-1][1])
    logits = model(x)
    assert logits.shape == (5, 10)
    assert torch.allclose(logits, feats[-1] @ model.classifier.weight.T)
    assert torch.allclose(logits, model(x.unsqueeze(1)))  # (n, 1, 40) works too
