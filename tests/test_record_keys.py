"""Record keys: a model's record is reused exactly when nothing that can change its numbers
has changed: its spec, its group, the settings its experiment and optimizer declare, and
the rounding context (device type, threads per group, rounding mode)."""
import json

import pytest

import neural_collapse_cka as ncc


@pytest.fixture(autouse=True)
def full_study():
    """Every hyperparameter at the value this file defines: the keys of the full study."""
    saved = ncc.hyperparameters()
    ncc.apply_settings(ncc._DEFAULTS)
    yield
    ncc.apply_settings(saved)


def study_keys(device_type="cpu"):
    """{(experiment, model spec): key} for every model of the full study."""
    keys = {}
    for experiment in ncc.EXPERIMENTS.values():
        runs = ncc.ModelRuns(experiment.name, None, log=None,
                             rounding=ncc.rounding_context(device_type))
        for group in runs.groups(experiment.setup()["specs"]):
            for spec in group:
                keys[(experiment.name, json.dumps(spec, sort_keys=True))] = runs.key(spec, group)
    return keys


def changed(before, after):
    """The experiments some of whose models have another key, or are gone."""
    return sorted({name for (name, spec), key in before.items() if after.get((name, spec)) != key})


def test_every_model_of_the_study_has_its_own_key():
    keys = study_keys()
    assert len(set(keys.values())) == len(keys) == 59


@pytest.mark.parametrize("name, value, experiments", [
    ("GEN_NC_WIDTH", 32, ["exp3"]),          # an Exp 3 setting: Exp 3's models only
    ("DIMS", [2, 3, 5, 8, 9, 10], ["exp3"]),  # the pair d = 12, 16 goes, the rest stay
    ("CKA_SUBSET", 400, ["exp4"]),           # what Exp 4 measures
    ("CKA_ESTIMATOR", "debiased", ["exp4"]),
    ("ADAM_LR", 2e-3, ["exp1", "exp2", "exp4"]),  # the Adam models' optimizer
    ("SGD_MOMENTUM", 0.8, ["exp1", "exp3"]),
    ("SEED", 7, ["exp1", "exp2", "exp3", "exp4"]),
    ("FLUSH_DENORMALS", False, ["exp1", "exp2", "exp3", "exp4"]),  # rounding on a CPU
    ("CUDA_GRAPHS", True, []),               # rounding on a GPU only
    ("PROGRESS_SECONDS", 5.0, []),           # run settings that change no number
    ("SNAPSHOT_SECONDS", 1.0, []),
    ("DATA_DIR", "/elsewhere", []),
    ("FIGURE_DPI", 300, []),
    ("REPLICATES", 3, []),                   # adds models, changes none (on a CPU)
])
def test_a_setting_changes_the_keys_of_the_models_it_can_change_and_no_others(
        monkeypatch, name, value, experiments):
    before = study_keys()
    monkeypatch.setattr(ncc, name, value)
    after = study_keys()
    if name == "DIMS":  # the others keep their keys: their groups are as they were
        assert changed({k: v for k, v in before.items()
                        if '"d": 12' not in k[1] and '"d": 16' not in k[1]}, after) == []
    assert changed(before, after) == experiments
    if name in ("SEED", "FLUSH_DENORMALS"):  # every model can change
        assert not set(before.values()) & set(after.values())


def test_optimizer_settings_reach_only_that_optimizers_models(monkeypatch):
    before = study_keys()
    monkeypatch.setattr(ncc, "ADAM_LR", 2e-3)
    after = study_keys()
    for (name, spec), key in before.items():
        assert (after[(name, spec)] != key) == ('"optimizer": "Adam"' in spec), spec


def test_the_drift_models_cka_settings_are_in_its_spec_and_key(monkeypatch):
    before = study_keys()
    monkeypatch.setattr(ncc, "CKA_CONV", "flatten")
    after = study_keys()
    assert [json.loads(spec).get("cka_conv") for (name, spec), key in before.items()
            if name == "exp4" and after.get((name, spec)) != key] == ["pool"]


def test_a_new_global_at_its_default_changes_no_key(monkeypatch):
    before = study_keys()
    # a new hyperparameter, as a future edit of section 1 would add it
    monkeypatch.setattr(ncc, "NEW_SETTING", 3, raising=False)
    monkeypatch.setattr(ncc, "_HYPERPARAMETER_NAMES", [*ncc._HYPERPARAMETER_NAMES,
                                                       "NEW_SETTING"])
    monkeypatch.setitem(ncc._DEFAULTS, "NEW_SETTING", 3)
    assert "NEW_SETTING" in ncc.hyperparameters()
    assert study_keys() == before


def test_the_rounding_context_and_the_group_are_part_of_the_key(monkeypatch):
    cpu, cuda = study_keys("cpu"), study_keys("cuda")
    assert not set(cpu.values()) & set(cuda.values())
    # the same model in another group (another fusion) has another key
    spec = {"arch": "CNN", "optimizer": "SGD", "width": 2, "epochs": 5}
    runs = ncc.ModelRuns("exp1", None, log=None, rounding=ncc.rounding_context("cpu"))
    alone = runs.key(spec, [spec])
    fused = runs.key(spec, [spec, {**spec, "width": 4}])
    assert alone != fused
    monkeypatch.setattr(ncc, "FUSED", False)  # a model alone in its group either way
    assert runs.groups([spec]) == [[spec]] and runs.key(spec, [spec]) == alone


def test_worker_counts_with_one_thread_per_group_share_keys(monkeypatch):
    keys = {}
    for workers in (2, 3, 16):
        monkeypatch.setattr(ncc, "WORKERS", workers)
        keys[workers] = study_keys()
    assert keys[2] == keys[3] == keys[16]
    monkeypatch.setattr(ncc, "WORKERS", 1)  # one process: a group on all of torch's threads
    with ncc.torch_threads(2):
        assert not set(study_keys().values()) & set(keys[2].values())
    with ncc.torch_threads(1):
        assert study_keys() == keys[2]


def _train(tiny, workers, out, log):
    """Exp 1, CNN with SGD at widths 2 and 64 (two groups), with `workers` workers."""
    saved = ncc.WORKERS
    ncc.WORKERS = workers
    try:
        return ncc.run_model_wise_complete(epochs=2, widths=[2, 64], archs=("CNN",),
                                           optimizers=("SGD",), replicates=1,
                                           records_dir=str(tiny / out), log=log)
    finally:
        ncc.WORKERS = saved


def without_seconds(results):
    config = dict(results["CNN_SGD"])
    config.pop("seconds")
    config["replicates"] = {k: v for k, v in config["replicates"].items() if k != "seconds"}
    return config


def test_two_worker_counts_give_the_same_numbers_and_share_records(tiny, monkeypatch):
    two = _train(tiny, 2, "a", None)
    three = _train(tiny, 3, "b", None)
    assert without_seconds(two) == without_seconds(three)
    names = {out: sorted(p.name for p in (tiny / out / "exp1").glob("*.json"))
             for out in ("a", "b")}
    assert names["a"] == names["b"] and len(names["a"]) == 2
    # the records WORKERS = 2 left are what WORKERS = 3 finds: nothing trains again
    lines = []
    again = _train(tiny, 3, "a", lines.append)
    assert again == two
    assert sum("(cached)" in line for line in lines) == 2


def test_an_exp3_setting_leaves_exp1_cached(tiny, monkeypatch):
    first = _train(tiny, 1, "records", None)
    monkeypatch.setattr(ncc, "GEN_NC_WIDTH", 16)
    monkeypatch.setattr(ncc, "DIMS", [3, 7])
    monkeypatch.setattr(ncc, "EPOCHS_GEN_NC", 5)
    lines = []
    assert _train(tiny, 1, "records", lines.append) == first
    assert sum("(cached)" in line for line in lines) == 2
    # while a setting of its own (the SGD models' learning rate) trains them again
    monkeypatch.setattr(ncc, "SGD_LR", 0.02)
    lines.clear()
    _train(tiny, 1, "records", lines.append)
    assert not any("(cached)" in line for line in lines) and len(lines) == 2
