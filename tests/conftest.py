import csv
import fcntl
import json
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
SCRIPT = os.path.join(ROOT, "neural_collapse_cka.py")
NAME = "neural_collapse_cka_results"

import neural_collapse_cka as ncc  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "long(seconds): an end-to-end test that takes about "
                            "`seconds` on a 2-core machine; the longest start first")


def pytest_collection_modifyitems(items):
    """The longest tests first: with the suite spread over processes (pytest -n), each then
    runs beside the short ones instead of alone at the end."""
    def seconds(item):
        mark = item.get_closest_marker("long")
        return mark.args[0] if mark else 0
    items.sort(key=seconds, reverse=True)


@pytest.fixture(autouse=True)
def settings_left_as_found():
    """A test that changes a hyperparameter must restore it: later tests read them."""
    before = ncc.hyperparameters()
    yield
    changed = {name: value for name, value in ncc.hyperparameters().items()
               if before[name] != value}
    assert not changed, f"the test left hyperparameters changed: {changed}"


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
    """One generated MNIST-1D cache shared by the whole session (generation takes ~2 s)."""
    path = str(tmp_path_factory.mktemp("data") / "mnist1d.npz")
    ncc.load_mnist1d(path)
    return path


@pytest.fixture
def tiny(monkeypatch, data_cache, tmp_path):
    """Small, fast settings for calling the drivers; the data comes from the shared cache.
    Groups train in this process (WORKERS=1): a worker process spends seconds importing
    torch as it starts, so only the tests of workers ask for them."""
    monkeypatch.setattr(ncc, "WORKERS", 1)
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


def cli(*args, data_dir, timeout=300):
    return subprocess.run([sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def refused(capsys, *args, data_dir):
    """(exit code, stderr lines) of `main(args)` called in this process, for input the
    command line must refuse before it trains or writes anything: the same parser and
    checks as a subprocess, without a second of start-up per case. Each refusal test
    module also runs one such case as a subprocess, as a user meets it."""
    capsys.readouterr()
    formatwarning = warnings.formatwarning  # main makes warnings one line
    try:
        with pytest.raises(SystemExit) as exit_:
            ncc.main(["--set", f"DATA_DIR={data_dir}", *args])
    finally:
        warnings.formatwarning = formatwarning
    return exit_.value.code, capsys.readouterr().err.strip().splitlines()


def numbers_only(results):
    """The results without wall times, so two runs can be compared number for number."""
    results = json.loads(json.dumps(results))
    results.pop("env")
    for exp in ("exp1", "exp3"):
        if exp not in results:
            continue
        for series in [results[exp]] if exp == "exp3" else results[exp].values():
            series.pop("seconds", None)
            series["replicates"].pop("seconds", None)
            series.get("std", {}).pop("seconds", None)
    return results


def model_table(out, without=("seconds",)):
    """The rows of a run's per-model CSV as dicts, without the wall-time column."""
    with open(out / "neural_collapse_cka_models.csv", newline="") as f:
        return [{k: v for k, v in row.items() if k not in without}
                for row in csv.DictReader(f)]


SLOW_SMOKE = ["--preset", "smoke", "--experiments", "1", "--set", "EPOCHS_MODEL_WISE=15",
              "--set", "CPU_GROUP_WIDTH=4"]
"""Smoke's Exp 1 alone, longer and its groups pairs (smoke's default fuses all 8 models of
an architecture), so that a kill or a stop can land between two of its 8 groups."""


def _session_folder(tmp_path_factory):
    """This test session's folder, which every process of pytest -n shares."""
    folder = tmp_path_factory.getbasetemp()
    return folder.parent if os.environ.get("PYTEST_XDIST_WORKER") else folder


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    """The data folder of every command-line run of the session (the data is part of a
    results file's settings, so runs that are compared must share it)."""
    folder = _session_folder(tmp_path_factory) / "cli_data"
    folder.mkdir(exist_ok=True)
    return str(folder)


def once_per_session(tmp_path_factory, name, make):
    """(out folder, completed process) of `make(out)`, once per test session even when
    pytest -n spreads the tests over processes: the first process to need it makes it, and
    the others wait for it (a lock in the folder they share) and read it. Tests that
    change such a folder change a copy."""
    shared = _session_folder(tmp_path_factory)
    out, done = shared / f"run-{name}", shared / f"run-{name}.json"
    with open(shared / f"run-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            ran = make(out)
            done.write_text(json.dumps({"returncode": ran.returncode, "stdout": ran.stdout,
                                        "stderr": ran.stderr}))
    result = subprocess.CompletedProcess(name, **json.loads(done.read_text()))
    assert result.returncode == 0, result.stderr
    return out, result


def _run(tmp_path_factory, data_dir, name, args):
    """The script run with `args`, once per test session (`once_per_session`)."""
    return once_per_session(tmp_path_factory, name,
                            lambda out: cli(*args, "--out", str(out), data_dir=data_dir))


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, data_dir):
    """(out folder, completed process) of an uninterrupted, unsharded smoke run."""
    return _run(tmp_path_factory, data_dir, "smoke", ["--preset", "smoke"])


@pytest.fixture(scope="session")
def exp3_run(tmp_path_factory, data_dir):
    """The same for a smoke run of Exp 3 alone (tests that change its folder copy it)."""
    return _run(tmp_path_factory, data_dir, "exp3", ["--preset", "smoke", "--experiments", "3"])


@pytest.fixture(scope="session")
def slow_run(tmp_path_factory, data_dir):
    """The same for SLOW_SMOKE."""
    return _run(tmp_path_factory, data_dir, "slow_smoke", SLOW_SMOKE)
