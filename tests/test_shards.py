"""One study over many processes: --shard I/N, --collect and --plan, the recipes of
docs/running.md (background processes, the GPUs of one box, a SLURM job array), and records that survive
kills and corruption. Every sharded study is checked number for number against an
unsharded run of the same settings."""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time

import pytest

import neural_collapse_cka as ncc
from conftest import (NAME, ROOT, SCRIPT, SLOW_SMOKE, cli, model_table, numbers_only,
                      once_per_session, refused)

SMOKE = ["--preset", "smoke"]
SLOW = SLOW_SMOKE


@pytest.fixture(scope="module")
def smoke_reference(smoke_run):
    return results_of(smoke_run[0])


@pytest.fixture(scope="module")
def slow_reference(slow_run):
    return results_of(slow_run[0])


def results_of(out):
    return numbers_only(json.loads((out / f"{NAME}.json").read_text()))


def readme_recipe(title, replacements):
    """The code block of docs/running.md that starts with '# Recipe: <title>', with each
    (old, new) replaced; every `old` must be there, so the test follows the document."""
    readme = open(os.path.join(ROOT, "docs", "running.md")).read()
    blocks = re.findall(r"```bash\n(# Recipe: .*?)```", readme, re.S)
    (block,) = [b for b in blocks if b.startswith(f"# Recipe: {title}")]
    for old, new in replacements:
        assert old in block, f"the recipe {title!r} no longer has {old!r}"
        block = block.replace(old, new)
    return block


def run_recipe(script, timeout=600):
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def run_smoke_recipe(title, out, data_dir, replacement, timeout=600):
    """Run the recipe `title` on the smoke preset into `out`, with one more
    (old, new) replacement (the shard count); it must succeed."""
    script = readme_recipe(title, [
        ("OUT=results", f"OUT={out}"),
        ('ARGS="--out $OUT', f'ARGS="--out $OUT --preset smoke --set DATA_DIR={data_dir}'),
        replacement])
    result = run_recipe(script, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


@pytest.fixture(scope="session")
def three_shards(tmp_path_factory, data_dir):
    """(out folder, completed recipe) of the background-processes recipe, three shards of
    the smoke preset and their collect, once per session (two tests read it)."""
    return once_per_session(tmp_path_factory, "three_shards", lambda out: run_smoke_recipe(
        "background processes", out, data_dir, ("N=8", "N=3")))


@pytest.mark.long(22)
def test_readme_background_recipe_three_concurrent_shards_equal_an_unsharded_run(
        three_shards, smoke_reference, smoke_run):
    out, result = three_shards
    for i in range(3):
        log = open(f"{out}-shard{i}.log").read().strip().splitlines()
        assert log[0].startswith(f"shard {i}/3:")
        assert any(line.startswith("plan: ") for line in log)
        assert "--collect" in log[-1] and "--shard" not in log[-1]
    assert "collect:" in result.stdout and "wrote" in result.stdout
    assert results_of(out) == smoke_reference
    assert model_table(out) == model_table(smoke_run[0])  # collect writes the table too
    # the shards shared out the work: no model was trained twice
    records = list((out / "records").glob("exp*/*.json"))
    assert len(records) == 31


def test_readme_gpu_box_recipe_two_shards(tmp_path, data_dir, smoke_reference):
    out = tmp_path / "out"
    run_smoke_recipe("every GPU of one box", out, data_dir, ("N=$(nvidia-smi -L | wc -l)", "N=2"))
    assert results_of(out) == smoke_reference


def _squeue_ids():
    out = subprocess.run(["squeue", "-h", "-o", "%A"], capture_output=True, text=True)
    return set(out.stdout.split())


def _slurm_reachable():
    if shutil.which("sbatch") is None:
        return False
    return subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0


@pytest.mark.long(30)
@pytest.mark.skipif(not _slurm_reachable(), reason="no SLURM here (sbatch not found, or no "
                    "controller answers sinfo); .ci/run starts a single-node one")
def test_readme_slurm_array_recipe_end_to_end(tmp_path, data_dir, smoke_reference):
    out = tmp_path / "out"
    result = run_smoke_recipe("a SLURM job array", out, data_dir, ("--array=0-15", "--array=0-1"),
                              timeout=60)
    collect_job = re.findall(r"\d+", result.stdout)[-1]
    deadline = time.time() + 600
    while time.time() < deadline and collect_job in _squeue_ids():
        time.sleep(0.2)
    state = subprocess.run(["scontrol", "show", "job", collect_job], capture_output=True,
                           text=True).stdout
    logs = "".join(p.read_text() for p in sorted(out.glob("slurm-*.log")))
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state + logs
    assert len(list(out.glob("slurm-*_*.log"))) == 2  # one log per array task
    assert results_of(out) == smoke_reference


def _wait_for_job(job, seconds):
    """`scontrol show job` once the job has left the queue and finished completing (its
    epilog may still run after squeue drops it), or can never start."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        state = subprocess.run(["scontrol", "show", "job", job], capture_output=True,
                               text=True).stdout
        if ((job not in _squeue_ids() and "JobState=COMPLETING" not in state)
                or "DependencyNeverSatisfied" in state):
            return state
        time.sleep(0.5)
    return state


def _epochs_for(seconds, args, data_dir, tmp_path):
    """Epochs that make the longest group of `args` train about `seconds` here, by the
    plan's estimate for 1000 epochs (within 2x of the run, as tested elsewhere)."""
    plan = cli(*args, "--set", "EPOCHS_EPOCH_WISE=1000", "--plan", "--out",
               str(tmp_path / "plan"), data_dir=data_dir)
    match = re.search(r"critical path .* ~(?:(\d+)m)?(\d+)s", plan.stdout)
    estimate = 60 * int(match.group(1) or 0) + int(match.group(2))
    return min(max(round(1000 * seconds / estimate), 1000), 100_000)


@pytest.mark.long(90)
@pytest.mark.skipif(not _slurm_reachable(), reason="no SLURM here (sbatch not found, or no "
                    "controller answers sinfo); .ci/run starts a single-node one")
def test_slurm_time_limit_recipe_requeues_stopped_tasks_until_they_are_done(
        tmp_path, data_dir):
    # Exp 2's two models in two groups, one per shard, each longer than a task's 20 s
    # (MINUTES=1, MARGIN=40: `timeout` stops each task well before SLURM's own limit)
    args = ["--preset", "smoke", "--experiments", "2", "--set", "REPLICATES=1",
            "--set", "CPU_GROUP_WIDTH=4", "--set", "SNAPSHOT_SECONDS=5"]
    epochs = _epochs_for(30, args, data_dir, tmp_path)
    args += ["--set", f"EPOCHS_EPOCH_WISE={epochs}"]
    out = tmp_path / "out"
    script = readme_recipe("SLURM tasks that outlast the time limit", [
        ("OUT=results", f"OUT={out}"),
        ('ARGS="--out $OUT', f'ARGS="--out $OUT --set DATA_DIR={data_dir} {" ".join(args)}'),
        ("N=16", "N=2"), ("MINUTES=240", "MINUTES=1"), ("MARGIN=120", "MARGIN=40")])
    result = run_recipe(script, timeout=60)
    assert result.returncode == 0, result.stderr
    collect_job = re.findall(r"\d+", result.stdout)[-1]
    waits_on = subprocess.run(["scontrol", "show", "job", collect_job], capture_output=True,
                              text=True).stdout
    array_job = re.search(r"Dependency=afterok:(\d+)", waits_on).group(1)
    try:
        state = _wait_for_job(collect_job, 900)
    finally:
        subprocess.run(["scancel", array_job, collect_job])  # none left if it failed
    logs = [p.read_text() for p in sorted(out.glob("slurm-*_*.log"))]
    assert "JobState=COMPLETED" in state and "ExitCode=0:0" in state, state + str(logs)
    assert len(logs) == 2  # one per task, whatever its restarts
    for i, log in enumerate(logs):
        assert "stopped by SIGTERM" in log, log
        assert "from the snapshot a stopped run left" in log, log
        assert log.rstrip().splitlines()[-1].startswith(f"shard {i}/2 finished"), log
    # both models trained to the end and collected. That a group resumed from its snapshot
    # ends with the numbers of one never stopped, the SIGTERM test of a plain run checks
    # (test_run_lifecycle.py); an unsharded reference here would double the training.
    rows = [r for r in model_table(out) if r["experiment"] == "exp2"]
    assert len(rows) == 2 and all(int(r["epochs_run"]) == epochs for r in rows), rows
    assert set(results_of(out)["exp2"]) >= {"critical", "large"}


def test_collect_with_a_shard_not_run_names_it_and_writes_nothing(tmp_path, data_dir,
                                                                  three_shards):
    # the records of shards 0 and 1 of 3, as if shard 2 had never run
    out = tmp_path / "out"
    shutil.copytree(three_shards[0] / "records", out / "records")
    groups, owner = _split(SMOKE, 3)
    saved = ncc.hyperparameters()
    try:
        ncc.apply_settings(ncc.PRESETS["smoke"])  # the settings that make the keys
        for (experiment, group), shard in zip(groups, owner):
            runs = ncc.ModelRuns(experiment, None, str(out / "records"), None,
                                 ncc.rounding_context("cpu"))
            for spec in group if shard == 2 else []:
                for path in runs._paths(spec, group):
                    os.remove(path)
    finally:
        ncc.apply_settings(saved)
    before = sorted(p.name for p in out.rglob("*"))
    result = cli(*SMOKE, "--out", str(out), "--collect", data_dir=data_dir)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    owned = [len(g) for (_, g), o in zip(groups, owner) if o == 2]
    assert f"{sum(owned)} of 31 models" in lines[0] and "shard 2 of 3" in lines[0]
    assert sorted(p.name for p in out.rglob("*")) == before  # nothing written


def _split(args, count):
    """(groups, owner of each) of the study `args` set up, as every shard computes it."""
    saved = ncc.hyperparameters()
    try:
        ncc.apply_settings(ncc.PRESETS[args[1]])
        groups = ncc.study_groups([1, 2, 3, 4], "cpu")
        return groups, ncc.assign_shards([ncc.group_cost(g) for _, g in groups], count)
    finally:
        ncc.apply_settings(saved)


@pytest.mark.parametrize("args, named", [
    (["--shard", "3/3"], "--shard"), (["--shard=-1/2"], "--shard"), (["--shard", "1/0"], "--shard"),
    (["--shard", "a/b"], "--shard"), (["--shard", "2"], "--shard"),
    (["--shard", "0/2", "--collect"], "--collect"), (["--shard", "0/2", "--plot-only", "x.json"],
                                                     "--plot-only"),
    (["--collect", "--plan"], "--collect"), (["--plot-only", "x.json", "--collect"], "--plot-only"),
])
def test_bad_shard_values_and_combinations_are_one_line_exit_2(tmp_path, data_dir, capsys,
                                                               args, named):
    out = tmp_path / "out"
    code, lines = refused(capsys, *SMOKE, "--out", str(out), *args, data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and named in lines[0]
    assert not out.exists()


def test_a_bad_shard_as_a_user_meets_it_is_one_line_exit_2(tmp_path, data_dir):
    out = tmp_path / "out"
    result = cli(*SMOKE, "--out", str(out), "--shard", "3/3", data_dir=data_dir)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--shard" in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_plan_trains_and_writes_nothing_and_names_every_shard(tmp_path, data_dir):
    out = tmp_path / "out"
    result = cli(*SMOKE, "--out", str(out), "--plan", "--shard", "0/3", data_dir=data_dir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("plan: 31 models in 10 groups")
    assert any("critical path" in line for line in lines)
    assert [line.split(":")[0].strip() for line in lines if "shard" in line
            and line.strip().startswith("shard")] == ["shard 0/3", "shard 1/3", "shard 2/3"]
    assert len([line for line in lines if "cost" in line and "exp" in line]) == 10
    assert not out.exists() and "[exp" not in result.stdout


@pytest.mark.long(30)
def test_killed_shard_resumes_to_the_numbers_of_an_unsharded_run(tmp_path, data_dir,
                                                                 slow_reference):
    out = tmp_path / "out"
    cmd = [sys.executable, SCRIPT, "--set", f"DATA_DIR={data_dir}", *SLOW, "--out", str(out),
           "--shard", "0/2"]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = out / "records"
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:
        if len(list(records.glob("exp*/*.json"))) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the kill should land before the shard ends"
    assert not (out / f"{NAME}.json").exists()
    for shard in ("0/2", "1/2"):
        result = cli(*SLOW, "--out", str(out), "--shard", shard, data_dir=data_dir)
        assert result.returncode == 0, result.stderr
    collect = cli(*SLOW, "--out", str(out), "--collect", data_dir=data_dir)
    assert collect.returncode == 0, collect.stderr
    assert collect.stdout.count("(cached)") == 16  # collect trains nothing
    assert results_of(out) == slow_reference


@pytest.mark.long(15)
def test_corrupt_record_json_and_weights_are_warned_about_and_retrained(
        tmp_path, data_dir, smoke_run, smoke_reference):
    out = tmp_path / "out"
    shutil.copytree(smoke_run[0] / "records", out / "records")
    json_path = next((out / "records" / "exp1").glob("*.json"))
    json_path.write_text(json_path.read_text()[:50])                 # truncated JSON
    weights_path = next((out / "records" / "exp3").glob("*.pt"))
    weights_path.write_bytes(b"not a torch file" * 10)               # corrupt weights
    again = cli(*SMOKE, "--out", str(out), "--experiments", "1,3", data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    warnings = again.stderr.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: record ") for w in warnings)
    assert json_path.name in warnings[0] and weights_path.stem in warnings[1]
    assert "Traceback" not in again.stderr
    # the damaged groups retrain (4 models of Exp 1, one replicate's 3 of Exp 3); the other
    # three groups of Exp 1 (12 models) and Exp 3's other replicate (3) are read back
    assert again.stdout.count("(cached)") == 15
    results = results_of(out)
    assert results["exp1"] == smoke_reference["exp1"]
    assert results["exp3"] == smoke_reference["exp3"]


def test_records_of_two_device_types_are_refused_by_collect(tmp_path, data_dir, exp3_run):
    out = tmp_path / "out"
    shutil.copytree(exp3_run[0], out)
    # one model's record as if a CUDA shard had written it: under the key of a CUDA
    # rounding context, saying so in its "rounding"
    saved = ncc.hyperparameters()
    try:
        ncc.apply_settings(ncc.PRESETS["smoke"])
        specs = ncc.generalized_nc_setup()["specs"]
        runs = {device: ncc.ModelRuns("exp3", None, str(out / "records"), None,
                                      ncc.rounding_context(device))
                for device in ("cpu", "cuda")}
        # the first model, in the group each device type trains it in
        (cpu_json, cpu_weights), (cuda_json, cuda_weights) = (
            runs[device]._paths(specs[0], next(g for g in runs[device].groups(specs)
                                               if specs[0] in g))
            for device in ("cpu", "cuda"))
        record = json.loads(open(cpu_json).read())
        assert record["rounding"] == runs["cpu"].rounding
        record["rounding"] = runs["cuda"].rounding
        open(cuda_json, "w").write(json.dumps(record))
        shutil.copy(cpu_weights, cuda_weights)
    finally:
        ncc.apply_settings(saved)
    result = cli(*SMOKE, "--out", str(out), "--experiments", "3", "--collect",
                 data_dir=data_dir)
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "cpu" in result.stderr and "cuda" in result.stderr


@pytest.mark.parametrize("preset", ["quick", "full"])
@pytest.mark.parametrize("count", [2, 3, 4, 8, 16, 64])
def test_shard_split_is_balanced_within_the_bound(preset, count):
    groups, owner = _split(["--preset", preset], count)
    costs = [ncc.group_cost(g) for _, g in groups]
    loads = [sum(c for c, o in zip(costs, owner) if o == k) for k in range(count)]
    assert sorted(set(owner)) == list(range(min(count, len(groups))))
    assert max(loads) <= max(1.15 * sum(costs) / count, max(costs))


def test_assign_shards_improves_on_longest_first():
    # longest first alone gives 3+2+2 | 3+2 = 7 | 5; the best split is 3+3 | 2+2+2
    owner = ncc.assign_shards([3, 3, 2, 2, 2], 2)
    loads = [sum(c for c, o in zip([3, 3, 2, 2, 2], owner) if o == k) for k in range(2)]
    assert sorted(loads) == [6, 6]
    assert ncc.assign_shards([5, 1, 1], 3) == [0, 1, 2]
    assert ncc.assign_shards([4, 4], 1) == [0, 0]
