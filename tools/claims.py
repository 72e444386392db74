"""The seed study's claims beside a run's numbers, as the Markdown table the README shows.

    python tools/claims.py results/neural_collapse_cka_results.json [MORE.json ...]
    python tools/claims.py --brief RESULTS.json   # only the numbers each verdict rests on

Several files are parts of one study (each holds some of the experiments), as for
`--plot-only`. Only the results file is read: nothing trains. Each row gives the numbers
and a verdict by the rule below, so the same results always give the same table. Results
of several replicates (seeds) are judged seed by seed: each row gives every seed's
numbers and says in how many seeds the claim holds (a claim over several configurations
holds in a seed where it holds in all of them); Exp 4's seeds are its 4C comparison, so
its rows are as for one seed.

Rules (test errors are fractions of the 1000 test samples; a rise of 0.02 is 20 samples,
about twice a test error's binomial standard deviation near 0.15):

- Exp 1, peak at 10^3-10^4 parameters: in each configuration, the largest rise of test
  error from a width to any wider one (min at width i, max at width j > i). A rise of at
  least 0.02 is a peak, at the parameter count of width j; the claim holds for a
  configuration whose peak lies in [1e3, 1e4].
- Exp 1, SGD beats Adam at large width: at the widest width, SGD's test error is below
  Adam's by at least 0.02, for each architecture (a smaller difference is a tie).
- Exp 2, width 12 fluctuates, width 64 learns early and memorises late: the test error
  curve is smoothed by a running median of three checkpoints; its largest rise (first
  minimum at epoch a, peak at epoch b > a) is the epoch-wise bump. Width 64 holds if its
  bump is at least 0.02 and its training error first falls to 0.01 or below (it has
  memorised the noisy labels) after its first minimum. Width 12 holds if, over the second
  half of the checkpoints, its test error moves more between neighbouring checkpoints
  (median absolute change) than width 64's does.
- Exp 3, NC2 drops to zero at d = 9: NC2 at d = 9 is below 0.1.
- Exp 4, a CKA value of the seed study: holds within 0.05; else "lower" or "higher".
"""
import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the same rise, smoothing, fit and fluctuation as `--compare`'s headline numbers
from neural_collapse_cka import (largest_rise, late_fluctuation, memorised_epoch,  # noqa: E402
                                 running_median3)
from neural_collapse_cka import EXIT_OUTPUT_CLOSED, OutputClosed, say  # noqa: E402

PEAK_RISE = 0.02         # smallest difference of test errors that counts (20 of 1000)
PEAK_PARAMS = (1e3, 1e4)
NC2_ZERO = 0.1
CKA_TOLERANCE = 0.05
# (row label, the seed study's value, where it is in exp4)
CKA_CLAIMS = [("cross-architecture CKA 0.34 at L3 (4A)", 0.34, ("cross_arch", 3, 3)),
              ("cross-seed CKA 0.97 at L0 (4C)", 0.97, ("cross_seed", "L0")),
              ("cross-seed CKA about 0.59 at L2 and L3 (4C)", 0.59, ("cross_seed", "L2", "L3"))]


def _num(x):
    return float("nan") if x is None else float(x)


def _params(n):
    return f"{n:,}"


def _thousands(n):
    return f"{n / 1000:.1f}k"


# Each row function returns (numbers, verdict, brief): `brief` is the few numbers the
# verdict rests on, as (label, value) pairs whose labels do not depend on the values, so
# that the brief table can line several seeds' values up under one label.
def exp1_peak_rows(exp1):
    cells, holds, brief = [], [], []
    for name, run in exp1.items():
        test_err = [_num(x) for x in run["test_err"]]
        rise = largest_rise(test_err)
        label = name.replace("_", " ")
        if rise is None or test_err[rise[1]] - test_err[rise[0]] < PEAK_RISE:
            cells.append(f"{label}: no peak")
            holds.append(False)
            brief.append((f"{label} peak at w =", "none"))
            continue
        i, j = rise
        params = run["params"][j]
        cells.append(f"{label}: {test_err[i]:.3f} (w = {run['width'][i]}) → {test_err[j]:.3f} "
                     f"at w = {run['width'][j]}, {_params(params)} params")
        holds.append(PEAK_PARAMS[0] <= params <= PEAK_PARAMS[1])
        brief.append((f"{label} peak at w =", f"{run['width'][j]} ({_thousands(params)})"))
    return "; ".join(cells), _count(holds), brief


def exp1_sgd_adam_row(exp1):
    cells, holds, brief = [], [], []
    for arch in sorted({name.split("_")[0] for name in exp1}, reverse=True):
        sgd, adam = exp1.get(f"{arch}_SGD"), exp1.get(f"{arch}_Adam")
        if sgd is None or adam is None:
            continue
        width = sgd["width"][-1]
        if adam["width"][-1] != width:
            continue
        sgd_err, adam_err = _num(sgd["test_err"][-1]), _num(adam["test_err"][-1])
        tie = " (a tie)" if abs(sgd_err - adam_err) < PEAK_RISE else ""
        cells.append(f"{arch} w = {width}: SGD {sgd_err:.3f}, Adam {adam_err:.3f}{tie}")
        holds.append(sgd_err <= adam_err - PEAK_RISE)
        brief.append((f"{arch} w = {width}, Adam − SGD", f"{adam_err - sgd_err:+.3f}"))
    if not cells:
        return "needs SGD and Adam at one widest width", "–", []
    return "; ".join(cells), _count(holds), brief


def _count(holds):
    if all(holds):
        return "yes"
    if not any(holds):
        return "no"
    return f"in {sum(holds)} of {len(holds)}"


def epoch_bump(run):
    """(first-minimum epoch, its test error, peak epoch, its test error) of the smoothed
    test error, or None if it never rises."""
    smooth = running_median3([_num(x) for x in run["test_err"]])
    rise = largest_rise(smooth)
    if rise is None:
        return None
    i, j = rise
    return run["epoch"][i], smooth[i], run["epoch"][j], smooth[j]


def exp2_rows(exp2):
    rows = []
    large, critical = exp2.get("large"), exp2.get("critical")
    if large is not None:
        bump = epoch_bump(large)
        memorised = memorised_epoch(large["epoch"], large["train_err"])
        end = f"end {_num(large['test_err'][-1]):.3f} at epoch {large['epoch'][-1]}"
        fit = ("training error never at or below 0.01" if memorised is None
               else f"training error ≤ 0.01 from epoch {memorised}")
        claim = f"width {large['width']} learns early and memorises late (Exp 2)"
        fitted = ("training error ≤ 0.01 from epoch", "never" if memorised is None else str(memorised))
        if bump is None:
            rows.append((claim, f"test error never rises; {end}; {fit}", "no",
                         [("smoothed first minimum → peak", "no rise"), fitted]))
        else:
            a, low, b, high = bump
            holds = high - low >= PEAK_RISE and memorised is not None and memorised > a
            rows.append((claim, f"first minimum {low:.3f} at epoch {a}, peak {high:.3f} at "
                         f"epoch {b} (smoothed test error), {end}; {fit}",
                         "yes" if holds else "no",
                         [("smoothed first minimum → peak", f"{low:.3f} → {high:.3f} (epoch {a} → {b})"),
                          fitted]))
    if critical is not None:
        wobble = late_fluctuation(critical["test_err"])
        cell = f"median change between checkpoints in the second half {wobble:.3f}"
        if large is None:
            verdict = "–"
            brief = [(f"width {critical['width']}'s median change between checkpoints, "
                      "second half:", f"{wobble:.3f}")]
        else:
            large_wobble = late_fluctuation(large["test_err"])
            cell += f" (width {large['width']}: {large_wobble:.3f})"
            verdict = "yes" if wobble > large_wobble else "no"
            brief = [(f"median change between checkpoints, second half, width "
                      f"{critical['width']} vs {large['width']}:",
                      f"{wobble:.3f} vs {large_wobble:.3f}")]
        late = [_num(x) for x in critical["test_err"][len(critical["test_err"]) // 2:]]
        cell += f"; test error {min(late):.3f}–{max(late):.3f} in the second half"
        rows.append((f"width {critical['width']} fluctuates (Exp 2)", cell, verdict, brief))
    return rows


def exp3_row(exp3):
    nc2 = dict(zip(exp3["d"], exp3["nc2"]))
    if 9 not in nc2:
        return "no model at d = 9", "–", []
    shown = ", ".join(f"{_num(nc2[d]):.2f} at d = {d}" for d in (8, 9, 10, 16) if d in nc2)
    brief = [(f"NC2 at d = {d}:", f"{_num(nc2[d]):.2f}") for d in (8, 9) if d in nc2]
    return shown, "yes" if _num(nc2[9]) < NC2_ZERO else "no", brief


def exp4_rows(exp4):
    rows = []
    for label, claimed, where in CKA_CLAIMS:
        if where[0] == "cross_arch":
            values, over = [exp4["cross_arch"][where[1]][where[2]]], ""
        else:
            layers = where[1:]
            values = [v for layer in layers for v in exp4["cross_seed"][layer]]
            over = (f" (mean of {len(values) // len(layers)} seed pairs"
                    + (f" × {len(layers)} layers)" if len(layers) > 1 else ")"))
        value = statistics.fmean(_num(v) for v in values)
        if abs(value - claimed) <= CKA_TOLERANCE:
            verdict = "yes"
        else:
            verdict = "no, lower" if value < claimed else "no, higher"
        shown = f"{value:.3f}{over}"
        rows.append((label, shown, verdict, [("", shown)]))
    return rows


def seed_count(results):
    """How many replicates (seeds) the Exp 1-3 results hold: 1 without replicates."""
    for name, path in (("exp1", None), ("exp2", None), ("exp3", "nc2")):
        part = results.get(name)
        if not part:
            continue
        series = part if path else next(iter(part.values()))
        replicates = series.get("replicates", {}).get(path or "test_err")
        if replicates:
            return len(replicates[0])
    return 1


def seed_view(results, seed):
    """`results` with every Exp 1-3 value the claims read replaced by seed `seed`'s own
    (from "replicates": lists over points of lists over seeds)."""
    view = json.loads(json.dumps(results))
    for name, keys in (("exp1", ("test_err", "train_err")), ("exp2", ("test_err", "train_err")),
                       ("exp3", ("nc2",))):
        part = view.get(name) or {}
        for series in [part] if name == "exp3" else part.values():
            if "replicates" not in series:
                raise SystemExit(f"claims.py: {name} holds one seed's values and another "
                                 "experiment several seeds': give results of one study")
            for key in keys:
                series[key] = [seeds[seed] for seeds in series["replicates"][key]]
    return view


def claims_table(results, brief=False):
    """Markdown rows: | claim | this run | holds? |, for the experiments the results hold;
    seed by seed for results of several seeds. `brief`: only the numbers each verdict
    rests on, several seeds' values side by side (v0 / v1 / v2)."""
    seeds = seed_count(results)
    if seeds == 1:
        return _table([(claim, _brief_cell([values]) if brief else numbers, verdict)
                       for claim, numbers, verdict, values in claim_rows(results)])
    per_seed = [claim_rows(seed_view(results, s)) for s in range(seeds)]
    rows = []
    for i, (claim, numbers, verdict, values) in enumerate(per_seed[0]):
        if claim.endswith("(4A)") or claim.endswith("(4C)"):
            rows.append((claim, _brief_cell([values]) if brief else numbers, verdict))
            continue
        verdicts = [rows_of_seed[i][2] for rows_of_seed in per_seed]
        if brief:
            cells = _brief_cell([rows_of_seed[i][3] for rows_of_seed in per_seed])
        else:
            cells = "<br>".join(f"replicate {s}: {rows_of_seed[i][1]}"
                              for s, rows_of_seed in enumerate(per_seed))
        holds = sum(v == "yes" for v in verdicts)
        detail = "" if set(verdicts) <= {"yes", "no"} else f" ({', '.join(verdicts)})"
        rows.append((claim, cells, f"in {holds} of {seeds} seeds{detail}"))
    header = ("seeds " + " / ".join(map(str, range(seeds)))) if brief and seeds > 1 else "this run"
    return _table(rows, header)


def _brief_cell(values_per_seed):
    """'label v0 / v1 / ...; label ...' from each seed's (label, value) pairs."""
    labels = [label for label, _ in values_per_seed[0]]
    return "; ".join((label + " " if label else "")
                     + " / ".join(values[k][1] for values in values_per_seed)
                     for k, label in enumerate(labels))


def _table(rows, header="this run"):
    lines = [f"| claim of the seed study | {header} | holds? |", "|---|---|---|"]
    lines += [f"| {claim} | {numbers} | {verdict} |" for claim, numbers, verdict in rows]
    return "\n".join(lines)


def claim_rows(results):
    """(claim, numbers, verdict, brief) of each claim the results can judge."""
    rows = []
    if "exp1" in results:
        rows.append(("peak test error at 10³–10⁴ parameters (Exp 1)", *exp1_peak_rows(results["exp1"])))
        rows.append(("SGD beats Adam at large width (Exp 1)", *exp1_sgd_adam_row(results["exp1"])))
    if "exp2" in results:
        rows.extend(exp2_rows(results["exp2"]))
    if "exp3" in results:
        rows.append(("NC2 drops to zero at d = 9 (Exp 3)", *exp3_row(results["exp3"])))
    if "exp4" in results:
        rows.extend(exp4_rows(results["exp4"]))
    return rows


def load(paths):
    merged = {}
    for path in paths:
        try:
            with open(path) as f:
                part = json.load(f)
        except (OSError, ValueError) as e:
            raise SystemExit(f"claims.py: cannot read results file {path}: {e}") from None
        if not isinstance(part, dict) or not any(k in part for k in ("exp1", "exp2", "exp3", "exp4")):
            raise SystemExit(f"claims.py: {path} is not a results file "
                             "(no exp1, exp2, exp3 or exp4 entry)")
        merged.update({k: v for k, v in part.items() if k.startswith("exp")})
    return merged


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="results JSON files (parts of one study)")
    p.add_argument("--brief", action="store_true",
                   help="only the numbers each verdict rests on, each seed's side by side")
    args = p.parse_args(argv)
    try:
        say(claims_table(load(args.results), brief=args.brief))
    except SystemExit as e:
        print(e, file=sys.stderr)
        return 2
    except OutputClosed:  # `| head`: the reader has what it wanted
        return EXIT_OUTPUT_CLOSED
    return 0


if __name__ == "__main__":
    sys.exit(main())
