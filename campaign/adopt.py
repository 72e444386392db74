"""Carry the finished models of one campaign part into another part run by newer code,
so that the newer part trains only what is missing (more replicates) and never a model
that is already trained.

    python campaign/adopt.py FROM_PART TO_PART EXPERIMENTS [NAME=VALUE ...]

FROM_PART and TO_PART are names in campaign/pins.txt; each part's code is the git worktree
of its commit under $CAMPAIGN_TREES (default /tmp/ncc-campaign, as campaign.sh makes them).
NAME=VALUE are the settings TO_PART runs with (REPLICATES=3).

A record's file name holds a key that only the code which wrote it computes, so the newer
code cannot find the older part's records itself. For every model of EXPERIMENTS that both
parts train (same spec, same seed), this script checks, and refuses to adopt it otherwise:
  - the older code grouped it with exactly the models the newer code groups it with (so it
    trained fused with the same models, which decides its rounding);
  - its saved weights, analysed by the newer code, give every final number its record
    holds, to the bit, and its last checkpoint's numbers too where they depend on the
    final weights alone (so the weights are its own and both codes measure alike);
then writes the record under the newer code's key, with the weights unchanged: its numbers
as they were, the fields the older code did not measure added from its weights (final
metrics) or as null (checkpoint measures that need the weights of then), and under
"adopted" where it came from and which fields were added. A record already adopted is
left alone, so running this again is harmless.
"""
import importlib.util
import json
import math
import os
import shutil
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TREES = os.environ.get("CAMPAIGN_TREES", "/tmp/ncc-campaign")
RTOL = 1e-4
SETUPS = {1: "model_wise_setup", 2: "epoch_wise_setup", 3: "generalized_nc_setup",
          4: "cka_setup"}


def part_commit(name):
    with open(os.path.join(ROOT, "campaign", "pins.txt")) as f:
        for line in f:
            fields = line.split()
            if line.startswith("#") or len(fields) < 3:
                continue
            if fields[0] == name:
                return fields[1]
    sys.exit(f"adopt.py: no part {name!r} in campaign/pins.txt")


def load_code(commit, settings):
    """The script of `commit`'s worktree as a module, with the full study's settings."""
    path = os.path.join(TREES, commit, "neural_collapse_cka.py")
    if not os.path.exists(path):
        sys.exit(f"adopt.py: no worktree of {commit} in {TREES} "
                 "(bash campaign/campaign.sh start makes it)")
    spec = importlib.util.spec_from_file_location(f"ncc_{commit[:7]}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.apply_settings({**module._DEFAULTS, **dict(map(module.parse_setting, settings))})
    return module


def identity(spec, seed):
    """What makes a model the same model in both codes: its spec's architecture, optimizer,
    width, d, epochs, replicate and checkpoint epochs, and its seed."""
    epochs = [c["epoch"] if isinstance(c, dict) else c for c in spec.get("checkpoints", ())]
    return (spec["arch"], spec["optimizer"], spec["width"], spec.get("d"), spec["epochs"],
            spec.get("replicate", 0), tuple(epochs), seed)


def json_ready(code, obj):
    return json.loads(json.dumps(code._json_ready(obj)))


def compare(old, new, path, mismatches, rtol, worst):
    """Record where `old` and `new` differ, beyond a relative `rtol`, on the fields both
    hold; worst[0] is the largest relative difference seen."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old.keys() & new.keys():
            compare(old[key], new[key], f"{path}/{key}", mismatches, rtol, worst)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            compare(a, b, f"{path}[{i}]", mismatches, rtol, worst)
    elif old == new or (isinstance(old, float) and isinstance(new, float)
                        and math.isnan(old) and math.isnan(new)):
        return
    elif (isinstance(old, float) and isinstance(new, float)
          and abs(old - new) <= rtol * max(abs(old), abs(new))):
        worst[0] = max(worst[0], abs(old - new) / max(abs(old), abs(new)))
    else:
        mismatches.append(f"{path}: {old!r} != {new!r}")


def merged(old, new, path, added):
    """`old` with the fields only `new` holds added (their paths into `added`)."""
    if not (isinstance(old, dict) and isinstance(new, dict)):
        return old
    out = dict(old)
    for key, value in new.items():
        if key not in old:
            out[key] = value
            added.append(f"{path}/{key}")
        else:
            out[key] = merged(old[key], value, f"{path}/{key}", added)
    return out


def old_records(old_dir, experiment):
    """{identity: (json path, record)} of the older part's records of `experiment`."""
    folder = os.path.join(old_dir, "records", experiment)
    found = {}
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".json") or name.startswith((".", "shards_")):
            continue
        with open(os.path.join(folder, name)) as f:
            record = json.load(f)
        found[identity(record, record["seed"])] = (os.path.join(folder, name), record)
    return found


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    source, target, experiments = argv[:3]
    settings = argv[3:]
    old_commit, new_commit = part_commit(source), part_commit(target)
    old, new = load_code(old_commit, []), load_code(new_commit, settings)
    old_dir = os.path.join(ROOT, "campaign", source)
    new_dir = os.path.join(ROOT, "campaign", target)
    data = new.experiment_data(torch.device("cpu"))
    rounding = new.rounding_context("cpu")
    # measured as the worker that trained a model measured it: on its threads (a reduction
    # on two threads rounds differently), with its rounding mode
    torch.set_num_threads(rounding["threads"])
    new.flush_denormals(rounding["flush_denormals"])
    adopted = skipped = 0
    for number in map(int, experiments.split(",")):
        experiment = new.EXPERIMENTS[number]
        records = old_records(old_dir, experiment.name)

        def old_id(spec):  # older code derives seeds in ModelRuns.seed, by this formula
            return identity(spec, spec.get("seed", old.derive_seed(
                experiment.name, spec["arch"], spec["optimizer"], spec.get("d") or spec["width"],
                spec.get("replicate", 0))))

        def new_id(spec):
            return identity(spec, new.model_seed(experiment.name, spec))
        old_setup = getattr(old, SETUPS[number])()  # older code has no EXPERIMENTS
        old_groups = {old_id(s): {old_id(t) for t in group}
                      for group in old.fused_groups(old_setup["specs"], "cpu") for s in group}
        setup = experiment.setup()
        runs = new.ModelRuns(experiment.name, data, os.path.join(new_dir, "records"),
                             log=None, rounding=rounding)
        for group in runs.groups(setup["specs"]):
            for spec in group:
                if new_id(spec) not in records:
                    continue
                json_path, weights_path = runs._paths(spec, group)
                if os.path.exists(json_path):
                    skipped += 1
                    continue
                old_json, record = records[new_id(spec)]
                where = os.path.relpath(old_json, ROOT)
                problems = []
                if old_groups.get(new_id(spec)) != {new_id(s) for s in group}:
                    problems.append("trained in another group")
                if record["diverged"]:
                    problems.append("diverged (its final numbers cannot be checked)")
                old_weights = old_json[:-len(".json")] + ".pt"
                model = runs._rebuild(spec, torch.load(old_weights, weights_only=True))
                analysis = json_ready(new, new.analyse_model(model, data))
                # the same kind of processor computes the same bits; another (the first
                # campaign finished some models on an Intel Xeon) rounds float32 sums
                # otherwise, so there, or where the record does not say (older code), the
                # numbers must agree to RTOL
                there = (record.get("provenance") or {}).get("cpu")
                rtol = 0.0 if there == new.cpu_name() else RTOL
                worst = [0.0]
                compare(record, analysis, "", problems, rtol, worst)
                last = None
                # a measure that keeps state (Exp 4's drift, against epoch 1) cannot be
                # redone from the final weights alone
                if setup["measure"] is not None and not hasattr(setup["measure"],
                                                                "state_dict"):
                    last = json_ready(new, setup["measure"](spec, model, spec["epochs"], data))
                    compare(record["checkpoints"][-1], last, "/checkpoints[-1]", problems,
                            rtol, worst)
                if problems:
                    sys.exit(f"adopt.py: {where} not adopted: " + "; ".join(problems[:5]))
                added = []
                out = merged(record, {**spec, **analysis}, "", added)
                if last is not None:
                    missing = [name for name in last if name not in record["checkpoints"][0]]
                    out["checkpoints"] = [{**c, **dict.fromkeys(missing)}
                                          for c in record["checkpoints"]]
                    out["checkpoints"][-1] = merged(record["checkpoints"][-1], last, "", [])
                    added += [f"/checkpoints/{name}" for name in missing]
                out["rounding"] = rounding
                out["adopted"] = {"from": where, "trained_by_commit": old_commit,
                                  "added": added, "checked_on": new.cpu_name(),
                                  "largest_relative_difference": worst[0]}
                os.makedirs(os.path.dirname(json_path), exist_ok=True)
                shutil.copyfile(old_weights, weights_path)
                new.save_json(json_path, out)  # written last: its presence marks it done
                adopted += 1
                print(f"adopted {where} -> {os.path.relpath(json_path, ROOT)}, "
                      f"{'identical' if worst[0] == 0 else f'within {worst[0]:.1e}'}"
                      + (f" (added {', '.join(added)})" if added else ""))
    print(f"{adopted} adopted, {skipped} already there")


if __name__ == "__main__":
    main(sys.argv[1:])
