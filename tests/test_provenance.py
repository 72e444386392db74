"""Provenance: which code, command and machine made a result, in the results JSON and in
every record, never in a record's key."""
import hashlib
import json
import shutil
import subprocess

import pytest

import neural_collapse_cka as ncc
from conftest import ROOT


def test_provenance_names_the_script_its_commit_the_command_and_the_machine():
    info = ncc.provenance("cpu")
    with open(ncc.__file__, "rb") as f:
        assert info["script_sha256"] == hashlib.sha256(f.read()).hexdigest()
    assert info["torch"] == ncc.torch.__version__ and info["numpy"] == ncc.np.__version__
    assert info["cpu"] and info["gpu"] is None and info["command"]
    if shutil.which("git") is None:
        pytest.skip("git is not installed")
    head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                          text=True)
    if head.returncode == 0:
        assert info["git_commit"] == head.stdout.strip()
        assert isinstance(info["git_dirty"], bool)


def test_records_carry_provenance_outside_their_keys(tiny, monkeypatch):
    records = tiny / "records"
    kwargs = dict(epochs=2, widths=[2], archs=("CNN",), optimizers=("SGD",),
                  records_dir=str(records), log=None)
    first = ncc.run_model_wise_complete(**kwargs)
    (path,) = [p for p in (records / "exp1").glob("*.json") if not p.name.startswith(".")]
    record = json.loads(path.read_text())
    assert record["provenance"] == json.loads(json.dumps(ncc.provenance("cpu")))
    # other code, command and machine: the same key, so the record is reused, not retrained
    monkeypatch.setattr(ncc, "provenance", lambda device_type: {"script_sha256": "other"})
    stored = []
    monkeypatch.setattr(ncc.ModelRuns, "_store",
                        lambda self, *a: stored.append(a) or a[1])
    again = ncc.run_model_wise_complete(**kwargs)
    assert stored == [] and again == first
