"""`--compare`: does a results file reproduce the committed reference of its preset? Each
headline number in or out of the reference seeds' spread; exit 0, 1, or 2 when the two
cannot be compared."""
import json
import os

import numpy as np
import pytest

import neural_collapse_cka as ncc
from conftest import ROOT, cli, refused

REFERENCES = {preset: os.path.join(ROOT, path) for preset, path in ncc.REFERENCES.items()}


def compare(capsys, *args):
    """(exit code, stdout lines) of `main(["--compare", ...])` in this process."""
    capsys.readouterr()
    code = ncc.main(["--compare", *args])
    return code, capsys.readouterr().out.strip().splitlines()


@pytest.mark.parametrize("preset", sorted(REFERENCES))
def test_a_reference_reproduces_itself(capsys, preset):
    code, lines = compare(capsys, REFERENCES[preset])
    assert code == 0
    assert all(line.startswith("in  ") for line in lines[:-1]) and len(lines) > 40
    assert lines[-1].startswith(f"{len(lines) - 1} of {len(lines) - 1} headline numbers")


def test_tripled_exp1_test_errors_are_out_and_named(tmp_path, data_dir):
    results = json.loads(open(REFERENCES["full"]).read())
    for series in results["exp1"].values():
        series["test_err"] = [3 * v for v in series["test_err"]]
        series["replicates"]["test_err"] = [[3 * v for v in seeds]
                                            for seeds in series["replicates"]["test_err"]]
    path = tmp_path / "tripled.json"
    path.write_text(json.dumps(results))
    done = cli("--compare", str(path), data_dir=data_dir)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.strip().splitlines()
    out = [line for line in lines if line.startswith("OUT")]
    assert out and all(line.startswith("OUT exp1 ") for line in out)
    assert lines[-1].endswith("out: exp1")


def test_every_seed_of_a_reference_reproduces_the_others():
    """Each seed of each committed reference, held out, lies within the spread of the
    others (with two seeds: within the floors around the other one)."""
    tried = 0
    for path in REFERENCES.values():
        numbers = ncc.headline_numbers(json.loads(open(path).read()))
        seeds = max(len(values) for _, values in numbers.values())
        for held in range(seeds if seeds > 1 else 0):
            mine = {key: (kind, [values[held]]) for key, (kind, values) in numbers.items()
                    if len(values) == seeds}
            others = {key: (kind, values[:held] + values[held + 1:])
                      for key, (kind, values) in numbers.items() if len(values) == seeds}
            rows = ncc.compare_numbers(mine, others)
            assert rows and [r for r in rows if not r[2]] == [], path
            tried += 1
    assert tried >= 5  # quick has two seeds, full three


def test_a_value_is_in_within_twice_the_range_four_pooled_deviations_or_the_floor():
    flat = {("exp1", f"flat {i}"): ("error", [0.5, 0.5]) for i in range(8)}
    reference = {("exp1", "a"): ("error", [0.10, 0.20]), ("exp1", "d"): ("error", [0.3, 0.3]),
                 ("exp2", "b"): ("error", [0.10]), ("exp3", "c"): ("nc", [2.0, 2.0]), **flat}
    # exp1's errors: one seed's deviation pooled over its 10 numbers is sqrt(0.005 / 10)

    def verdicts(a, d, b, c):
        mine = {("exp1", "a"): ("error", [a]), ("exp1", "d"): ("error", [d]),
                ("exp2", "b"): ("error", [b]), ("exp3", "c"): ("nc", [c])}
        return [bool(ok) for *_, ok, _ in ncc.compare_numbers(mine, reference)]
    pooled = 4 * np.sqrt(0.005 / 10)
    # a: 0.15 +- twice its range 0.10; d: 0.3 +- four pooled deviations; b: the floor
    # 0.05 (nothing to pool in exp2); c: a factor of 1.5
    assert verdicts(0.34, 0.3 + pooled - 1e-6, 0.149, 2.99) == [True] * 4
    assert verdicts(0.36, 0.3 + pooled + 1e-6, 0.151, 3.01) == [False] * 4
    assert verdicts(-0.04, 0.3 - pooled + 1e-6, 0.051, 1.34) == [True] * 4


def test_files_that_cannot_be_compared_are_one_line_and_exit_2(tmp_path, capsys, data_dir):
    code, lines = refused(capsys, "--compare", REFERENCES["quick"], "--reference",
                          REFERENCES["full"], data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "compare runs of one preset" in lines[0], lines
    results = json.loads(open(REFERENCES["quick"]).read())
    results["config"]["EPOCHS_MODEL_WISE"] = 7
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    code, lines = refused(capsys, "--compare", str(path), data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "in EPOCHS_MODEL_WISE: " in lines[0], lines


def test_a_run_of_some_experiments_and_one_seed_is_compared_on_those(tmp_path, capsys):
    results = json.loads(open(REFERENCES["quick"]).read())
    for name in ("exp1", "exp2", "exp4"):
        results.pop(name)
    results["exp3"]["replicates"]["nc2"] = [seeds[:1] for seeds in results["exp3"]["replicates"]["nc2"]]
    results["config"]["REPLICATES"] = 1
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    code, lines = compare(capsys, str(path))
    assert code == 0 and len(lines) == 1 + 8  # NC2 at each of the 8 d, then the summary
    assert all(" exp3 NC2 at d = " in line for line in lines[:-1])
    assert lines[-1].endswith("not in yours, so not compared: exp1, exp2, exp4")


def test_results_written_before_replicates_were_kept_are_compared_on_their_one_seed(
        tmp_path, capsys):
    """Older versions wrote each point's values without "replicates" (as the H100 run of
    Exp 3 in docs/ has them): --compare reads those, as one seed."""
    results = json.loads(open(REFERENCES["quick"]).read())
    for series in [*results["exp1"].values(), *results["exp2"].values(), results["exp3"]]:
        series.pop("replicates")
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    code, lines = compare(capsys, str(path))
    assert code == 0 and len(lines) > 40 and all(line.startswith("in  ") for line in lines[:-1])
    assert "yours 6.27," in next(line for line in lines if "NC2 at d = 2:" in line)  # its mean
    code, lines = compare(capsys, os.path.join(ROOT, "docs", "full_exp3_h100.json"))
    assert len(lines) == 1 + 8 and all(" exp3 NC2 at d = " in line for line in lines[:-1])


def test_a_file_whose_headline_numbers_cannot_be_read_is_one_line_and_exit_2(
        tmp_path, capsys, data_dir):
    """A shape the figure can draw (an empty series) but --compare cannot read: refused in
    one line that names the experiment, not a traceback."""
    results = json.loads(open(REFERENCES["quick"]).read())
    next(iter(results["exp1"].values()))["width"] = []
    path = tmp_path / "r.json"
    path.write_text(json.dumps(results))
    code, lines = refused(capsys, "--compare", str(path), data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "exp1 is not in the shape" in lines[0], lines


def test_an_experiment_the_reference_lacks_or_no_file_is_exit_2(tmp_path, capsys, data_dir):
    reference = json.loads(open(REFERENCES["quick"]).read())
    reference.pop("exp3")
    lacking = tmp_path / "ref.json"
    lacking.write_text(json.dumps(reference))
    code, lines = refused(capsys, "--compare", REFERENCES["quick"], "--reference",
                          str(lacking), data_dir=data_dir)
    assert code == 2 and len(lines) == 1 and "exp3" in lines[0]
    for args in (["--compare", str(tmp_path / "missing.json")],
                 ["--reference", REFERENCES["quick"]],
                 ["--compare", REFERENCES["quick"], "--plan"]):
        code, lines = refused(capsys, *args, data_dir=data_dir)
        assert code == 2 and len(lines) == 1, (args, lines)
    smoke = json.loads(open(REFERENCES["quick"]).read())
    smoke["config"]["preset"] = "smoke"
    path = tmp_path / "smoke.json"
    path.write_text(json.dumps(smoke))
    done = cli("--compare", str(path), data_dir=data_dir)  # as a user meets it
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1
    assert "--reference" in done.stderr and "Traceback" not in done.stderr


def test_exp2s_claims_are_headline_numbers_by_their_definitions(capsys, tmp_path):
    """Each claim's numbers are judged: for Exp 2 also the epoch its training error first
    falls to 0.01 or below (the noisy labels fitted) and the median change of its test
    error between neighbouring checkpoints over the second half (width 12 fluctuates)."""
    results = json.loads(open(REFERENCES["quick"]).read())
    numbers = ncc.headline_numbers(results)
    for series in results["exp2"].values():
        w = series["width"]
        epochs = series["epoch"]
        for seed, (test_err, train_err) in enumerate(zip(zip(*series["replicates"]["test_err"]),
                                                         zip(*series["replicates"]["train_err"]))):
            fitted = [e for e, t in zip(epochs, train_err) if t <= 0.01]
            _, fit = numbers[("exp2", f"w = {w} first epoch with training error <= 0.01")]
            assert fit[seed] == fitted[0] if fitted else np.isnan(fit[seed])
            late = test_err[len(test_err) // 2:]
            changes = sorted(abs(b - a) for a, b in zip(late, late[1:]))
            middle = (changes[(len(changes) - 1) // 2] + changes[len(changes) // 2]) / 2
            _, fluctuation = numbers[("exp2", f"w = {w} median change of test error between "
                                      "checkpoints, second half")]
            assert fluctuation[seed] == pytest.approx(middle, abs=1e-15)
    # quick's width 12 never fits the noisy labels in 300 epochs: a run in which it does
    # (every training error 0 from epoch 100) is out, and the line says which number
    critical = results["exp2"]["critical"]
    critical["replicates"]["train_err"] = [
        [0.0] * len(seeds) if epoch >= 100 else seeds
        for epoch, seeds in zip(critical["epoch"], critical["replicates"]["train_err"])]
    path = tmp_path / "memorises.json"
    path.write_text(json.dumps(results))
    code, lines = compare(capsys, str(path))
    assert code == 1
    assert [line.split(":")[0] for line in lines if line.startswith("OUT")] == [
        "OUT exp2 w = 12 first epoch with training error <= 0.01"]
