"""Failures a user can cause or meet: each ends in one line on stderr naming what and
where, with exit code 2 for bad input and 3 for a failure of the machine (a full disk, a
missing permission), nothing already saved lost, and the same command resuming once the
cause is fixed. And two runs sharing a folder, which share the work instead of doing it
twice."""
import errno
import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

import neural_collapse_cka as ncc
from conftest import NAME, ROOT, SCRIPT, cli, numbers_only, refused, saved_records

SMOKE = ["--preset", "smoke"]
EXP3 = [*SMOKE, "--experiments", "3"]


def one_line(result, *named):
    """The run's stderr is one line, no traceback, naming each of `named`."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for name in named:
        assert name in lines[0], lines[0]
    return lines[0]


def temporaries(folder):
    return [p for p in folder.rglob(".tmp-*")]


# --- bad values: refused before anything runs, one line, exit 2 ---------------------------
@pytest.mark.parametrize("setting, named", [
    ("EPOCHS_MODEL_WISE=99999999999999999999", "EPOCHS_MODEL_WISE"),
    ("BATCH_SIZE=1000000000", "BATCH_SIZE"),
    ("BATCH_SIZE=300", "256 training samples"),      # smoke trains on 256
    ("TRAIN_SUBSET=100000", "4000 training samples"),
    ("CKA_SUBSET=5000", "CKA_SUBSET"),
    ("CKA_DRIFT_EPOCHS=[5]", "EPOCHS_CKA=2"),           # smoke's CKA runs 2 epochs
    ("WIDTHS=[2,4096]", "WIDTHS"),
    ("REPLICATES=1000", "REPLICATES"),
    ("DATA_DIR=/usr/lib", "operating system"),
])
def test_an_absurd_value_is_one_line_and_exit_2_before_anything_runs(
        tmp_path, data_dir, capsys, setting, named):
    out = tmp_path / "out"
    code, lines = refused(capsys, *SMOKE, "--set", setting, "--out", str(out),
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert not out.exists()


@pytest.mark.parametrize("out", ["/", "/usr/lib/results", "/etc"])
def test_a_results_folder_of_the_operating_system_is_refused(data_dir, capsys, out):
    # as root nothing else would stop a run from writing its files there
    code, lines = refused(capsys, *SMOKE, "--experiments", "4", "--out", out,
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "--out" in lines[0], lines
    assert "operating system" in lines[0]
    assert not os.path.exists(os.path.join(out, "records"))


def test_the_plan_refuses_a_batch_larger_than_the_data_at_once(data_dir):
    started = time.time()
    result = cli("--set", "BATCH_SIZE=100000", "--plan", data_dir=data_dir)
    assert result.returncode == 2
    one_line(result, "BATCH_SIZE=100000", "4000 training samples")
    assert time.time() - started < 60  # refused, not probed: far from the minutes a probe took


def test_a_data_folder_that_cannot_be_written_is_refused(tmp_path, capsys):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    code, lines = refused(capsys, *SMOKE, "--out", str(tmp_path / "out"),
                          data_dir=str(blocked / "data"))
    assert code == 2 and len(lines) == 1 and "DATA_DIR" in lines[0]


def test_drift_epochs_beyond_the_run_are_an_error_from_python_too():
    with pytest.raises(ValueError, match="not epochs of the run"):
        ncc.cka_setup(epochs=2, drift_epochs=[1, 5])
    assert ncc.cka_setup(epochs=5, drift_epochs=[5, 2])["specs"][2]["checkpoints"] == [1, 2, 5]


# --- results files of the wrong shape -------------------------------------------------------
@pytest.mark.parametrize("exp1, named", [
    ({"foo": 1}, "exp1 is not in the shape"),
    ([1, 2], "exp1 is a JSON list"),
])
def test_plot_only_on_a_wrong_shaped_results_file_is_one_line(tmp_path, data_dir, capsys,
                                                              exp1, named):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"config": {"preset": "smoke"}, "exp1": exp1}))
    code, lines = refused(capsys, "--plot-only", str(path), "--out", str(tmp_path / "o"),
                          data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and named in lines[0], lines
    assert not (tmp_path / "o").exists()


def test_a_wrong_shaped_part_of_a_merge_is_one_line_as_a_user_meets_it(tmp_path, data_dir):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"config": {"preset": "smoke"}}))
    bad = tmp_path / "b.json"
    bad.write_text(json.dumps({"config": {"preset": "smoke"}, "exp3": {"d": 5}}))
    result = cli("--plot-only", str(good), str(bad), "--out", str(tmp_path / "o"),
                 data_dir=data_dir)
    assert result.returncode == 2
    one_line(result, "b.json", "exp3")


# --- records that are no records ------------------------------------------------------------
@pytest.mark.long(20)
def test_a_hollow_record_is_warned_about_and_retrained(tmp_path, data_dir, exp3_run):
    out = tmp_path / "out"
    shutil.copytree(exp3_run[0], out)
    hollow = saved_records(out / "records" / "exp3")[0]
    hollow.write_text(json.dumps({"diverged": False}))  # valid JSON, none of the fields
    again = cli(*EXP3, "--out", str(out), data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    warning = one_line(again, hollow.name, "no arch")
    assert warning.startswith("warning: record ")
    assert again.stdout.count("(cached)") == 3  # the other replicate's group of 3
    assert numbers_only(json.loads((out / f"{NAME}.json").read_text())) == numbers_only(
        json.loads((exp3_run[0] / f"{NAME}.json").read_text()))
    assert "diverged" in json.loads(hollow.read_text()) and "arch" in json.loads(
        hollow.read_text())


def test_a_record_lacking_a_field_or_a_checkpoint_is_no_record():
    spec = {"arch": "CNN", "optimizer": "SGD", "width": 2, "epochs": 3, "replicate": 0,
            "checkpoints": [1, 3]}
    record = {**spec, "seed": 1, "params": 10, "diverged": False, "epochs_run": 3,
              "train_err": 0.1, "test_err": 0.2, "train_loss": 1.0, "test_loss": 1.0,
              "nc_train": dict.fromkeys(ncc.NC_NAMES, 1.0),
              "nc_test": dict.fromkeys(ncc.NC_NAMES, 1.0),
              "per_layer": {layer: dict.fromkeys(ncc.LAYER_NC_NAMES, 1.0)
                            for layer in ncc.LAYERS},
              "esd": {"alpha": 3.0, "alpha_weighted": 3.0}, "seconds": 1.0,
              "checkpoints": [{"epoch": e, **dict.fromkeys(ncc.LEARNING_CURVE_NAMES, 0.5)}
                              for e in (1, 3)]}
    assert ncc.record_problem(record, "exp1", spec) is None
    assert "test_err" in ncc.record_problem({k: v for k, v in record.items()
                                             if k != "test_err"}, "exp1", spec)
    lacking = json.loads(json.dumps(record))
    del lacking["per_layer"]["L2"]["nc4"]
    assert "per_layer L2" in ncc.record_problem(lacking, "exp1", spec)
    short = {**record, "checkpoints": record["checkpoints"][:1]}
    assert "checkpoint epochs" in ncc.record_problem(short, "exp1", spec)
    # a model that diverged stops early: its checkpoints end with it
    assert ncc.record_problem({**short, "diverged": True}, "exp1", spec) is None
    unmeasured = json.loads(json.dumps(record))
    del unmeasured["checkpoints"][1]["test_loss"]
    assert "a checkpoint lacks" in ncc.record_problem(unmeasured, "exp1", spec)


# --- failures of the machine: one line, exit 3, the same command resumes ---------------------
def limited_writes(limit):
    """For a child process: files it writes may not grow past `limit` bytes, as on a full
    disk (the write fails; CPython ignores SIGXFSZ, so it is an OSError, EFBIG)."""
    return lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))


def run_limited(args, data_dir, limit):
    return subprocess.run([sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *args],
                          capture_output=True, text=True, timeout=300, cwd=ROOT,
                          preexec_fn=limited_writes(limit))


@pytest.mark.long(20)
@pytest.mark.parametrize("where, args, limit", [
    # the first record's weights (over 8 KB) fail to write, in the run's own process (the
    # 4 KB that starting the workers writes to shared memory passes)
    ("a record", EXP3, 8_000),
    # a worker's first snapshot (after every epoch here) fails to write
    ("a worker's snapshot", [*EXP3, "--set", "WORKERS=2", "--set", "SNAPSHOT_SECONDS=0"],
     8_000),
])
def test_a_full_disk_is_one_line_exit_3_and_the_same_command_resumes(
        tmp_path, data_dir, exp3_run, where, args, limit):
    out = tmp_path / "out"
    result = run_limited([*args, "--out", str(out)], data_dir, limit)
    assert result.returncode == 3, (where, result.stderr)
    line = one_line(result, "file too large", str(out / "records" / "exp3"))
    assert "same command resumes" in line
    assert temporaries(out) == []
    assert not (out / f"{NAME}.json").exists()
    again = cli(*args, "--out", str(out), data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    # the numbers of an uninterrupted run (run settings such as WORKERS aside)
    assert numbers_only(json.loads((out / f"{NAME}.json").read_text()))["exp3"] == \
        numbers_only(json.loads((exp3_run[0] / f"{NAME}.json").read_text()))["exp3"]


@pytest.mark.long(15)
def test_a_disk_full_after_the_results_json_is_one_line_and_a_rerun_finishes(
        tmp_path, data_dir, exp3_run):
    out = tmp_path / "out"
    shutil.copytree(exp3_run[0] / "records", out / "records")
    result = run_limited([*EXP3, "--out", str(out)], data_dir, 40_000)
    # the records are read back, the results JSON (about 20 KB) is written, the figure's
    # PNG (more than 40 KB) is not
    assert result.returncode == 3, result.stderr
    one_line(result, "file too large", str(out))
    assert temporaries(out) == []
    again = cli(*EXP3, "--out", str(out), data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    assert (out / "neural_collapse_cka_results.png").exists()


def test_a_records_folder_that_is_a_file_is_found_before_training(tmp_path, data_dir):
    out = tmp_path / "out"
    (out / "records").mkdir(parents=True)
    (out / "records" / "exp3").write_text("in the way")
    result = cli(*EXP3, "--out", str(out), data_dir=data_dir)
    assert result.returncode == 3, result.stderr
    one_line(result, str(out / "records" / "exp3"))
    assert "[exp3]" not in result.stdout  # nothing trained


@pytest.mark.parametrize("code, folder", [(errno.EACCES, "out"), (errno.EROFS, "out"),
                                          (errno.EACCES, "data")])
def test_a_folder_the_machine_will_not_let_a_run_write_is_exit_3_naming_it(
        tmp_path, data_dir, capsys, monkeypatch, code, folder):
    """A permission or a read-only file system is the machine's failure (exit 3), where a
    path that cannot be a folder is bad input (exit 2, `test_unwritable_out`). As root,
    which ignores permissions, the file system's refusal is staged."""
    out, data = tmp_path / "out", tmp_path / "data"
    barred = {"out": out, "data": data}[folder]
    real = ncc.tempfile.TemporaryFile

    def refusing(*args, dir=None, **kwargs):
        if dir == str(barred):
            raise OSError(code, os.strerror(code), os.path.join(dir, "tmpx"))
        return real(*args, dir=dir, **kwargs)
    monkeypatch.setattr(ncc.tempfile, "TemporaryFile", refusing)
    capsys.readouterr()
    formatwarning = ncc.warnings.formatwarning
    try:
        exit_code = ncc.main(["--set", f"DATA_DIR={data if folder == 'data' else data_dir}",
                              *SMOKE, "--out", str(out)])
    finally:
        ncc.warnings.formatwarning = formatwarning
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_code == 3 and len(lines) == 1, lines
    assert f"{os.strerror(code).lower()} ({barred})" in lines[0]
    assert not (out / "records").exists()


def test_a_machine_failure_in_a_worker_reaches_the_run_as_itself():
    path = "/nowhere/records/exp1/x.pt"
    with ncc.Workers(1, ncc.hyperparameters()) as pool:
        with pytest.raises(OSError) as caught:
            list(pool.map_unordered([(_fail_as_a_full_disk, (path,))]))
    assert caught.value.errno == 28 and caught.value.filename == path


def _fail_as_a_full_disk(path):
    raise OSError(28, "No space left on device", path)


WORKER_WITHOUT_PARENT = """
import multiprocessing, pickle
import neural_collapse_cka as ncc
parent, worker = multiprocessing.Pipe()
parent.send_bytes(pickle.dumps((len, ([1, 2, 3],))))  # a call, then the parent is gone
parent.close()
ncc._worker_main(worker, {}, None)
"""


def test_a_worker_whose_parent_ended_meanwhile_ends_without_a_traceback():
    """A run that stops on a full disk while a worker trains: the worker's reply finds no
    reader (a broken pipe); the run's one line must stay the only one."""
    done = subprocess.run([sys.executable, "-c", WORKER_WITHOUT_PARENT], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == "", done.stderr


def test_a_write_that_fails_names_its_file_and_leaves_no_temporary(tmp_path):
    def full(f):
        raise OSError(28, "No space left on device")  # a write's ENOSPC names no file
    target = tmp_path / "r.json"
    with pytest.raises(OSError) as caught:
        ncc.write_atomic(str(target), full)
    assert caught.value.filename == str(target) and caught.value.errno == 28
    assert os.listdir(tmp_path) == []
    line = ncc.machine_failure(caught.value)
    assert line.startswith("no space left on device (") and str(target) in line


# --- stale temporary files --------------------------------------------------------------------
def test_temporary_files_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".tmp-{dead.pid}-abc.json").write_text("half")
    (tmp_path / f".tmp-{os.getpid()}-def.json").write_text("being written")
    old = tmp_path / ".tmp-older-code.json"
    old.write_text("a kill left it")
    os.utime(old, (time.time() - 2 * ncc.STALE_SECONDS,) * 2)
    young = tmp_path / ".tmp-young-code.json"
    young.write_text("maybe being written")
    ncc.remove_stale_temporaries(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".tmp-{os.getpid()}-def.json", ".tmp-young-code.json"])


# --- two runs on one folder -------------------------------------------------------------------
def trained_lines(stdout, experiment):
    return [line for line in stdout.splitlines()
            if line.startswith(f"[{experiment}] ") and " done" in line and "(cached)" not in line]


@pytest.mark.long(40)
def test_two_identical_runs_on_one_folder_train_each_model_once(tmp_path, data_dir,
                                                                smoke_run):
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *SMOKE, "--out", str(out)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
    time.sleep(2)
    second = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
    outputs = [proc.communicate(timeout=300) for proc in (first, second)]
    assert [first.returncode, second.returncode] == [0, 0], [err for _, err in outputs]
    for experiment, models in (("exp1", 16), ("exp2", 4), ("exp3", 6), ("exp4", 5)):
        assert sum(len(trained_lines(stdout, experiment)) for stdout, _ in outputs) == models
    reference = numbers_only(json.loads((smoke_run[0] / f"{NAME}.json").read_text()))
    assert numbers_only(json.loads((out / f"{NAME}.json").read_text())) == reference
    assert list((out / "records").rglob("*.lock")) == []


def test_a_claimed_group_is_left_to_its_holder_until_the_holder_dies(tmp_path):
    runs = ncc.ModelRuns("exp1", None, str(tmp_path), log=None,
                         rounding=ncc.rounding_context("cpu"))
    group = ncc.fused_groups(ncc.model_wise_setup(epochs=2, widths=[2])["specs"], "cpu")[0]
    os.makedirs(tmp_path / "exp1")
    lock = runs.lock_path(group)
    holder = subprocess.Popen([sys.executable, "-c", HOLD, lock], stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        claims = ncc.GroupClaims(runs)
        assert not claims.take(group)
        holder.send_signal(signal.SIGKILL)  # dies without letting go: the kernel does
        holder.wait()
        assert claims.take(group) and claims.take(group)  # taken, and held
        other = ncc.GroupClaims(runs)
        assert not other.take(group)
        claims.release(group)
        assert not os.path.exists(lock)
        assert other.take(group)
        other.close()
    finally:
        holder.kill()


HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(300)
"""


def test_the_plans_probe_trains_on_at_most_probe_samples_whatever_the_batch(monkeypatch):
    seen = []
    real = ncc.train_models

    def counted(models, data, *args, **kwargs):
        seen.append(len(data["x_train"]))
        return real(models, data, *args, **kwargs)
    monkeypatch.setattr(ncc, "train_models", counted)
    group = [{"arch": "CNN", "optimizer": "SGD", "width": 2, "epochs": 1}]
    for batch in (4, 4000):
        monkeypatch.setattr(ncc, "BATCH_SIZE", batch)
        assert ncc.probe_step_seconds(group, ncc.torch.device("cpu")) > 0
    assert seen == [8, ncc.PROBE_SAMPLES]


def test_a_reader_that_stops_reading_ends_the_command_quietly_and_a_run_keeps_its_work(
        tmp_path, data_dir):
    # `--compare ... | head -0`: its reader is gone before its first line; exit 141, as a
    # shell reports a program that SIGPIPE ended, and nothing on stderr
    compare = subprocess.Popen([sys.executable, SCRIPT, "--compare", "docs/quick_results.json"],
                               cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    compare.stdout.close()
    assert compare.wait(timeout=60) == 141
    assert compare.stderr.read() == ""
    # a run whose reader leaves after its first finished model: it stops as at Ctrl-C, one
    # line, and what it saved counts as done for the same command
    args = [*SMOKE, "--experiments", "1", "--set", "CPU_GROUP_WIDTH=4", "--out",
            str(tmp_path / "out")]
    run = subprocess.Popen([sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *args],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in run.stdout:
        if " done" in line:
            break
    run.stdout.close()
    assert run.wait(timeout=60) == 141
    one_line(subprocess.CompletedProcess(run.args, run.returncode, None, run.stderr.read()),
             "closed pipe", "rerun the same command")
    assert saved_records(tmp_path / "out" / "records" / "exp1")
    assert not (tmp_path / "out" / f"{NAME}.json").exists()
    plan = cli(*args, "--plan", data_dir=data_dir)  # what the same command would now train
    assert re.search(r"; [1-9]\d* models finished", plan.stdout), plan.stdout
