"""What docs/full publishes is what the paper-scale campaign's committed records hold: every
model the first campaign trained (one seed of each Exp 1-3 point) appears in the published
results as replicate 0 of its point, with its numbers exactly as its record has them. Later
campaigns add replicates; they never change a published number."""
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
