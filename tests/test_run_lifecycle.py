"""A run as a newcomer meets it: the plan and estimate it starts with, progress lines while
a group trains, and a clean stop on SIGTERM that a rerun resumes from."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import neural_collapse_cka as ncc
from conftest import NAME, ROOT, SCRIPT, SLOW_SMOKE, cli, numbers_only, saved_records

SLOW = SLOW_SMOKE


def _process_stats():
    """(pid, the fields of /proc/<pid>/stat after the command name) of every process."""
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    yield int(entry), f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue


def _children(pid):
    """Pids whose parent is `pid` (Linux /proc)."""
    return [child for child, fields in _process_stats() if int(fields[1]) == pid]


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.long(25)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads worker pids from /proc")
def test_sigterm_stops_cleanly_with_exit_143_and_a_rerun_resumes(tmp_path, data_dir, slow_run):
    # a snapshot after every epoch, so the stop also finds groups in training to resume
    args = [*SLOW, "--set", "SNAPSHOT_SECONDS=0", "--out", str(tmp_path / "stopped")]
    out = tmp_path / "stopped"
    cmd = [sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    records = out / "records" / "exp1"

    def snapshots():  # the writer's temporary files start with ".tmp-"
        return list(records.glob("group_*.snapshot"))

    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if records.exists() and saved_records(records) and snapshots():
            break
        time.sleep(0.05)
    workers = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 143, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "SIGTERM" in lines[0] and "rerun the same command" in lines[0]
    assert 0 < len(saved_records(records)) < 16, "the stop should land mid-way"
    assert not (out / f"{NAME}.json").exists()
    deadline = time.time() + 10  # worker processes end with their parent
    while time.time() < deadline and any(map(_alive, workers)):
        time.sleep(0.1)
    assert not any(map(_alive, workers))
    stopped_in_training = snapshots()  # almost always one or two, for two workers

    resumed = cli(*args, data_dir=data_dir)
    assert resumed.returncode == 0 and resumed.stderr == "", resumed.stderr
    assert "(cached)" in resumed.stdout
    plan = resumed.stdout.splitlines()[1]
    assert re.search(rf"; {resumed.stdout.count('(cached)')} models finished and "
                     rf"{len(stopped_in_training)} groups? part-trained by earlier runs, the "
                     r"rest estimated \d+s on this machine", plan), plan
    resumes = resumed.stdout.count("from the snapshot a stopped run left")
    assert resumes == len(stopped_in_training)
    assert not snapshots(), "a finished group's snapshot is removed"
    # a stopped and resumed run gives the numbers of one that was never stopped
    ref = numbers_only(json.loads((slow_run[0] / f"{NAME}.json").read_text()))
    again = numbers_only(json.loads((out / f"{NAME}.json").read_text()))
    assert again["exp1"] == ref["exp1"]


def test_the_plan_of_a_finished_run_counts_its_models_as_done(data_dir, slow_run, tmp_path):
    result = cli(*SLOW_SMOKE, "--plan", "--out", str(slow_run[0]), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    line = result.stdout.splitlines()[0]
    total = int(re.match(r"plan: (\d+) models", line).group(1))
    assert f"; {total} models finished and 0 groups part-trained by earlier runs" in line
    # a record cut short counts as missing, as the run will find it: its group is to train
    out = tmp_path / "copy"
    shutil.copytree(slow_run[0] / "records", out / "records")
    cut = saved_records(out / "records" / "exp1")[0]
    cut.write_text(cut.read_text()[:40])
    result = cli(*SLOW_SMOKE, "--plan", "--out", str(out), data_dir=data_dir)
    assert result.returncode == 0 and not result.stderr, result.stderr
    finished = int(re.search(r"; (\d+) models finished", result.stdout).group(1))
    assert 0 < finished < total


class _Stopped(Exception):
    pass


def _raise_stopped(signum, frame):
    raise _Stopped(signum)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_while_a_group_is_stored_waits_for_the_block_then_stops(sig):
    import neural_collapse_cka as ncc
    before = signal.getsignal(sig)
    signal.signal(sig, _raise_stopped)
    stored = []
    try:
        with pytest.raises(_Stopped):
            with ncc.stops_deferred():
                os.kill(os.getpid(), sig)
                for name in ("model a", "model b"):  # a signal not deferred strikes here
                    time.sleep(0.01)
                    stored.append(name)
        assert stored == ["model a", "model b"]
        assert signal.getsignal(sig) is _raise_stopped  # the handler is back
        with ncc.stops_deferred():
            stored.append("model c")  # no signal: the block just runs
        assert stored[-1] == "model c"
    finally:
        signal.signal(sig, before)


SHRUG_OFF_UNDER_FIRE = """
import os, signal, subprocess, sys
import neural_collapse_cka as ncc
caught = []
signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
sender = subprocess.Popen([sys.executable, "-c", "import os, signal\\nwhile True: "
                           f"os.kill({os.getpid()}, signal.SIGTERM)"])
try:
    for _ in range(100_000):
        signal.signal(signal.SIGTERM, lambda signum, frame: caught.append(signum))
        try:
            ncc._exit_on_sigterm(signal.SIGTERM, None)  # as the first SIGTERM would
        except SystemExit:
            pass
finally:
    signal.signal(signal.SIGTERM, lambda signum, frame: None)
    sender.kill()
    sender.wait()
print("caught", len(caught))
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_sigterm_that_lands_while_a_worker_ends_prints_no_traceback():
    """A worker that SIGTERM ends, or whose pipe closes, stops acting on SIGTERM; its parent
    sends one to every worker still running when it closes them, so one may land while
    the handler changes. CPython prints "OSError: Signal 15 ignored due to race condition"
    for one that lands as a handler changes from a Python function to SIG_IGN: here
    another process sends SIGTERM without pause while the way out is taken 100,000 times,
    which with SIG_IGN printed that traceback 1 to 22 times in each of three runs (2-core
    AMD EPYC)."""
    done = subprocess.run([sys.executable, "-c", SHRUG_OFF_UNDER_FIRE], capture_output=True,
                          text=True, timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == "", done.stderr[-3000:]
    assert int(done.stdout.split()[-1]) > 0  # the signals did arrive throughout


PROGRESS = re.compile(r"^\[exp1\] (ResNet|CNN) .*\(\d+ models\): epoch (\d+) of 40; "
                      r"exp1 ~\d+(s|m\d\ds) left, run ~\d+(s|m\d\ds) left$")


@pytest.mark.parametrize("workers", ["0", "1"])  # in worker processes, and in this one
def test_progress_lines_within_a_group_in_a_log(tmp_path, data_dir, workers):
    result = cli("--preset", "smoke", "--experiments", "1", "--set", "EPOCHS_MODEL_WISE=40",
                 "--set", "REPLICATES=1", "--set", "PROGRESS_SECONDS=0.2", "--set", f"WORKERS={workers}",
                 "--out", str(tmp_path), data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    assert "\r" not in result.stdout  # a log gets plain lines, never a redrawn bar
    epochs = [int(m.group(2)) for m in map(PROGRESS.match, result.stdout.splitlines()) if m]
    assert len(epochs) >= 3, result.stdout
    assert all(0 < e <= 40 for e in epochs) and len(set(epochs)) >= 2


def test_a_progress_line_names_its_groups_replicate_when_a_study_has_several(monkeypatch):
    """Each replicate's models train in groups of their own: two in training at once must
    not print the same line."""
    spec = {"arch": "ResNet", "optimizer": "SGD", "width": 64, "d": 9}
    first, second = [dict(spec, replicate=1)], [dict(spec, replicate=2)]
    monkeypatch.setattr(ncc, "REPLICATES", 3)
    assert ncc._describe_group(first) == "ResNet SGD w=64 d=9 rep=1 (1 models)"
    assert ncc._describe_group(second) == "ResNet SGD w=64 d=9 rep=2 (1 models)"
    cka_model = {"arch": "ResNet", "optimizer": "Adam", "width": 32, "seed": 42}
    assert ncc._describe_group([cka_model]) == "ResNet Adam w=32 (1 models)"  # no replicate
    monkeypatch.setattr(ncc, "REPLICATES", 1)
    assert ncc._describe_group([dict(spec, replicate=0)]) == "ResNet SGD w=64 d=9 (1 models)"


def _estimate_and_wall(args, data_dir, out):
    """(the run's output lines, the plan's estimate, the seconds from the plan line to the
    end of the run)."""
    cmd = [sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *args, "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    lines, estimate = [], None
    for line in proc.stdout:
        lines.append(line)
        match = re.match(r"plan: .* estimated (?:(\d+)m)?(\d+)s on this machine", line)
        if match:
            start = time.time()
            estimate = 60 * int(match.group(1) or 0) + int(match.group(2))
    proc.wait()
    assert proc.returncode == 0, proc.stderr.read()
    return lines, estimate, time.time() - start


@pytest.mark.long(30)
def test_plan_comes_first_and_its_estimate_is_within_2x_of_the_run(tmp_path, data_dir):
    args = ["--preset", "smoke", "--set", "EPOCHS_MODEL_WISE=20", "--set", "EPOCHS_GEN_NC=20"]
    # a noisy machine may be slow once: a second try, and a ratio either way within 2x
    for attempt in ("a", "b"):
        lines, estimate, wall = _estimate_and_wall(args, data_dir, tmp_path / attempt)
        assert lines[0].startswith("run: preset smoke") and lines[1].startswith("plan: ")
        assert lines[2].strip().startswith("exp1: 16 models in 4 groups, ~")
        if 0.5 <= estimate / wall <= 2:
            break
    assert 0.5 <= estimate / wall <= 2, (estimate, wall)


# Exp 2 alone, one model at width 2 and one at 128: once w = 2 is done, its worker idles
# while w = 128 trains on (the state in which a stop sent to the whole group used to hang)
TWO_WORKERS = ["--preset", "smoke", "--experiments", "2", "--set", "REPLICATES=1",
               "--set", 'EPOCH_WISE_WIDTHS={"critical": 2, "large": 128}',
               "--set", "EPOCHS_EPOCH_WISE=100", "--set", "SNAPSHOT_SECONDS=0"]


def _group_members(pgid):
    """Pids of the live (not zombie) processes of process group `pgid` (Linux /proc)."""
    return [pid for pid, fields in _process_stats() if int(fields[2]) == pgid
            and fields[0] != "Z"]


@pytest.fixture
def own_group(tmp_path, data_dir):
    """A TWO_WORKERS run into tmp_path, in a process group of its own (killed at the end,
    so that a failing test leaves nothing running)."""
    cmd = [sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *TWO_WORKERS,
           "--out", str(tmp_path)]
    # Ctrl-C's default action, as in a terminal: a shell's background job (`cmd &` in a
    # script, as CI may be run) starts with SIGINT ignored, and its children inherit that
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    yield proc
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.communicate()


def _wait_for(condition, proc, seconds=240):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not condition():
        time.sleep(0.05)
    assert proc.poll() is None and condition(), "the run never reached the state to test"


@pytest.mark.long(30)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_sent_to_the_whole_process_group_while_a_worker_idles(tmp_path, own_group, sig):
    proc = own_group
    records = tmp_path / "records" / "exp2"
    _wait_for(lambda: records.exists() and saved_records(records), proc)
    time.sleep(0.5)  # w = 2's worker is back waiting for a call that never comes
    os.killpg(proc.pid, sig)  # as `timeout`, a cluster's time limit or `docker stop` do
    stopped = time.time()
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == (143 if sig == signal.SIGTERM else 130), stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "rerun the same command" in lines[0], stderr
    assert len(saved_records(records)) == 1  # w = 128 was still training
    while _group_members(proc.pid) and time.time() < stopped + 15:
        time.sleep(0.1)
    assert not _group_members(proc.pid), "a process outlived the run by 15 s"
    assert not list(tmp_path.rglob(".tmp-*")), "a half-written file was left behind"


def _spawned_workers(parent):
    """Pids of `parent`'s worker processes (multiprocessing's spawn; not its resource
    tracker)."""
    found = []
    for pid in _children(parent):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"spawn_main" in f.read():
                    found.append(pid)
        except OSError:
            pass
    return found


@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads processes from /proc")
def test_a_worker_killed_in_training_ends_the_run_with_one_line(own_group):
    proc = own_group
    _wait_for(lambda: len(_spawned_workers(proc.pid)) == 2, proc)
    time.sleep(2)
    # the first worker started takes the first call, w = 128 (longest first): it trains
    os.kill(min(_spawned_workers(proc.pid)), signal.SIGKILL)  # as an out-of-memory kill
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "exit code -9" in lines[0] and "resume" in lines[0], stderr
    deadline = time.time() + 15
    while _group_members(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _group_members(proc.pid)


def test_one_set_of_workers_serves_every_experiment_of_a_run(tiny, monkeypatch):
    started = []

    class CountedWorkers(ncc.Workers):
        def __init__(self, count, *args):
            started.append(count)
            super().__init__(count, *args)

    monkeypatch.setattr(ncc, "Workers", CountedWorkers)
    saved = ncc.hyperparameters()
    try:
        # smoke's Exp 1 and Exp 4 each train two groups, so each needs workers
        ncc.apply_settings({**ncc.PRESETS["smoke"], "WORKERS": 2})
        groups = ncc.study_groups([1, 4], "cpu")
        assert [name for name, _ in groups].count("exp1") >= 2
        assert [name for name, _ in groups].count("exp4") >= 2
        lines = []
        ncc.run_study([1, 4], str(tiny / "out"), torch.device("cpu"), "smoke", lines.append)
    finally:
        ncc.apply_settings(saved)
    assert started == [2]  # one start of two workers, not one per experiment
    assert sum(" done" in line for line in lines) == 16 + 5


@pytest.mark.long(20)
@pytest.mark.skipif(not os.path.isdir("/proc"), reason="reads worker pids from /proc")
def test_a_ctrl_c_that_strikes_workers_as_they_start_is_shrugged_off(own_group):
    # the moment a worker appears it is still loading the libraries (seconds): a Ctrl-C
    # there used to print its traceback and end the run with a dead worker
    proc = own_group
    struck = set()
    deadline = time.time() + 120
    while len(struck) < 2 and time.time() < deadline and proc.poll() is None:
        for pid in set(_spawned_workers(proc.pid)) - struck:
            os.kill(pid, signal.SIGINT)
            struck.add(pid)
        time.sleep(0.002)
    assert len(struck) == 2, "the run never started its two workers"
    records = Path(proc.args[proc.args.index("--out") + 1]) / "records" / "exp2"
    _wait_for(lambda: records.exists() and saved_records(records), proc)  # trains on
    os.killpg(proc.pid, signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=15)
    assert proc.returncode == 143 and "Traceback" not in stderr, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.long(20)
def test_a_ctrl_c_at_any_moment_of_a_run_is_one_line_and_exit_130(tmp_path, data_dir):
    # a Ctrl-C reaches the whole process group, as in a terminal, at moments spread over a
    # run's first seconds (the libraries loading, the checks, the plan's probe, workers
    # starting, training); the runs go side by side, so where each lands varies by machine
    delays = [0.5, 1.5, 2.5, 3.5, 5, 7, 9]
    runs = []
    for i, delay in enumerate(delays):
        cmd = [sys.executable, SCRIPT, "--preset", "smoke", "--set", f"DATA_DIR={data_dir}",
               "--out", str(tmp_path / str(i))]
        runs.append(subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            start_new_session=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)))
    start = time.time()
    try:
        for proc, delay in zip(runs, delays):
            time.sleep(max(start + delay - time.time(), 0))
            os.killpg(proc.pid, signal.SIGINT)
        for proc, delay in zip(runs, delays):
            _, stderr = proc.communicate(timeout=60)
            lines = stderr.strip().splitlines()
            assert proc.returncode == 130 and "Traceback" not in stderr, (delay, stderr)
            assert len(lines) == 1, (delay, stderr)
            assert lines[0].startswith("stopped by Ctrl-C"), (delay, stderr)
    finally:
        for proc in runs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.communicate()
    assert not list(tmp_path.rglob(".tmp-*")), "a half-written file was left behind"
