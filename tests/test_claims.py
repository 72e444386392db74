"""tools/claims.py: the claims table's rules on results whose answers are known."""
import json
import os
import random
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import claims  # noqa: E402


def brute_force_rise(values):
    pairs = [(values[j] - values[i], i, j) for i in range(len(values))
             for j in range(i + 1, len(values))]
    best = max(pairs, default=None)
    return None if best is None or best[0] <= 0 else best


def test_largest_rise_closed_cases():
    assert claims.largest_rise([3, 1, 2, 0, 5]) == (3, 4)
    assert claims.largest_rise([5, 4, 3, 2]) is None
    assert claims.largest_rise([2, 2, 2]) is None
    assert claims.largest_rise([1.0, float("nan"), 0.5, 0.9]) == (2, 3)
    assert claims.largest_rise([]) is None


def test_largest_rise_matches_all_pairs():
    rng = random.Random(0)
    for _ in range(300):
        values = [rng.random() for _ in range(rng.randint(1, 12))]
        found, expected = claims.largest_rise(values), brute_force_rise(values)
        if expected is None:
            assert found is None
        else:
            assert values[found[1]] - values[found[0]] == pytest.approx(expected[0])


def test_running_median_removes_single_spikes():
    assert claims.running_median3([0.3, 0.1, 0.9, 0.1, 0.2]) == [0.3, 0.3, 0.1, 0.2, 0.2]
    assert claims.running_median3([1, 2]) == [1, 2]


def exp1_config(test_err, params, train_err=None):
    widths = [2, 4, 8, 16, 32, 64][:len(test_err)]
    return {"width": widths, "params": params, "test_err": test_err,
            "train_err": train_err or [0.0] * len(test_err)}


def rows_of(results):
    table = claims.claims_table(results).splitlines()
    assert table[:2] == ["| claim of the seed study | this run | holds? |", "|---|---|---|"]
    return {line.split(" | ")[0].lstrip("| "): line.split(" | ")[-1].rstrip(" |")
            for line in table[2:]}


def test_exp1_verdicts():
    params = [100, 500, 2000, 8000, 30000, 120000]
    exp1 = {
        # falls, rises by 0.06 to a peak at 2000 params, falls: holds
        "ResNet_SGD": exp1_config([0.5, 0.14, 0.20, 0.15, 0.12, 0.10], params),
        # a rise of 0.01 only: no peak
        "ResNet_Adam": exp1_config([0.5, 0.15, 0.16, 0.15, 0.14, 0.13], params),
        # a peak, but at 30000 params
        "CNN_SGD": exp1_config([0.5, 0.3, 0.2, 0.18, 0.25, 0.15], params),
        "CNN_Adam": exp1_config([0.5, 0.3, 0.2, 0.18, 0.17, 0.16], params),
    }
    rows = rows_of({"exp1": exp1})
    assert rows["peak test error at 10³–10⁴ parameters (Exp 1)"] == "in 1 of 4"
    table = claims.claims_table({"exp1": exp1})
    assert "ResNet SGD: 0.140 (w = 4) → 0.200 at w = 8, 2,000 params" in table
    assert "ResNet Adam: no peak" in table
    # ResNet: SGD 0.10 against Adam 0.13 holds; CNN: 0.15 against 0.16 is a tie
    assert rows["SGD beats Adam at large width (Exp 1)"] == "in 1 of 2"
    brief = claims.claims_table({"exp1": exp1}, brief=True)
    assert "ResNet SGD peak at w = 8 (2.0k); ResNet Adam peak at w = none" in brief
    assert "ResNet w = 64, Adam − SGD +0.030; CNN w = 64, Adam − SGD +0.010 | in 1 of 2 |" in brief
    exp1["CNN_Adam"]["test_err"][-1] = 0.20
    assert rows_of({"exp1": exp1})["SGD beats Adam at large width (Exp 1)"] == "yes"


def test_exp2_verdicts():
    epochs = list(range(1, 13))
    large = {"width": 64, "epoch": epochs,
             # learns (0.10 from epoch 3, with a spike at epoch 4 that the median removes),
             # rises to 0.25 while it fits the noise, falls again
             "test_err": [0.5, 0.2, 0.10, 0.40, 0.10, 0.10, 0.18, 0.25, 0.25, 0.20, 0.15, 0.15],
             "train_err": [0.7, 0.4, 0.3, 0.3, 0.2, 0.1, 0.05, 0.0, 0.0, 0.0, 0.0, 0.0]}
    critical = {"width": 12, "epoch": epochs,
                "test_err": [0.5, 0.3, 0.2, 0.15, 0.2, 0.15, 0.2, 0.14, 0.22, 0.13, 0.2, 0.15],
                "train_err": [0.2] * 12}
    results = {"exp2": {"critical": critical, "large": large}}
    rows = rows_of(results)
    assert rows["width 64 learns early and memorises late (Exp 2)"] == "yes"
    assert rows["width 12 fluctuates (Exp 2)"] == "yes"
    assert "first minimum 0.100 at epoch 4, peak 0.250 at epoch 8" in claims.claims_table(results)
    # never fits the noisy labels: not memorised
    large["train_err"] = [0.3] * 12
    assert rows_of(results)["width 64 learns early and memorises late (Exp 2)"] == "no"
    # a smooth curve at width 12 and a wobbling one at width 64
    critical["test_err"], large["test_err"] = large["test_err"], critical["test_err"]
    critical["test_err"] = [0.5 - 0.02 * i for i in range(12)]
    assert rows_of(results)["width 12 fluctuates (Exp 2)"] == "no"


def test_exp3_and_exp4_verdicts():
    exp3 = {"d": [2, 8, 9, 10], "nc2": [6.0, 2.0, 0.05, 0.04]}
    assert rows_of({"exp3": exp3})["NC2 drops to zero at d = 9 (Exp 3)"] == "yes"
    exp3["nc2"][2] = 2.5
    assert rows_of({"exp3": exp3})["NC2 drops to zero at d = 9 (Exp 3)"] == "no"
    cross_arch = [[0.0] * 4 for _ in range(4)]
    cross_arch[3][3] = 0.36
    exp4 = {"cross_arch": cross_arch,
            "cross_seed": {"L0": [0.98, 0.99, 0.97], "L1": [0.0] * 3,
                           "L2": [0.4, 0.5, 0.45], "L3": [0.5, 0.5, 0.45]}}
    rows = rows_of({"exp4": exp4})
    assert rows["cross-architecture CKA 0.34 at L3 (4A)"] == "yes"
    assert rows["cross-seed CKA 0.97 at L0 (4C)"] == "yes"
    assert rows["cross-seed CKA about 0.59 at L2 and L3 (4C)"] == "no, lower"


def test_command_line(tmp_path):
    quick = os.path.join(ROOT, "docs", "quick_results.json")
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "claims.py"), quick],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n| ") == 8  # every claim: Exp 1 twice, Exp 2 twice, 3, 4 thrice
    brief = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "claims.py"), "--brief",
                            quick], capture_output=True, text=True)
    assert brief.returncode == 0, brief.stderr
    verdicts = [line.rsplit(" | ", 1)[1] for line in done.stdout.splitlines()[2:]]
    assert [line.rsplit(" | ", 1)[1] for line in brief.stdout.splitlines()[2:]] == verdicts
    not_results = tmp_path / "other.json"
    not_results.write_text(json.dumps({"config": {}}))
    done = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "claims.py"), str(not_results)],
                          capture_output=True, text=True)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"claims.py: {not_results} is not a results file (no exp1, exp2, exp3 or exp4 entry)"]
    # `| head -0`: the reader gone before the table; exit 141, as a shell reports a
    # program that SIGPIPE ended, and no traceback
    closed = subprocess.Popen([sys.executable, os.path.join(ROOT, "tools", "claims.py"), quick],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    closed.stdout.close()
    assert closed.wait(timeout=60) == 141 and closed.stderr.read() == ""


def test_results_mixing_one_seed_and_several_are_refused_in_one_line():
    """An experiment written before replicates were kept, beside experiments of several
    seeds: no seed-by-seed verdict can be made for it, and the refusal is one line."""
    results = json.loads(open(os.path.join(ROOT, "docs", "quick_results.json")).read())
    results["exp3"].pop("replicates")
    assert claims.seed_count(results) == 2
    with pytest.raises(SystemExit) as refusal:
        claims.claims_table(results)
    assert str(refusal.value).startswith("claims.py: exp3 holds one seed's values")
    assert "\n" not in str(refusal.value)


def test_results_of_several_seeds_are_judged_seed_by_seed():
    exp3 = {"d": [8, 9, 10], "nc2": [1.0, 0.3, 1.0],  # the mean would say "no"
            "replicates": {"nc2": [[1.0, 1.0, 1.0], [0.05, 0.8, 0.05], [1.0, 1.0, 1.0]]}}
    widths, params = [2, 4, 8], [100, 2000, 8000]
    sgd_reps = [[0.5, 0.5, 0.5], [0.1, 0.1, 0.3], [0.3, 0.3, 0.1]]  # seed 2 has no peak
    series = {"width": widths, "params": params, "test_err": [0.5, 0.17, 0.23],
              "train_err": [0.0] * 3,
              "replicates": {"test_err": sgd_reps, "train_err": [[0.0] * 3] * 3}}
    table = claims.claims_table({"exp1": {"ResNet_SGD": series}, "exp3": exp3})
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table.splitlines()[2:]}
    assert rows["NC2 drops to zero at d = 9 (Exp 3)"].endswith("| in 2 of 3 seeds |")
    assert "replicate 1: 1.00 at d = 8, 0.80 at d = 9" in rows["NC2 drops to zero at d = 9 (Exp 3)"]
    peak = rows["peak test error at 10³–10⁴ parameters (Exp 1)"]
    assert peak.endswith("| in 2 of 3 seeds |")  # each seed's own curve: 0.1 -> 0.3 twice
    assert "replicate 2: ResNet SGD: no peak" in peak
    # the brief table lines each seed's numbers up under one label, with the same verdicts
    brief = claims.claims_table({"exp1": {"ResNet_SGD": series}, "exp3": exp3}, brief=True)
    lines = brief.splitlines()
    assert lines[0] == "| claim of the seed study | seeds 0 / 1 / 2 | holds? |"
    assert lines[2] == ("| peak test error at 10³–10⁴ parameters (Exp 1) | ResNet SGD peak at "
                        "w = 8 (8.0k) / 8 (8.0k) / none | in 2 of 3 seeds |")
    assert lines[-1] == ("| NC2 drops to zero at d = 9 (Exp 3) | NC2 at d = 8: 1.00 / 1.00 / 1.00; "
                         "NC2 at d = 9: 0.05 / 0.80 / 0.05 | in 2 of 3 seeds |")


def test_the_readme_claims_table_is_the_brief_table_of_the_published_results():
    # the README's table is the tool's, so it changes with docs/full's numbers and rules
    published = os.path.join(ROOT, "docs", "full", "neural_collapse_cka_results.json")
    if not os.path.exists(published):
        pytest.skip("no paper-scale results in this checkout")
    table = claims.claims_table(claims.load([published]), brief=True)
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    assert table.strip() in readme
