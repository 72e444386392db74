"""The script as a user runs it: a subprocess with the smoke preset."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import neural_collapse_cka as ncc
from conftest import (NAME, ROOT, SCRIPT, SLOW_SMOKE, cli, model_table, numbers_only,
                      refused, saved_records)

def test_smoke_run_writes_figure_and_results_with_the_spec_layout(smoke_run):
    out, result = smoke_run
    png = (out / f"{NAME}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / f"{NAME}.json").read_text())
    assert results["config"]["preset"] == "smoke" and results["config"]["SEED"] == 42
    assert {"torch", "numpy", "device", "wall_seconds"} <= set(results["env"])
    assert set(results["exp1"]) == {"ResNet_SGD", "ResNet_Adam", "CNN_SGD", "CNN_Adam"}
    assert {"critical", "large"} == set(results["exp2"])
    assert set(results["exp3"]) >= {"d", "nc1", "nc2"}
    assert set(results["exp4"]) >= {"layers", "cross_arch", "epochs", "drift", "seed_pairs",
                                    "cross_seed"}
    assert not [f for f in os.listdir(out) if f.startswith(".tmp")]
    # one progress line per model: 2 replicates of 8 + 2 + 3, and 5, in the smoke preset
    assert result.stdout.count(" done") == 31
    # replicates, NC in every layer, weight spectra, the CKA settings, the second figure
    assert (out / "neural_collapse_layers.png").read_bytes()[:8] == png[:8]
    series = results["exp1"]["CNN_SGD"]
    assert results["config"]["REPLICATES"] == 2 and series["replicate_count"] == 2
    assert [len(v) for v in series["replicates"]["test_err"]] == [2, 2]
    assert set(series["per_layer"]) == {"L0", "L1", "L2", "L3"}
    assert set(series["per_layer"]["L1"]) == {"nc1", "nc1_pinv", "cdnv", "nc4"}
    assert (out / "neural_collapse_width_epoch.png").read_bytes()[:8] == png[:8]
    assert len(series["curves"]["test_err"]) == 2  # widths 2 and 4
    provenance = results["env"]["provenance"]
    # the folder given, without the absolute path of this machine
    assert provenance["command"].endswith("--preset smoke --out .../" + out.name)
    # the per-model table: one row per model, its values those of the JSON
    rows = model_table(out)
    assert len(rows) == 31 and list(rows[0]) == [c for c in ncc.MODEL_COLUMNS if c != "seconds"]
    cnn_sgd = [r for r in rows if r["experiment"] == "exp1"
               and (r["architecture"], r["optimizer"]) == ("CNN", "SGD")]
    assert [(r["width"], r["replicate"]) for r in cnn_sgd] == [("2", "0"), ("2", "1"),
                                                              ("4", "0"), ("4", "1")]
    for r in cnn_sgd:
        w, rep = [2, 4].index(int(r["width"])), int(r["replicate"])
        assert float(r["test_err"]) == series["replicates"]["test_err"][w][rep]
        assert float(r["cdnv_test"]) == series["replicates"]["nc_test"]["cdnv"][w][rep]
        assert float(r["nc1_L1"]) == series["replicates"]["per_layer"]["L1"]["nc1"][w][rep]
        assert int(r["seed"]) == series["replicates"]["seed"][w][rep]
        assert int(r["parameters"]) == series["params"][w] and r["d"] == ""
    assert sorted(r["d"] for r in rows if r["experiment"] == "exp3") == ["10", "10", "2", "2",
                                                                       "9", "9"]
    assert {"alpha", "alpha_weighted", "layers"} <= set(series["esd"])
    assert {"alpha", "alpha_weighted"} <= set(results["exp2"]["large"])
    assert (results["exp4"]["estimator"], results["exp4"]["cka_conv"]) == ("linear", "pool")


def test_plot_only_redraws_without_training(smoke_run, tmp_path, data_dir):
    out, _ = smoke_run
    result = cli("--plot-only", str(out / f"{NAME}.json"), "--out", str(tmp_path),
                 data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / f"{NAME}.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "neural_collapse_layers.png").read_bytes()[:4] == b"\x89PNG"
    assert "exp1]" not in result.stdout  # nothing trained


def _part(results, experiments, **config):
    """The results a run of only `experiments` would have written."""
    part = {"config": {**results["config"], "experiments": experiments, **config},
            "env": results["env"]}
    part.update({f"exp{n}": results[f"exp{n}"] for n in experiments})
    return part


def test_plot_only_merges_a_study_run_in_parts(smoke_run, tmp_path, data_dir):
    whole = json.loads((smoke_run[0] / f"{NAME}.json").read_text())
    parts = []
    for name, experiments, run_only in (("a", [2], {"WORKERS": 1}), ("b", [1, 4], {}),
                                        ("c", [3], {"DATA_DIR": "elsewhere"})):
        (tmp_path / name).mkdir()
        parts.append(tmp_path / name / f"{NAME}.json")
        parts[-1].write_text(json.dumps(_part(whole, experiments, **run_only)))
        # each part's table as the whole run wrote it: the merge takes its part's rows
        shutil.copy(smoke_run[0] / "neural_collapse_cka_models.csv", tmp_path / name)
    result = cli("--plot-only", *map(str, parts), "--out", str(tmp_path / "merged"),
                 data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    rows = model_table(tmp_path / "merged", without=())
    assert [r["experiment"] for r in rows] == ["exp2"] * 4 + ["exp1"] * 16 + ["exp4"] * 5 + [
        "exp3"] * 6
    key = lambda row: sorted(row.items())  # noqa: E731
    assert sorted(rows, key=key) == sorted(model_table(smoke_run[0], without=()), key=key)
    merged = json.loads((tmp_path / "merged" / f"{NAME}.json").read_text())
    for n in (1, 2, 3, 4):
        assert merged[f"exp{n}"] == whole[f"exp{n}"]
    assert merged["config"]["experiments"] == [1, 2, 3, 4]
    assert [p["experiments"] for p in merged["parts"]] == [["exp2"], ["exp1", "exp4"], ["exp3"]]
    assert merged["parts"][0]["config"]["WORKERS"] == 1  # each part's own, as it ran
    for figure in (NAME, "neural_collapse_layers", "neural_collapse_width_epoch"):
        assert (tmp_path / "merged" / f"{figure}.png").stat().st_size > 10_000


@pytest.mark.parametrize("second, named", [
    ((1,), "exp1 is in both"),                                      # an experiment twice
    ((2,), "LABEL_NOISE=0.1"),                                      # another study
])
def test_plot_only_refuses_files_that_are_not_parts_of_one_study(smoke_run, tmp_path,
                                                                   data_dir, capsys, second,
                                                                   named):
    whole = json.loads((smoke_run[0] / f"{NAME}.json").read_text())
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part(whole, [1])))
    b.write_text(json.dumps(_part(whole, list(second), **(
        {"LABEL_NOISE": 0.1} if second == (2,) else {}))))
    code, lines = refused(capsys, "--plot-only", str(a), str(b), "--out", str(tmp_path / "m"),
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and named in lines[0]
    assert not (tmp_path / "m").exists()


def test_plot_only_of_several_files_needs_an_out_that_overwrites_none(smoke_run, tmp_path,
                                                                       data_dir, capsys):
    whole = json.loads((smoke_run[0] / f"{NAME}.json").read_text())
    (tmp_path / "a").mkdir()
    a, b = tmp_path / "a" / f"{NAME}.json", tmp_path / "b.json"
    a.write_text(json.dumps(_part(whole, [1])))
    b.write_text(json.dumps(_part(whole, [2])))
    for out in ([], ["--out", str(tmp_path / "a")]):
        code, lines = refused(capsys, "--plot-only", str(a), str(b), *out, data_dir=data_dir)
        assert code == 2 and len(lines) == 1 and "--out" in lines[0]
    assert json.loads(a.read_text()) == _part(whole, [1])


def test_figure_marks_experiments_that_were_not_run(exp3_run):
    out, _ = exp3_run
    results = json.loads((out / f"{NAME}.json").read_text())
    assert "exp3" in results and "exp1" not in results and "exp4" not in results
    assert (out / f"{NAME}.png").read_bytes()[:4] == b"\x89PNG"


BAD_INPUTS = [
    (["--preset", "huge"], "preset"),
    (["--experiments", "1,5"], "experiments"),
    (["--set", "NO_SUCH=1"], "NO_SUCH"),
    (["--set", "WIDTHS=abc"], "WIDTHS"),
    (["--set", "WIDTHS=[]"], "WIDTHS"),
    (["--set", "EPOCHS_MODEL_WISE=-3"], "EPOCHS_MODEL_WISE"),
    (["--set", "LABEL_NOISE"], "NAME=VALUE"),
    (["--set", "CKA_CONV=flat"], "CKA_CONV"),
    (["--set", "CKA_ESTIMATOR=unbiased"], "CKA_ESTIMATOR"),
    (["--set", "REPLICATES=0"], "REPLICATES"),
    (["--device", "tpu"], "device"),
    (["--seed", "x"], "seed"),
]


def test_bad_input_as_a_user_meets_it_is_one_line_exit_2_and_nothing_written(tmp_path,
                                                                              data_dir):
    out = tmp_path / "out"
    result = cli("--preset", "smoke", "--out", str(out), "--set", "WIDTHS=[]",
                 data_dir=data_dir)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "WIDTHS" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.parametrize("args, named", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_nothing_written(tmp_path, data_dir, capsys, args,
                                                          named):
    out = tmp_path / "out"
    code, lines = refused(capsys, "--preset", "smoke", "--out", str(out), *args,
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and named in lines[0]
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_cuda_requested_without_cuda(tmp_path, data_dir, capsys):
    code, lines = refused(capsys, "--preset", "smoke", "--device", "cuda", "--out",
                          str(tmp_path / "o"), data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "CUDA is not available" in lines[0]


def test_unwritable_out(tmp_path, data_dir, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    code, lines = refused(capsys, "--preset", "smoke", "--out", str(blocker / "sub"),
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "--out" in lines[0]


@pytest.mark.parametrize("content", [None, "{not json", '{"no_config": 1}'])
def test_missing_or_corrupt_plot_only_file(tmp_path, data_dir, capsys, content):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    code, lines = refused(capsys, "--plot-only", str(path), "--out", str(tmp_path / "o"),
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1
    assert not (tmp_path / "o").exists()


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_:
        ncc.main(["--help"])
    assert exit_.value.code == 0
    shown = capsys.readouterr().out
    for flag in ("--preset", "--experiments", "--device", "--out", "--seed", "--plot-only",
                 "--set", "--plan", "--shard", "--collect"):
        assert flag in shown


@pytest.mark.long(30)
def test_killed_run_resumes_to_the_same_numbers(tmp_path, data_dir, slow_run):
    args = SLOW_SMOKE
    out = tmp_path / "killed"
    cmd = [sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "records" / "exp1"
    group_size = 2  # one more record than a group means at least one whole group is saved
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and len(saved_records(records)) > group_size:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = len(saved_records(records))
    assert group_size < finished < 16, "the kill should land half-way through Exp 1"
    assert not (out / f"{NAME}.json").exists()
    # Make sure one group is left part saved, as a kill between its records would leave
    # it: it must be retrained whole, or its other models would train in another group
    # and round differently.
    groups = {}
    for path in saved_records(records):
        # a group: one architecture, width and replicate, both optimizers
        name = re.match(r"(\w+?)_(?:SGD|Adam)_(w\d+)(_r\d+)?_[0-9a-f]+\.json$", path.name)
        groups.setdefault(name.groups(), []).append(path)
    complete = [paths for paths in groups.values() if len(paths) == group_size]
    assert complete
    complete[0][0].unlink()

    resumed = cli(*args, "--out", str(out), data_dir=data_dir)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.count("(cached)") == group_size * (len(complete) - 1)
    ref = json.loads((slow_run[0] / f"{NAME}.json").read_text())
    again = json.loads((out / f"{NAME}.json").read_text())
    assert numbers_only(again)["exp1"] == numbers_only(ref)["exp1"]


def test_corrupt_cache_gives_a_one_line_warning_and_the_run_goes_on(tmp_path, monkeypatch):
    data = tmp_path / "data"
    monkeypatch.setattr(ncc, "DATA_DIR", str(data))  # the cache the command line will use
    clean = ncc.load_mnist1d()
    (cache,) = data.glob("mnist1d_*.npz")
    cache.write_bytes(cache.read_bytes()[:1000])  # truncated
    run = cli("--preset", "smoke", "--experiments", "3", "--out", str(tmp_path / "out"),
              data_dir=str(data))
    assert run.returncode == 0
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning:") and "regenerating" in lines[0]
    assert (tmp_path / "out" / f"{NAME}.json").exists()
    with np.load(cache) as regenerated:  # the regenerated data is the same data
        assert all(np.array_equal(regenerated[k], clean[k]) for k in clean)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")
def test_gpu_check_without_cuda_is_one_line_exit_2(tmp_path):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "gpu_check.py"),
                             str(tmp_path / "check")], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and "CUDA is not available" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "check").exists()


@pytest.mark.parametrize("args, problem", [(["--widths", "2,x"], "--widths '2,x'"),
                                           (["--epochs", "0"], "--epochs 0")])
def test_benchmark_bad_arguments_are_one_line_exit_2(args, problem):
    result = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "benchmark.py"),
                             "--device", "cpu", *args], capture_output=True, text=True,
                            cwd=ROOT, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"benchmark.py: error: {problem}"), lines


def test_a_collects_wall_time_is_not_given_as_training_time():
    """A collect reads records in seconds: its wall time says nothing of the hours the
    models trained, so neither its summary nor a merge that includes it shows it."""
    trained = {"config": {}, "env": {"wall_seconds": {"exp2": 7200.0, "total": 7200.0}},
               "exp2": {"trained": True}}
    collected = {"config": {}, "exp1": {"trained": True},
                 "env": {"wall_seconds": {"exp1": 3.0, "total": 3.0},
                         "collected_from_records": True}}
    assert "Wall time     exp2 2h00m" in ncc._run_summary(trained)
    assert "Wall time" not in ncc._run_summary(collected)
    merged = ncc.merge_results([("trained.json", trained), ("collected.json", collected)])
    assert merged["env"]["wall_seconds"] == {"exp2": 7200.0}
    assert "collected_from_records" not in merged["env"]
    assert "exp2 2h00m" in ncc._run_summary(merged)
    assert "exp1 3s" not in ncc._run_summary(merged)
