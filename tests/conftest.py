import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import neural_collapse_cka as ncc  # noqa: E402


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One generated MNIST-1D cache shared by the whole session (generation takes ~2 s)."""
    path = str(tmp_path_factory.mktemp("data") / "mnist1d.npz")
    ncc.load_mnist1d(path)
    return path


@pytest.fixture
def tiny(monkeypatch, data_cache, tmp_path):
    """Small, fast settings for calling the drivers; the data comes from the shared cache."""
    monkeypatch.setattr(ncc, "DATA_DIR", str(tmp_path))
    monkeypatch.setattr(ncc, "_cache_path", lambda args: data_cache)
    monkeypatch.setattr(ncc, "TRAIN_SUBSET", 200)
    monkeypatch.setattr(ncc, "CKA_SUBSET", 50)
    return tmp_path
