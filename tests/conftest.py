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
