"""The additions in the drivers: replicates, NC in every layer, weight spectra of trained models,
and the CKA estimator and conv settings of Exp 4."""
import json
import os

import numpy as np
import pytest
import torch

import neural_collapse_cka as ncc


def test_summary_means_skip_missing_replicates_and_keep_every_value():
    points = [[{"a": 1.0, "b": {"c": 2.0}}, {"a": 3.0, "b": {"c": None}}],
              [{"a": None, "b": {"c": float("nan")}}, {"a": None, "b": {"c": 5.0}}]]
    out = ncc._summarise(points)
    assert out["a"][0] == 2.0 and np.isnan(out["a"][1])
    assert out["b"]["c"] == [2.0, 5.0]
    assert out["replicates"]["a"] == [[1.0, 3.0], [None, None]]


def test_replicates_have_their_own_seeds_and_the_mean_is_their_average(tiny, monkeypatch):
    monkeypatch.setattr(ncc, "FUSED", False)  # each model alone: results comparable exactly
    kwargs = dict(epochs=2, widths=[2, 3], archs=("CNN",), optimizers=("SGD",), log=None)
    two = ncc.run_model_wise_complete(replicates=2, **kwargs)["CNN_SGD"]
    one = ncc.run_model_wise_complete(replicates=1, **kwargs)["CNN_SGD"]
    seeds = two["replicates"]["seed"]
    assert seeds[0] == [ncc.derive_seed("exp1", "CNN", "SGD", 2, r) for r in (0, 1)]
    assert len({s for pair in seeds for s in pair}) == 4
    for key in ("test_err", "nc1", "nc2"):
        reps = np.array(two["replicates"][key])
        assert reps.shape == (2, 2)
        assert two[key] == pytest.approx(reps.mean(axis=1).tolist(), rel=1e-12)
        # replicate 0 is the model a single-replicate run trains: same seed, same numbers
        assert [row[0] for row in two["replicates"][key]] == one[key]
    assert not np.allclose(np.array(two["replicates"]["nc1"])[:, 0],
                           np.array(two["replicates"]["nc1"])[:, 1])
    layer_reps = np.array(two["replicates"]["per_layer"]["L0"]["nc1"])
    assert two["per_layer"]["L0"]["nc1"] == pytest.approx(layer_reps.mean(1).tolist())


def test_exp2_and_exp3_curves_are_means_over_replicates(tiny):
    exp2 = ncc.run_epoch_wise_dynamics(epochs=3, widths={"critical": 2, "large": 3},
                                       replicates=2, log=None)
    large = exp2["large"]
    assert large["epoch"] == [1, 2, 3] and len(large["replicates"]["seed"]) == 2
    reps = np.array(large["replicates"]["test_err"])
    assert reps.shape == (3, 2)
    assert large["test_err"] == pytest.approx(reps.mean(1).tolist())
    assert {"alpha", "alpha_weighted"} <= set(large) and len(large["alpha_weighted"]) == 3
    exp3 = ncc.run_generalized_nc(epochs=1, dims=[2, 9], width=3, replicates=3, log=None)
    assert np.array(exp3["replicates"]["nc2"]).shape == (2, 3)
    assert exp3["nc2"] == pytest.approx(np.mean(exp3["replicates"]["nc2"], axis=1).tolist())
    # three replicates: the sample standard deviation, in the JSON beside each mean
    for key in ("nc2", "test_err"):
        std = np.std(np.array(exp3["replicates"][key], dtype=float), axis=1, ddof=1)
        assert exp3["std"][key] == pytest.approx(std.tolist(), rel=1e-12)
    assert np.isfinite(exp3["std"]["nc2"]).all() and min(exp3["std"]["nc2"]) > 0
    assert exp3["std"]["nc_test"]["nc1"] == pytest.approx(np.std(
        np.array(exp3["replicates"]["nc_test"]["nc1"]), axis=1, ddof=1).tolist(), rel=1e-12)


def test_standard_deviation_needs_two_finite_replicates():
    out = ncc._summarise([[{"a": 1.0}, {"a": 3.0}, {"a": None}], [{"a": 2.0}, {"a": None}, {"a": None}]])
    assert out["std"]["a"][0] == pytest.approx(np.sqrt(2.0)) and np.isnan(out["std"]["a"][1])


def test_bands_are_one_standard_deviation_from_three_replicates_and_min_max_below():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    three = [1.0, 2.0, 6.0]
    for replicates, expected in [
            ([three, [2.0, 5.0]], [(3 - np.std(three, ddof=1), 3 + np.std(three, ddof=1)),
                                   (2.0, 5.0)]),
            ([[1.0, 4.0], [3.0, 5.0]], [(1.0, 4.0), (3.0, 5.0)])]:
        fig, ax = plt.subplots()
        ncc._band(ax, [1, 2], replicates, "k")
        vertices = ax.collections[-1].get_paths()[0].vertices
        for x, (low, high) in zip([1, 2], expected):
            ys = vertices[vertices[:, 0] == x, 1]
            assert (ys.min(), ys.max()) == pytest.approx((low, high), rel=1e-12)
        plt.close(fig)
    assert ncc._band_name(3) == "bands: mean ± 1 std" and ncc._band_name(2) == "bands: min-max"


def test_last_layer_of_per_layer_nc_is_the_penultimate_nc(tiny):
    out = ncc.run_model_wise_complete(epochs=2, widths=[3], archs=("ResNet", "CNN"),
                                      optimizers=("Adam",), replicates=1, log=None)
    for series in out.values():
        last = series["per_layer"]["L3"]
        for key in ("nc1", "nc1_pinv", "nc4"):
            assert last[key] == pytest.approx(series[key], rel=1e-9), key
        assert series["per_layer"]["L0"]["nc1"] != pytest.approx(series["nc1"])


def test_layer_collapse_matches_the_metric_on_pooled_activations(tiny):
    data = ncc.experiment_data(torch.device("cpu"))
    model = ncc.make_model("CNN", 3, seed=1)
    ncc.train_model(model, data, "Adam", 2, seed=1)
    per_layer = ncc.layer_collapse(model, data)
    model.eval()
    with torch.no_grad():
        l1 = model.features(data["x_train"])[1].mean(dim=2)   # pooled over length
        decision = model(data["x_train"]).argmax(1)
    assert per_layer["L1"] == pytest.approx(
        ncc.layer_nc_metrics(l1, data["y_train"], decision), rel=1e-6)


def test_model_esd_fits_every_weight_and_averages_the_reliable_ones():
    model = ncc.make_model("ResNet", 20, seed=0)
    esd = ncc.model_esd(model)
    assert set(esd["layers"]) == {"stem.0.weight", "block1.conv1.weight", "block1.conv2.weight",
                                  "block2.conv1.weight", "block2.conv2.weight",
                                  "classifier.weight"}
    assert esd["layers"]["block1.conv1.weight"]["num_evals"] == 60   # 3 taps x 20
    assert esd["layers"]["stem.0.weight"]["num_evals"] == 3          # 3 taps x min(20, 1)
    assert esd["layers"]["classifier.weight"]["num_evals"] == 10
    reliable = [esd["layers"][f"block{b}.conv{c}.weight"]["alpha"] for b in (1, 2) for c in (1, 2)]
    assert esd["reliable_layers"] == 4
    assert esd["alpha"] == pytest.approx(np.mean(reliable))
    conv = model.block2.conv1.weight.detach()
    assert esd["layers"]["block2.conv1.weight"]["alpha"] == pytest.approx(
        ncc.powerlaw_alpha(ncc.weight_eigenvalues(conv))["alpha"])
    narrow = ncc.model_esd(ncc.make_model("ResNet", 4, seed=0))   # 12 eigenvalues at most
    assert narrow["reliable_layers"] == 0 and np.isnan(narrow["alpha"])
    assert np.isfinite(narrow["alpha_weighted"])


def test_exp4_estimator_and_conv_settings_are_used_and_recorded(tiny):
    kwargs = dict(epochs=2, small_width=2, large_width=3, width=2, seeds=[1, 2],
                  drift_epochs=[1, 2], log=None)
    pooled = ncc.run_cka_experiment(**kwargs)
    # with pooling, ResNet's L3 is its pooled L2: identical representations
    assert pooled["cross_seed"]["L2"] == pooled["cross_seed"]["L3"]
    flat = ncc.run_cka_experiment(estimator="debiased", conv="flatten", **kwargs)
    assert (flat["estimator"], flat["cka_conv"]) == ("debiased", "flatten")
    assert flat["cross_seed"]["L2"] != pytest.approx(flat["cross_seed"]["L3"])
    assert all(v == pytest.approx(1.0) for v in (flat["drift"][l][0] for l in flat["layers"]))
    with pytest.raises(ValueError, match="estimator"):
        ncc.run_cka_experiment(estimator="kernel", **kwargs)


def test_flattened_representations_keep_every_position():
    model = ncc.make_model("ResNet", 3, seed=0)
    x = torch.randn(7, 40)
    flat = ncc.layer_representations(model, x, "flatten")
    pooled = ncc.layer_representations(model, x, "pool")
    assert [r.shape for r in flat] == [(7, 120), (7, 120), (7, 120), (7, 3)]
    assert np.allclose(flat[1].reshape(7, 3, 40).mean(2), pooled[1])


def test_changing_a_cka_setting_does_not_retrain_exp1(tiny, monkeypatch):
    lines = []
    kwargs = dict(epochs=1, widths=[2], archs=("CNN",), optimizers=("SGD",), replicates=1,
                  records_dir=str(tiny / "records"), log=lines.append)
    ncc.run_model_wise_complete(**kwargs)
    monkeypatch.setattr(ncc, "CKA_CONV", "flatten")
    monkeypatch.setattr(ncc, "REPLICATES", 3)  # the argument says 1: not part of the key
    ncc.run_model_wise_complete(**kwargs)
    assert "cached" not in lines[0] and "cached" in lines[1]


def test_check_setting_knows_the_choices():
    assert ncc.check_setting("CKA_ESTIMATOR", "debiased") == "debiased"
    assert ncc.check_setting("CKA_CONV", "flatten") == "flatten"
    for name, value in [("CKA_ESTIMATOR", "rbf"), ("CKA_CONV", "max"), ("REPLICATES", 0)]:
        with pytest.raises(ValueError, match=name):
            ncc.check_setting(name, value)


def test_band_spans_min_to_max_and_is_skipped_for_one_replicate():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ncc._band(ax, [1, 2, 3], [[0.5], [0.4], [None]], "k")
    assert not ax.collections
    ncc._band(ax, [1, 2, 3], [[0.5, 0.1], [0.4, 0.6], [None, 0.3]], "k")
    (band,) = ax.collections
    ys = band.get_paths()[0].vertices[:, 1]
    assert ys.min() == pytest.approx(0.1) and ys.max() == pytest.approx(0.6)
    plt.close(fig)


def test_both_figures_draw_from_results_without_the_additions_keys(tmp_path):
    """A results file written before replicates, per-layer NC and spectra existed (the
    committed full-scale Exp 3 run) still redraws; the missing panels say "not run"."""
    with open(os.path.join(os.path.dirname(__file__), "..", "docs", "full_exp3_h100.json")) as f:
        results = json.load(f)
    assert "replicates" not in results["exp3"]
    paths = ncc.draw_figures(results, str(tmp_path))
    assert all(open(p, "rb").read(4) == b"\x89PNG" for p in paths)


def test_evaluation_in_chunks_equals_one_whole_batch_pass(tiny, monkeypatch):
    """Evaluation runs the model on EVAL_CHUNK inputs at a time (cache-sized); the values do
    not depend on the chunking, an uneven last chunk included."""
    data = ncc.experiment_data(torch.device("cpu"))
    model = ncc.make_model("ResNet", 6, seed=3)
    ncc.train_model(model, data, "SGD", 2, seed=3)
    results = []
    for chunk in (len(data["x_train"]), 64, 37):
        monkeypatch.setattr(ncc, "EVAL_CHUNK", chunk)
        results.append((ncc.evaluate(model, data),
                        ncc.layer_representations(model, data["x_train"], "flatten")))
    (whole, whole_reps), rest = results[0], results[1:]
    for scores, reps in rest:
        assert scores["train_err"] == whole["train_err"]
        assert scores["nc_train"] == pytest.approx(whole["nc_train"], rel=1e-6, nan_ok=True)
        assert scores["nc_test"] == pytest.approx(whole["nc_test"], rel=1e-6, nan_ok=True)
        for rep, whole_rep in zip(reps, whole_reps):
            np.testing.assert_allclose(rep, whole_rep, rtol=1e-6, atol=1e-7)


def test_exp2_draws_each_replicates_curve_beside_the_mean():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [1, 2, 4]
    seeds = [[0.5, 0.6, 0.7], [0.3, 0.2, 0.4], [0.1, None, 0.2]]
    series = {"width": 12, "epoch": epochs, "test_err": [0.6, 0.3, 0.15],
              "train_err": [0.7, 0.4, 0.1], "replicates": {"test_err": seeds}}
    fig, ax = plt.subplots()
    ncc._plot_exp2([ax], {"critical": series})
    lines = ax.get_lines()
    assert len(lines) == 3 + 2  # one per replicate, the mean, the training error
    np.testing.assert_array_equal(np.array([l.get_ydata() for l in lines[:3]], dtype=float),
                                  [[0.5, 0.3, 0.1], [0.6, 0.2, np.nan], [0.7, 0.4, 0.2]])
    assert "each of 3 seeds" in lines[3].get_label()
    plt.close(fig)
