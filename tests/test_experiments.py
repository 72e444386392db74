"""Training, drivers and records, called as functions."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

import neural_collapse_cka as ncc
from conftest import ROOT


def test_derived_seeds_depend_on_every_part_and_nothing_else():
    a = ncc.derive_seed("exp1", "ResNet", "SGD", 8, 0)
    assert a == ncc.derive_seed("exp1", "ResNet", "SGD", 8, 0)
    others = {ncc.derive_seed("exp1", "ResNet", "SGD", 8, 1),
              ncc.derive_seed("exp1", "ResNet", "Adam", 8, 0),
              ncc.derive_seed("exp1", "CNN", "SGD", 8, 0),
              ncc.derive_seed("exp3", "ResNet", "SGD", 8, 0),
              ncc.derive_seed("exp1", "ResNet", "SGD", 16, 0)}
    assert a not in others and len(others) == 5


def test_log_spaced_epochs_are_dense_early_and_at_least_60():
    grid = ncc.log_spaced_epochs(15000, 60)
    assert len(grid) >= 60 and grid[0] == 1 and grid[-1] == 15000
    assert all(b > a for a, b in zip(grid, grid[1:]))
    assert grid[:10] == list(range(1, 11))  # every early epoch
    assert ncc.log_spaced_epochs(7, 60) == list(range(1, 8))


def test_stratified_subset_keeps_exactly_the_noise_fraction(data_cache):
    d = ncc.get_data(cache_path=data_cache)
    idx = ncc.stratified_subset(d["noise_mask"].numpy(), 1000, 42)
    assert len(np.unique(idx)) == 1000
    assert d["noise_mask"].numpy()[idx].sum() == 200


def test_training_is_deterministic_and_changes_the_weights(tiny):
    data = ncc.experiment_data(torch.device("cpu"))
    models = []
    for _ in range(2):
        model = ncc.make_model("CNN", 3, seed=5)
        ncc.train_model(model, data, "SGD", 2, seed=5)
        models.append(torch.cat([p.flatten() for p in model.parameters()]))
    assert torch.equal(models[0], models[1])
    init = torch.cat([p.flatten() for p in ncc.make_model("CNN", 3, seed=5).parameters()])
    assert not torch.equal(init, models[0])


def test_cosine_schedule_anneals_sgd_to_zero():
    model = ncc.ResNet1D(2)
    opt, scheduler = ncc.make_optimizer(model.parameters(), "SGD", 10)
    for _ in range(10):
        opt.step()
        scheduler.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    adam, none = ncc.make_optimizer(model.parameters(), "Adam", 10)
    assert none is None and adam.param_groups[0]["lr"] == ncc.ADAM_LR


def test_diverging_model_is_recorded_and_the_sweep_goes_on(tiny, monkeypatch):
    monkeypatch.setattr(ncc, "SGD_LR", 1e30)
    out = ncc.run_model_wise_complete(epochs=2, widths=[2, 3], archs=("ResNet",),
                                      optimizers=("SGD", "Adam"), log=None)
    assert out["ResNet_SGD"]["diverged"] == [True, True]
    assert out["ResNet_SGD"]["test_err"] == [None, None]  # NaN is stored as null
    assert out["ResNet_Adam"]["diverged"] == [False, False]
    assert all(0 <= v <= 1 for v in out["ResNet_Adam"]["test_err"])


def test_exp1_driver_alone_returns_the_spec_structure(tiny):
    out = ncc.run_model_wise_complete(epochs=1, widths=[2, 3], log=None)
    assert set(out) == {"ResNet_SGD", "ResNet_Adam", "CNN_SGD", "CNN_Adam"}
    series = out["CNN_Adam"]
    assert series["width"] == [2, 3]
    assert series["params"] == [21 * w * w + 35 * w for w in (2, 3)]
    for key in ("train_err", "test_err", "nc1", "nc1_pinv", "nc2", "nc3", "nc4"):
        assert len(series[key]) == 2
    assert set(series["nc_test"]) >= {"nc1", "nc2", "nc3", "nc4"}
    json.dumps(out)


def test_exp2_exp3_exp4_drivers_alone(tiny):
    exp2 = ncc.run_epoch_wise_dynamics(epochs=5, widths={"critical": 2, "large": 3}, log=None)
    assert exp2["critical"]["width"] == 2 and exp2["large"]["epoch"] == [1, 2, 3, 4, 5]
    assert len(exp2["large"]["nc1"]) == 5
    exp3 = ncc.run_generalized_nc(epochs=1, dims=[2, 9], width=3, log=None)
    assert exp3["d"] == [2, 9] and len(exp3["nc2"]) == 2
    records = tiny / "records"
    exp4 = ncc.run_cka_experiment(epochs=3, small_width=2, large_width=3, width=2,
                                  seeds=[1, 2, 3], drift_epochs=[1, 3], log=None,
                                  records_dir=str(records))
    assert exp4["layers"] == ["L0", "L1", "L2", "L3"]
    assert np.array(exp4["cross_arch"]).shape == (4, 4)
    assert exp4["epochs"] == [1, 3]
    assert all(v == pytest.approx(1.0) for v in (exp4["drift"][l][0] for l in exp4["layers"]))
    assert exp4["seed_pairs"] == [[1, 2], [1, 3], [2, 3]]
    assert all(len(v) == 3 and all(0 <= c <= 1 for c in v) for v in exp4["cross_seed"].values())
    json.dumps([exp2, exp3, exp4])
    # records time the checkpoint measures (4B's drift) apart from the training
    saved = [json.loads(p.read_text()) for p in (records / "exp4").glob("*.json")]
    assert len(saved) == 5 and sum(bool(r["checkpoints"]) for r in saved) == 1
    for record in saved:
        if record["checkpoints"]:
            assert 0 < record["checkpoint_seconds"] < record["seconds"]
        else:
            assert record["checkpoint_seconds"] == 0


def test_negative_epochs_or_empty_widths_are_refused(tiny):
    with pytest.raises(ValueError, match="epochs"):
        ncc.run_model_wise_complete(epochs=-1, log=None)
    with pytest.raises(ValueError, match="widths"):
        ncc.run_model_wise_complete(epochs=1, widths=[], log=None)


def test_records_are_reused_and_a_changed_hyperparameter_retrains(tiny, monkeypatch):
    lines = []
    records = str(tiny / "records")
    kwargs = dict(epochs=1, widths=[2], archs=("ResNet",), optimizers=("SGD",),
                  records_dir=records, log=lines.append)
    first = ncc.run_model_wise_complete(**kwargs)
    second = ncc.run_model_wise_complete(**kwargs)
    assert "cached" not in lines[0] and "cached" in lines[1]
    assert first["ResNet_SGD"]["test_err"] == second["ResNet_SGD"]["test_err"]
    monkeypatch.setattr(ncc, "SGD_WEIGHT_DECAY", 1e-3)
    ncc.run_model_wise_complete(**kwargs)
    assert "cached" not in lines[2]


def test_check_setting_types_and_ranges():
    assert ncc.check_setting("WIDTHS", [2, 8]) == [2, 8]
    assert ncc.check_setting("SGD_LR", 1) == 1.0
    assert ncc.check_setting("TRAIN_SUBSET", None) is None
    for name, value in [("WIDTHS", []), ("WIDTHS", "abc"), ("WIDTHS", [2, 0]),
                        ("EPOCHS_CKA", -5), ("EPOCHS_CKA", 2.5), ("EPOCHS_CKA", True),
                        ("LABEL_NOISE", 1.5), ("SGD_LR", 0), ("NO_SUCH", 1),
                        ("EPOCH_WISE_WIDTHS", {"a": "b"}), ("NUM_CLASSES", 5)]:
        with pytest.raises(ValueError):
            ncc.check_setting(name, value)


def test_worker_processes_give_the_results_of_one_process(tiny, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the workers' thread count, so rounding is the same
    try:
        results = []
        for workers in (2, 1):
            monkeypatch.setattr(ncc, "WORKERS", workers)
            lines = []
            results.append(ncc.run_model_wise_complete(epochs=2, widths=[2, 3],
                                                       archs=("CNN",), log=lines.append))
            assert len(lines) == 4
    finally:
        torch.set_num_threads(threads)
    for series in results:
        for s in series.values():
            s.pop("seconds")
            s["replicates"].pop("seconds")
    assert results[0] == results[1]


def test_more_workers_than_cores_give_the_numbers_of_two(tiny, monkeypatch):
    monkeypatch.setattr(ncc, "CPU_GROUP_WIDTH", 2)  # three groups: one pair per width
    results = []
    for workers in (4, 2):
        monkeypatch.setattr(ncc, "WORKERS", workers)
        results.append(ncc.run_model_wise_complete(epochs=2, widths=[2, 3, 4], archs=("CNN",),
                                                   log=None))
    for series in results:
        for s in series.values():
            for tree in (s, s["replicates"], s["std"]):
                tree.pop("seconds")
    assert results[0] == results[1]


def test_the_default_worker_count_follows_the_cpu_affinity(tmp_path):
    taskset = shutil.which("taskset")
    if taskset is None:
        pytest.skip("taskset is not installed")
    probe = ("import neural_collapse_cka as ncc, os; "
             "print(len(os.sched_getaffinity(0)), ncc.worker_count('cpu'))")
    done = subprocess.run([taskset, "-c", "0", sys.executable, "-c", probe], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["1", "1"]
    plan = subprocess.run([taskset, "-c", "0", sys.executable, "neural_collapse_cka.py",
                           "--preset", "smoke", "--plan", "--out", str(tmp_path)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert plan.returncode == 0, plan.stderr
    assert " on cpu, 1 worker process;" in plan.stdout.splitlines()[0]


def _partition(groups):
    return [[(s["arch"], s["optimizer"], s["width"], s.get("replicate", 0)) for s in g]
            for g in groups]


@pytest.mark.parametrize("replicates", [1, 2])
def test_cpu_groups_fuse_neighbouring_widths_within_the_width_budget(replicates):
    widths = [2, 4, 6, 8, 10, 12, 16, 24, 32, 48, 64]
    specs = [{"arch": a, "optimizer": o, "width": w, "epochs": 5, "replicate": r}
             for a in ("ResNet", "CNN") for o in ("SGD", "Adam") for w in widths[::-1]
             for r in range(replicates)]
    groups = ncc.ModelRuns("exp1", {"x_train": torch.zeros(4, 40)}, log=None).groups(specs)
    assert sorted(map(str, specs)) == sorted(str(s) for g in groups for s in g)
    budget = ncc.CPU_GROUP_WIDTH
    for group in groups:
        assert len({s["arch"] for s in group}) == 1
        assert len({s["replicate"] for s in group}) == 1  # a replicate's models among themselves
        group_widths = [s["width"] for s in group]
        pair = len(group) == 2 and len(set(group_widths)) == 1
        assert pair or len(group) == 1 or len(group) * max(group_widths) <= budget
        # each optimizer's models in one run, so one optimizer per run
        names = [s["optimizer"] for s in group]
        assert names == sorted(names)
    # maximal: the next group's narrowest model of the architecture would not have fitted
    for group, after in zip(groups, groups[1:]):
        if (group[0]["arch"], group[0]["replicate"]) == (after[0]["arch"], after[0]["replicate"]):
            width, next_width = max(s["width"] for s in group), min(s["width"] for s in after)
            assert width <= next_width
            assert (len(group) + 1) * next_width > budget
            assert not (len(group) == 1 and width == next_width)  # that would pair up
    # each replicate's groups are those of a study with that replicate alone
    for r in range(replicates):
        alone = [s for s in specs if s["replicate"] == r]
        assert sorted(map(str, (g for g in groups if g[0]["replicate"] == r))) == sorted(
            map(str, ncc.ModelRuns("exp1", {"x_train": torch.zeros(4, 40)}, log=None).groups(
                alone)))
    if replicates == 1:  # the groups the docs name
        resnet = [sorted((s["width"], s["optimizer"]) for s in g) for g in groups
                  if g[0]["arch"] == "ResNet"]
        both = ("Adam", "SGD")
        assert resnet == ([[(w, o) for w in (2, 4, 6, 8) for o in both]]
                          + [[(w, o) for w in (10, 12) for o in both]]
                          + [[(w, o) for o in both] for w in (16, 24, 32, 48, 64)])


def test_groups_without_fusing_or_off_the_cpu(monkeypatch):
    specs = [{"arch": "CNN", "optimizer": "SGD", "width": w, "epochs": 5} for w in (2, 4, 64)]
    meta = ncc.ModelRuns("exp1", {"x_train": torch.zeros(4, 40, device="meta")}, log=None)
    assert _partition(meta.groups(specs)) == [[("CNN", "SGD", w, 0) for w in (2, 4, 64)]]
    monkeypatch.setattr(ncc, "FUSED", False)
    cpu = ncc.ModelRuns("exp1", {"x_train": torch.zeros(4, 40)}, log=None)
    assert _partition(cpu.groups(specs)) == [[("CNN", "SGD", w, 0)] for w in (2, 4, 64)]
