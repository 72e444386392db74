"""A group stopped in training resumes from its latest snapshot and ends exactly where an
uninterrupted run ends: same weights to the bit, same fits, same checkpoint measures."""
import io
import json
import os

import pytest
import torch

import neural_collapse_cka as ncc

EPOCHS = 6


def small_data(n=3 * ncc.BATCH_SIZE):  # three steps an epoch, the last batch a short one
    gen = torch.Generator().manual_seed(0)
    return {"x_train": torch.randn(n - 17, 40, generator=gen),
            "y_train": torch.randint(0, 10, (n - 17,), generator=gen)}


def group(arch, optimizers):
    widths, seeds = [3, 5][:len(optimizers)], [7, 8][:len(optimizers)]
    return [ncc.make_model(arch, w, s) for w, s in zip(widths, seeds)], seeds


def weights(models):
    return [{name: t.clone() for name, t in m.state_dict().items()} for m in models]


def through_a_file(state):
    """The state as it comes back from disk (weights_only, as a resume loads it)."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("arch, optimizers", [("ResNet", ["SGD", "SGD"]),
                                              ("CNN", ["Adam", "Adam"]),
                                              ("ResNet", ["Adam", "SGD"])],
                         ids=["ResNet-SGD", "CNN-Adam", "ResNet-mixed"])
@pytest.mark.parametrize("stop_after", [1, 4])
def test_a_group_resumed_from_a_snapshot_ends_bit_identical(arch, optimizers, stop_after,
                                                            monkeypatch):
    monkeypatch.setattr(ncc, "SNAPSHOT_SECONDS", 0.0)  # a snapshot after every epoch
    data = small_data()
    measured = []

    def measure(g, model, epoch):
        measured.append((g, epoch, float(model.classifier.weight.detach().sum())))

    models, seeds = group(arch, optimizers)
    fits = ncc.train_models(models, data, optimizers, EPOCHS, seeds, [2, 5], measure)
    uninterrupted, uninterrupted_measures = weights(models), list(measured)

    # the same run again, keeping its snapshots: saving one must not change training
    snapshots = {}
    models, seeds = group(arch, optimizers)
    measured.clear()
    again = ncc.train_models(models, data, optimizers, EPOCHS, seeds, [2, 5], measure,
                             save_snapshot=lambda s: snapshots.setdefault(
                                 s["epoch"], through_a_file(s)))
    assert sorted(snapshots) == list(range(1, EPOCHS))  # none after the last epoch
    assert again == fits and measured == uninterrupted_measures
    for a, b in zip(weights(models), uninterrupted):
        assert all(torch.equal(a[name], b[name]) for name in a)

    # fresh models from the seeds, as a rerun builds them, on from the snapshot
    models, seeds = group(arch, optimizers)
    measured.clear()
    resumed = ncc.train_models(models, data, optimizers, EPOCHS, seeds, [2, 5], measure,
                               resume=snapshots[stop_after])
    assert resumed == fits
    assert measured == [m for m in uninterrupted_measures if m[1] > stop_after]
    for a, b in zip(weights(models), uninterrupted):
        for name in a:
            assert torch.equal(a[name], b[name]), name


def test_a_diverged_model_stays_diverged_after_a_resume(monkeypatch):
    monkeypatch.setattr(ncc, "SNAPSHOT_SECONDS", 0.0)
    data = small_data()

    def with_a_broken_first_model():
        models, seeds = group("CNN", ["Adam", "Adam"])
        with torch.no_grad():
            models[0].classifier.weight.fill_(float("nan"))
        return models, seeds

    models, seeds = with_a_broken_first_model()
    snapshots = {}
    fits = ncc.train_models(models, data, "Adam", EPOCHS, seeds,
                            save_snapshot=lambda s: snapshots.setdefault(
                                s["epoch"], through_a_file(s)))
    assert fits[0]["diverged"] and fits[0]["epochs_run"] == 1 and not fits[1]["diverged"]
    healthy = weights(models)[1]
    models, seeds = with_a_broken_first_model()
    resumed = ncc.train_models(models, data, "Adam", EPOCHS, seeds, resume=snapshots[3])
    assert json.dumps(resumed) == json.dumps(fits)  # NaN losses compared as text
    assert all(torch.equal(t, healthy[name]) for name, t in models[1].state_dict().items())


def _stop_at(epoch):
    def counter(runs, i, group):
        def on_epoch(e):
            if e == epoch:
                raise KeyboardInterrupt
        return on_epoch
    return counter


def test_run_many_resumes_a_stopped_group_from_its_snapshot(tiny, monkeypatch):
    """Exp 4's seed model with its drift checkpoints (whose epoch-1 reference the
    snapshot must keep), stopped at epoch 4 of 6 and run again, against a run never
    stopped: the same record, number for number, and no snapshot left behind."""
    monkeypatch.setattr(ncc, "WORKERS", 1)
    monkeypatch.setattr(ncc, "SNAPSHOT_SECONDS", 0.0)
    def setup():
        return ncc.cka_setup(EPOCHS, 2, 4, 4, [42, 123], [1, 3, 6], "linear", "pool")

    specs = [setup()["specs"][2]]
    assert specs[0]["checkpoints"] == [1, 3, 6]
    data = ncc.experiment_data(torch.device("cpu"))

    lines = []

    def run(records_dir):
        runs = ncc.ModelRuns("exp4", data, str(records_dir), log=lines.append)
        return runs, runs.run_many(specs, setup()["measure"])

    _, (reference,) = run(tiny / "never_stopped")

    stopped = tiny / "stopped"
    with monkeypatch.context() as patch:
        patch.setattr(ncc.ModelRuns, "_epoch_counter", _stop_at(4))
        with pytest.raises(KeyboardInterrupt):
            run(stopped)
    runs = ncc.ModelRuns("exp4", data, str(stopped), log=None)
    snapshot = runs.snapshot_path(specs)
    state = torch.load(snapshot, weights_only=True)
    assert state["training"]["epoch"] == 3 and len(state["measured"][0]) == 2
    assert runs.share_done(specs) == 0.5  # the plan's estimate counts the rest only

    epochs_trained = []
    with monkeypatch.context() as patch:
        patch.setattr(ncc.ModelRuns, "_epoch_counter",
                      lambda runs, i, group: epochs_trained.append)
        lines.clear()
        runs, (record,) = run(stopped)
    assert epochs_trained == [4, 5, 6]
    assert runs.todo_cost == pytest.approx(ncc.group_cost(specs) / 2)  # for the time left
    assert "resumes at epoch 4 of 6 from the snapshot" in lines[0]
    assert not (stopped / "exp4" / snapshot.rsplit("/", 1)[1]).exists()
    assert runs.share_done(specs) == 1.0
    for field in ("seconds", "checkpoint_seconds"):
        assert record.pop(field) > 0
        reference.pop(field)
    assert record == reference


def test_a_broken_snapshot_is_warned_about_and_its_group_starts_over(tiny, monkeypatch):
    monkeypatch.setattr(ncc, "WORKERS", 1)
    specs = [{"arch": "CNN", "optimizer": "Adam", "epochs": 3, "width": 3}]
    data = ncc.experiment_data(torch.device("cpu"))

    def run(records_dir):
        record = ncc.ModelRuns("exp1", data, str(records_dir), log=None).run_many(specs)[0]
        record.pop("seconds")
        return record

    reference = run(tiny / "clean")
    snapshot = ncc.ModelRuns("exp1", data, str(tiny / "broken")).snapshot_path(specs)
    os.makedirs(os.path.dirname(snapshot))
    with open(snapshot, "wb") as f:
        f.write(b"not a snapshot")
    with pytest.warns(UserWarning, match="unreadable.*starts over"):
        assert run(tiny / "broken") == reference
    assert not os.path.exists(snapshot)

    with open(snapshot, "wb") as f:  # as a kill right after the records would leave it
        f.write(b"stale")
    assert run(tiny / "broken") == reference  # loaded from the records
    assert not os.path.exists(snapshot)
