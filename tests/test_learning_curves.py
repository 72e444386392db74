"""Exp 1's learning curves: train and test error at log-spaced epochs of every model, which
leave training untouched, and the width x epoch figure drawn from them."""
import numpy as np
import torch

import neural_collapse_cka as ncc


def _errors(model, data):
    """Train error on the noisy labels and test error, straight from the logits."""
    model.eval()
    with torch.no_grad():
        return [float((model(data[f"x_{split}"]).argmax(1) != data[f"y_{split}"])
                      .float().mean()) for split in ("train", "test")]


def test_checkpoint_evaluations_leave_the_weights_bit_identical(tiny):
    data = ncc.experiment_data(torch.device("cpu"))
    for arch, optimizers in [("ResNet", ["SGD", "Adam"]), ("CNN", ["Adam", "SGD"])]:
        trained = []
        for checkpoints in ([], [1, 2, 4, 6]):
            models = [ncc.make_model(arch, w, seed) for w, seed in [(4, 1), (6, 2)]]
            curves = [[], []]

            def measure(g, model, epoch):
                curves[g].append(ncc.model_wise_measure({}, model, epoch, data))

            ncc.train_models(models, data, optimizers, 6, [11, 12], checkpoints, measure)
            trained.append((models, curves))
        (plain, _), (measured, curves) = trained
        assert [len(c) for c in curves] == [4, 4]
        for a, b in zip(plain, measured):
            state_a, state_b = a.state_dict(), b.state_dict()
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)


def test_curve_points_equal_a_model_trained_to_that_epoch(tiny):
    """Adam's rate is constant, so the first 3 of 5 epochs are a 3-epoch run: its errors,
    computed here directly, must be the curve's values at epoch 3; at epoch 5 the curve
    must give the record's final errors."""
    data = ncc.experiment_data(torch.device("cpu"))
    model = ncc.make_model("ResNet", 4, 7)
    curve = []
    ncc.train_model(model, data, "Adam", 5, 3, [1, 3, 5],
                    lambda m, epoch: curve.append(ncc.model_wise_measure({}, m, epoch, data)))
    assert [c["epoch"] for c in curve] == [1, 3, 5]
    short = ncc.make_model("ResNet", 4, 7)
    ncc.train_model(short, data, "Adam", 3, 3)
    assert [curve[1]["train_err"], curve[1]["test_err"]] == _errors(short, data)
    assert [curve[2]["train_err"], curve[2]["test_err"]] == _errors(model, data)
    final = ncc.evaluate(model, data)
    assert curve[2]["test_loss"] == final["test_loss"]
    assert curve[2]["train_loss"] == final["train_loss"]


def test_exp1_json_keeps_curves_per_configuration_and_width(tiny, monkeypatch):
    monkeypatch.setattr(ncc, "MODEL_WISE_POINTS", 3)
    widths = [2, 4, 8]
    out = ncc.run_model_wise_complete(epochs=8, widths=widths, archs=("CNN",),
                                      optimizers=("SGD",), replicates=2, log=None)
    series = out["CNN_SGD"]
    curves = series["curves"]
    assert curves["epoch"] == ncc.log_spaced_epochs(8, 3) and curves["epoch"][-1] == 8
    for name in ncc.LEARNING_CURVE_NAMES:
        values = np.array(curves[name], dtype=float)
        assert values.shape == (len(widths), len(curves["epoch"]))
        per_replicate = np.array(curves["replicates"][name], dtype=float)
        assert per_replicate.shape == (len(widths), len(curves["epoch"]), 2)
        np.testing.assert_allclose(values, per_replicate.mean(axis=2), rtol=0, atol=1e-15)
    # the last point of each curve is the trained model itself
    np.testing.assert_allclose(np.array(curves["test_err"])[:, -1], series["test_err"],
                               rtol=0, atol=1e-15)
    np.testing.assert_allclose(np.array(curves["train_err"])[:, -1], series["train_err"],
                               rtol=0, atol=1e-15)
    # and with no curve, training gives the same models
    monkeypatch.setattr(ncc, "MODEL_WISE_POINTS", 0)
    plain = ncc.run_model_wise_complete(epochs=8, widths=widths, archs=("CNN",),
                                        optimizers=("SGD",), replicates=2, log=None)["CNN_SGD"]
    assert plain["curves"] == {"epoch": []}
    assert plain["replicates"]["test_err"] == series["replicates"]["test_err"]
    assert plain["replicates"]["nc1"] == series["replicates"]["nc1"]


def test_width_epoch_figure_is_drawn_with_or_without_curves(tiny, tmp_path):
    exp1 = ncc.run_model_wise_complete(epochs=3, widths=[2, 4], archs=("ResNet",),
                                       optimizers=("Adam",), log=None)
    for name, results in [("some", {"exp1": exp1}), ("none", {})]:
        path = tmp_path / f"{name}.png"
        ncc.plot_width_epoch(results, str(path))
        assert path.read_bytes()[:4] == b"\x89PNG"


def test_log_edges_put_each_point_at_the_geometric_centre_of_its_cell():
    edges = ncc._log_edges([1, 10, 100])
    np.testing.assert_allclose(edges, [10 ** -0.5, 10 ** 0.5, 10 ** 1.5, 10 ** 2.5])
    centres = np.sqrt(edges[1:] * edges[:-1])
    np.testing.assert_allclose(centres, [1, 10, 100])
