"""Provenance: which code, command and machine made a result, in the results JSON and in
every record, never in a record's key."""
import hashlib
import json
import os
import re
import shutil
import subprocess

import pytest

import neural_collapse_cka as ncc
from conftest import NAME, ROOT, cli


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


def absolute_paths(tree, found=None, where=""):
    """(where, value) of every string in `tree` that holds an absolute path of this
    machine: the temporary folders and the repository's own."""
    found = [] if found is None else found
    if isinstance(tree, dict):
        for key, value in tree.items():
            absolute_paths(value, found, f"{where}/{key}")
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            absolute_paths(value, found, f"{where}[{i}]")
    elif isinstance(tree, str) and ("/tmp" in tree or ROOT in tree):
        found.append((where, tree))
    return found


def test_a_results_file_and_a_merge_of_parts_name_no_absolute_path(tmp_path, data_dir,
                                                                    smoke_run, exp3_run):
    results = json.loads((smoke_run[0] / f"{NAME}.json").read_text())
    assert absolute_paths(results) == []
    assert results["config"]["DATA_DIR"] == ".../" + os.path.basename(data_dir)
    assert results["env"]["provenance"]["command"].endswith(
        "--out .../" + smoke_run[0].name)
    merged = tmp_path / "merged"
    parts = []
    for number, run in (("1,2,4", smoke_run), ("3", exp3_run)):
        part = json.loads((run[0] / f"{NAME}.json").read_text())
        for name in [k for k in part if k.startswith("exp") and k[3:] not in number]:
            part.pop(name)
        parts.append(tmp_path / f"part{number[0]}.json")
        parts[-1].write_text(json.dumps(part))
    done = cli("--plot-only", *map(str, parts), "--out", str(merged), data_dir=data_dir)
    assert done.returncode == 0, done.stderr
    merged_results = json.loads((merged / f"{NAME}.json").read_text())
    assert absolute_paths(merged_results) == []
    assert [p["file"] for p in merged_results["parts"]] == [".../part1.json",
                                                            ".../part3.json"]


@pytest.mark.parametrize("path, portable", [
    (os.path.join(ROOT, "docs", "full"), "docs/full"),
    (ROOT, "."),
    ("/scratch/me/runs/quick/", ".../quick"),
    ("data", "data"),                       # relative paths are already portable
])
def test_paths_inside_the_repository_are_relative_and_others_keep_only_their_name(
        path, portable):
    assert ncc.portable_path(path) == portable


def test_published_results_name_no_absolute_path():
    absolute = re.compile(r"(^|[\s=])/\w")  # a path from a file system's root
    docs = os.path.join(ROOT, "docs")
    files = [os.path.join(folder, name) for folder, _, names in os.walk(docs)
             for name in names if name.endswith((".json", ".csv", ".md"))]
    assert len(files) >= 4
    for path in files:
        with open(path) as f:
            text = f.read()
        strings = []
        if path.endswith(".json"):
            strings = re.findall(r'"((?:[^"\\]|\\.)*)"', text)
        else:
            strings = text.splitlines()
        assert [s for s in strings if absolute.search(s)] == [], path
