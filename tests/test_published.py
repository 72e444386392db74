"""What docs/full publishes is what the paper-scale campaign's committed records hold: every
model the first campaign trained (one seed of each Exp 1-3 point) appears in the published
results as replicate 0 of its point, with its numbers exactly as its record has them. The
second campaign added replicates 1 and 2 (the seeds `REPLICATES = 3` derives) without
changing a published number; the model table lists every model."""
import collections
import csv
import glob
import json
import os

import pytest

from conftest import ROOT

PUBLISHED = os.path.join(ROOT, "docs", "full", "neural_collapse_cka_results.json")
FIRST_CAMPAIGN = {"exp1": "exp1", "exp2": "exp2", "exp3": "exp3-4"}  # experiment: its part
FINAL_NUMBERS = ("train_err", "test_err")
NC_NUMBERS = ("nc1", "nc1_pinv", "nc2", "nc3", "nc4")


def first_campaign_records(experiment):
    pattern = os.path.join(ROOT, "campaign", FIRST_CAMPAIGN[experiment], "records",
                           experiment, "*.json")
    return [json.load(open(path)) for path in sorted(glob.glob(pattern))]


def where_published(series, seed):
    """(point index, replicate index) of the model of `seed` in a published series."""
    found = [(i, k) for i, seeds in enumerate(series["replicates"]["seed"])
             for k, s in enumerate(seeds if isinstance(seeds, list) else [seeds]) if s == seed]
    assert len(found) == 1, f"seed {seed}: published {len(found)} times"
    return found[0]


@pytest.fixture(scope="module")
def published():
    if not os.path.exists(PUBLISHED):
        pytest.skip("no paper-scale results in this checkout")
    return json.load(open(PUBLISHED))


@pytest.mark.parametrize("experiment", ["exp1", "exp3"])
def test_first_campaign_models_are_replicate_0_unchanged(published, experiment):
    records = first_campaign_records(experiment)
    assert len(records) == {"exp1": 44, "exp3": 8}[experiment]
    for record in records:
        if experiment == "exp1":
            series = published["exp1"][f"{record['arch']}_{record['optimizer']}"]
        else:
            series = published["exp3"]
        point, replicate = where_published(series, record["seed"])
        assert replicate == 0
        assert series["width" if experiment == "exp1" else "d"][point] == \
            record["width" if experiment == "exp1" else "d"]
        for name in FINAL_NUMBERS:
            assert series["replicates"][name][point][replicate] == record[name], name
        for name in NC_NUMBERS:
            assert series["replicates"][name][point][replicate] == record["nc_train"][name], name


def test_first_campaign_learning_curves_are_replicate_0_unchanged(published):
    records = first_campaign_records("exp2")
    assert len(records) == 2
    for record in records:
        series = next(s for s in published["exp2"].values() if s["width"] == record["width"])
        assert series["replicates"]["seed"][0] == record["seed"]
        assert series["epoch"] == [c["epoch"] for c in record["checkpoints"]]
        for name in ("train_err", "test_err", "nc1"):
            assert [seeds[0] for seeds in series["replicates"][name]] == \
                [c[name] for c in record["checkpoints"]], name


MODELS_CSV = os.path.join(ROOT, "docs", "full", "neural_collapse_cka_models.csv")
PAPER_EPOCHS = {"exp1": ("EPOCHS_MODEL_WISE", 3000), "exp2": ("EPOCHS_EPOCH_WISE", 15000),
                "exp3": ("EPOCHS_GEN_NC", 3000)}  # experiment: its setting, at paper scale


def test_every_exp1_to_3_point_has_three_seeds_at_paper_scale(published):
    config = published["config"]
    assert config["REPLICATES"] == 3
    assert all(config[setting] == epochs for setting, epochs in PAPER_EPOCHS.values())
    series = [*published["exp1"].values(), *published["exp2"].values(), published["exp3"]]
    for one in series:
        for seeds in one["replicates"]["test_err"]:
            assert len(seeds) == 3 and None not in seeds


def test_the_published_model_table_has_a_row_for_every_model(published):
    with open(MODELS_CSV, newline="") as f:
        rows = list(csv.DictReader(f))
    count = collections.Counter(row["experiment"] for row in rows)
    assert count["exp1"] == 3 * 44 and count["exp2"] == 3 * 2 and count["exp3"] == 3 * 8
    for row in rows:
        if row["experiment"] in PAPER_EPOCHS:
            assert int(row["epochs"]) == PAPER_EPOCHS[row["experiment"]][1]


def test_the_published_seeds_are_those_replicates_3_trains(published, monkeypatch):
    """`--set REPLICATES=3` with this code trains the published models: each point's seeds
    are those this code derives (Exp 1-3), so a rerun on any machine is the same study."""
    import neural_collapse_cka as ncc
    for name, value in {**ncc.PRESETS["full"], "REPLICATES": 3}.items():
        monkeypatch.setattr(ncc, name, value)
    for number, name in ((1, "exp1"), (2, "exp2"), (3, "exp3")):
        derived = sorted(ncc.model_seed(name, spec)
                         for spec in ncc.EXPERIMENTS[number].setup()["specs"])
        part = published[name]
        seeds = sorted(seed for one in ([part] if name == "exp3" else part.values())
                       for point in one["replicates"]["seed"]
                       for seed in (point if isinstance(point, list) else [point]))
        assert seeds == derived, name
