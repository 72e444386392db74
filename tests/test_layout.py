"""The script's layout: the study (sections 1-7) never calls what runs it (sections 8-11),
and an experiment is one entry of EXPERIMENTS plus its functions: the command line, the
plan, the records and the composite figure all take a new one from there."""
import ast
import json
import signal

import matplotlib.image

import neural_collapse_cka as ncc
from conftest import SCRIPT


def top_level(tree):
    """{name: node} of the script's top-level definitions and assignments."""
    found = {}
    for node in tree.body:
        names = ([node.name] if hasattr(node, "name") else
                 [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)])
        found.update(dict.fromkeys(names, node))
    return found


def test_the_study_never_calls_what_runs_it():
    source = open(SCRIPT).read()
    cut = next(i for i, line in enumerate(source.splitlines(), 1)
               if line.startswith("# 8. Records"))
    tree = ast.parse(source)
    study = {n: node for n, node in top_level(tree).items() if node.lineno < cut}
    runner = {n for n, node in top_level(tree).items() if node.lineno > cut}
    assert "ModelRuns" in runner and "fit_group" in study and "EXPERIMENTS" in study
    reaching = {name: sorted({x.id for x in ast.walk(node) if isinstance(x, ast.Name)
                              and isinstance(x.ctx, ast.Load)} & runner - set(study))
                for name, node in study.items()}
    assert {name: used for name, used in reaching.items() if used} == {}


def _plot_toy(axes, results):
    (ax,) = axes
    if results:
        ax.plot(results["d"], results["nc1"], "o-")
    ax.set_title("Exp 5: a toy")


def test_a_fifth_experiment_is_one_entry(tiny, monkeypatch, capsys):
    def toy_setup():
        return ncc.generalized_nc_setup(epochs=2, dims=[3, 4], width=2, replicates=1)

    toy = ncc.Experiment(5, "a toy", toy_setup, ncc.generalized_nc_summary,
                         ("GEN_NC_WIDTH",), 1, _plot_toy)
    monkeypatch.setitem(ncc.EXPERIMENTS, 5, toy)
    assert "5 (a toy)" in ncc.build_parser().format_help()
    out = tiny / "out"
    saved, handler = ncc.hyperparameters(), signal.getsignal(signal.SIGTERM)
    try:
        assert ncc.main(["--preset", "smoke", "--experiments", "3,5", "--out", str(out),
                         "--device", "cpu", "--set", f"DATA_DIR={tiny}"]) == 0
        assert ncc.main(["--preset", "smoke", "--experiments", "5", "--plan",
                         "--out", str(out)]) == 0
    finally:
        ncc.apply_settings(saved)
        signal.signal(signal.SIGTERM, handler)
    printed = capsys.readouterr().out
    assert "exp5: 2 models in 1 groups" in printed.split("plan:")[-1]  # trained already
    assert "2 models finished" in printed.split("plan:")[-1]
    results = json.loads((out / "neural_collapse_cka_results.json").read_text())
    assert results["exp5"]["d"] == [3, 4] and results["exp3"]["d"] == [2, 9, 10]
    assert len(list((out / "records" / "exp5").glob("*.json"))) == 2
    # its records are keyed by its own declared setting, not Exp 3's others
    runs = ncc.ModelRuns("exp5", None, str(out / "records"), None, ncc.rounding_context("cpu"))
    saved = ncc.hyperparameters()
    try:
        ncc.apply_settings(ncc.PRESETS["smoke"])
        assert all(runs.stored_records(toy_setup()["specs"]))
        ncc.GEN_NC_WIDTH = 8  # restored with the rest below
        assert not any(runs.stored_records(toy_setup()["specs"]))
    finally:
        ncc.apply_settings(saved)
    # the composite grows a row: 11 panels, the toy's, the run's summary -> 4 x 4
    height, width = matplotlib.image.imread(out / "neural_collapse_cka_results.png").shape[:2]
    assert abs(height / width - (14 / 3 * 4) / 20) < 0.02
