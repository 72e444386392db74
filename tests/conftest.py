import csv
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


# Runs of the script as a user runs it, shared by the command-line test modules (each run
# takes seconds to a minute on a 2-core CPU, so each is made once per session).
def saved_records(folder):
    """The finished records in a records folder (pathlib's glob also matches the writer's
    hidden temporary files, which a stop or a kill may catch mid-write)."""
    return [p for p in folder.glob("*.json") if not p.name.startswith(".")]


def model_table(out, without=("seconds",)):
    """The rows of a run's per-model CSV as dicts, without the wall-time column."""
    with open(out / "neural_collapse_cka_models.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in without}
                for row in csv.DictReader(f)]


SLOW_SMOKE = ["--preset", "smoke", "--set", "EPOCHS_MODEL_WISE=15", "--set", "CPU_GROUP_WIDTH=4"]
"""Smoke with Exp 1 longer and its groups pairs (smoke's default fuses all 8 models of an
architecture), so that a kill or a stop can land between two groups of Exp 1."""


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("cli_data"))


def _run(tmp_path_factory, data_dir, name, args):
    from test_cli import cli
    out = tmp_path_factory.mktemp(name)
    result = cli(*args, "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    return out, result


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir):
    """(out folder, completed process) of an uninterrupted, unsharded smoke run."""
    return _run(tmp_path_factory, data_dir, "smoke", ["--preset", "smoke"])


@pytest.fixture(scope="session")
def slow_run(tmp_path_factory, data_dir):
    """The same for SLOW_SMOKE."""
    return _run(tmp_path_factory, data_dir, "slow_smoke", SLOW_SMOKE)
