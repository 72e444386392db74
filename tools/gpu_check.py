"""One command that proves the GPU path on one GPU, within a time budget (not part of the
pytest run; its report from one NVIDIA H200 is docs/gpu_check_h200.json):

    python tools/gpu_check.py OUT_DIR [--budget 480] [--fraction 0.005] [--benchmark-epochs 10]

In this order, each check started only while the budget (seconds) lasts:
1. the CUDA tests of tests/test_fused.py (CUDA graphs against eager epochs);
2. each experiment of `full` at `--fraction` of its epochs, eager and with CUDA graphs;
   from these, `full`'s wall time extrapolated: the training time read from the runs'
   records scales with the epochs, the checkpoint measures with their number, and the
   rest (analysis, start-up) stays as it was;
3. `full`'s --plan, its estimate of each experiment against those extrapolations, and
   the plan's probe at two steps an epoch (as the plan runs it) against the same probe at
   a whole epoch's steps (a probe's epoch's own costs weigh more in a short epoch);
4. a smoke run (a snapshot after every epoch) killed with SIGKILL once a model's record
   and a group's snapshot exist, and rerun, finished groups loaded and a group part-way
   resumed from its snapshot, against an uninterrupted one: the same numbers (a rerun
   that resumed no group from a snapshot fails); then the same with CUDA
   graphs, whose resumed numbers may differ in rounding (the largest difference, and
   whether --compare finds the resumed run within the uninterrupted one's band);
5. an epoch of each of Exp 1's fused groups with the activations in PyTorch's default
   layout and in channels-last (the CPU's);
6. tools/benchmark.py at --benchmark-epochs (plain, fused, fused with CUDA graphs);
7. Exp 1 at `--fraction` of its epochs as 1, 2 and 4 concurrent shard processes on the
   one GPU (a count is skipped when less of the budget is left than 1.5 times what one
   process took; a failed one reports its return codes and its errors' last lines).

It prints one summary table and writes it, with each command's output's tail, to
OUT_DIR/gpu_check.json (rewritten after every check). Without CUDA it exits 2 with one
line. `--device cpu --preset smoke --fraction 0.5` runs the same steps on a CPU, to check
this script itself (13 min on a 2-core AMD EPYC that was also running another job, before
the resume check with graphs was added; that check alone took 44 s there).
"""
import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "neural_collapse_cka.py")
RESULTS = "neural_collapse_cka_results.json"
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]
# each experiment's epoch count, by the global that sets it
EPOCHS = {1: "EPOCHS_MODEL_WISE", 2: "EPOCHS_EPOCH_WISE", 3: "EPOCHS_GEN_NC", 4: "EPOCHS_CKA"}


DEADLINE = float("inf")  # time.time() by which every command must end (main's --budget)


def time_left():
    return max(DEADLINE - time.time(), 1.0)


def run(cmd):
    """(seconds, completed process) of `cmd` run from the repository root; a command that
    runs past the budget's deadline counts as failed (return code 124), and the check goes
    on."""
    start = time.time()
    timeout = time_left()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        done = subprocess.CompletedProcess(cmd, 124, e.stdout or "", e.stderr or "")
        done.stdout = done.stdout if isinstance(done.stdout, str) else done.stdout.decode()
        done.stderr = (done.stderr if isinstance(done.stderr, str) else done.stderr.decode())
        done.stderr += f"\ntimed out after {timeout} s"
    return time.time() - start, done


def tail(text, lines=15):
    return "\n".join(text.strip().splitlines()[-lines:])


PRESET = "full"  # the study whose epochs the timed runs scale (main's --preset)


def study(out, device, *args):
    preset = [] if "--preset" in args else ["--preset", PRESET]
    return [sys.executable, SCRIPT, "--device", device, "--out", out, *preset, *args]


def check_cuda_tests(report, device):
    seconds, done = run([sys.executable, "-m", "pytest", "-q", "tests/test_fused.py", "-k",
                         "graph or captured_lr"])
    report["cuda_tests"] = {"ok": done.returncode == 0, "seconds": seconds,
                            "output": tail(done.stdout)}


def check_benchmark(report, device, epochs):
    import neural_collapse_cka as ncc
    seconds, done = run([sys.executable, "tools/benchmark.py", "--device", device,
                         "--epochs", str(epochs), "--widths", ",".join(map(str, ncc.WIDTHS))])
    report["benchmark"] = {"ok": done.returncode == 0, "seconds": seconds,
                           "output": tail(done.stdout + done.stderr)}


def _largest_difference(a, b):
    """The largest absolute difference between the numbers of two results, or None when
    their shapes differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return None
        parts = [_largest_difference(a[k], b[k]) for k in a]
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return None
        parts = [_largest_difference(x, y) for x, y in zip(a, b)]
    elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return 0.0 if a == b or (a != a and b != b) else abs(a - b)
    else:
        return 0.0 if a == b else None
    return None if None in parts else max(parts, default=0.0)


def check_kill_and_resume(report, device, out, graphs=False):
    """A killed smoke run resumed, against one never stopped. Eager: the same numbers to
    the bit. With CUDA graphs the epoch after a resume is the graph's eager warm-up (SGD's
    rate a float64, not the graph's float32), so the numbers may differ in rounding: the
    largest difference is reported, and `ok` is --compare's verdict of the resumed run
    against the uninterrupted one (the band that admits another seed)."""
    from conftest import numbers_only
    name = "kill_and_resume_graphs" if graphs else "kill_and_resume"
    args = ["--preset", "smoke", "--set", "EPOCHS_MODEL_WISE=15", "--set", "CPU_GROUP_WIDTH=4",
            "--set", "SNAPSHOT_SECONDS=0", "--set", f"CUDA_GRAPHS={graphs}"]
    _, reference = run(study(f"{out}/{name}_ref", device, *args))
    killed = f"{out}/{name}_killed"
    proc = subprocess.Popen(study(killed, device, *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    # killed once a record and a snapshot exist: a group part-way, in training or in storing
    # its records (its snapshot is removed after them), so that the rerun must resume one
    # from its snapshot; on a GPU the first record alone once left no group part-way
    deadline = time.time() + min(300, time_left())
    while time.time() < deadline and proc.poll() is None:
        if records_and_snapshots(os.path.join(killed, "records")) >= (1, 1):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, resumed = run(study(killed, device, *args))
    same, difference, compared = False, None, None
    if reference.returncode == 0 and resumed.returncode == 0:
        load = lambda folder: numbers_only(json.load(open(os.path.join(folder, RESULTS))))
        same = load(f"{out}/{name}_ref") == load(killed)
        difference = _largest_difference(load(f"{out}/{name}_ref"), load(killed))
        _, compared = run([sys.executable, SCRIPT, "--compare", os.path.join(killed, RESULTS),
                           "--reference", os.path.join(f"{out}/{name}_ref", RESULTS)])
    snapshot_lines = resumed.stdout.count("from the snapshot a stopped run left")
    agrees = compared is not None and compared.returncode == 0 if graphs else same
    report[name] = {
        # a rerun that resumed no group from its snapshot has not checked the resume
        "ok": agrees and snapshot_lines > 0,
        "bit_identical": same, "largest_difference": difference,
        "cached_lines": resumed.stdout.count("(cached)"),
        "snapshot_lines": snapshot_lines,
        "output": tail(resumed.stdout + resumed.stderr)
        + ("" if compared is None else "\n" + tail(compared.stdout + compared.stderr, 1))
        + ("" if snapshot_lines else "\nno group was resumed from its snapshot")}


def records_and_snapshots(folder):
    """(number of finished models' records, number of snapshots of groups part-way) under
    a run's records folder."""
    names = [name for _, _, files in os.walk(folder) for name in files
             if not name.startswith(".")]
    return (sum(name.endswith(".json") for name in names),
            sum(name.endswith(".snapshot") for name in names))


def extrapolate(number, folder, wall, scale):
    """Seconds of `full`'s Exp `number` from a run of it at 1/scale of its epochs that took
    `wall` seconds: its training time (from its records: each model's share of its group's
    wall time, less its checkpoint measures) times `scale`, its checkpoint measures at
    their mean time times `full`'s number of checkpoints, and the rest (analysis, start-up)
    as it was. Groups are taken to run one after another, as they do on a GPU."""
    import glob
    import neural_collapse_cka as ncc
    records = [json.load(open(path))
               for path in glob.glob(os.path.join(folder, "records", f"exp{number}", "*.json"))]
    measuring = sum(r.get("checkpoint_seconds", 0.0) for r in records)
    training = sum(r["seconds"] for r in records) - measuring
    measured = sum(len(r["checkpoints"]) for r in records)
    full_checkpoints = sum(len(s.get("checkpoints", ()))
                           for s in ncc.EXPERIMENTS[number].setup()["specs"])
    per_checkpoint = measuring / measured if measured else 0.0
    return (max(wall - training - measuring, 0.0) + training * scale
            + per_checkpoint * full_checkpoints)


def check_full_fraction(report, device, out, fraction):
    import neural_collapse_cka as ncc
    rows = {}
    for number, name in EPOCHS.items():
        full_epochs = getattr(ncc, name)
        epochs = max(1, round(full_epochs * fraction))
        for graphs in (False, True):
            folder = f"{out}/full_exp{number}_{'graphs' if graphs else 'eager'}"
            # Exp 4's drift checkpoints scaled with its epochs: they must lie within the run
            drift = sorted({max(1, round(e * fraction)) for e in ncc.CKA_DRIFT_EPOCHS})
            scaled = ["--set", f"CKA_DRIFT_EPOCHS={drift}"] if number == 4 else []
            seconds, done = run(study(folder, device, "--experiments", str(number), "--set",
                                      f"{name}={epochs}", "--set", f"CUDA_GRAPHS={graphs}",
                                      *scaled))
            wall = estimate = None
            if done.returncode == 0:
                wall = json.load(open(os.path.join(folder, RESULTS)))["env"]["wall_seconds"]
                wall = wall[f"exp{number}"]
                estimate = extrapolate(number, folder, wall, full_epochs / epochs)
            rows[f"exp{number} {'graphs' if graphs else 'eager'}"] = {
                "ok": done.returncode == 0, "epochs": epochs, "wall": wall,
                "full_estimate": estimate, "output": tail(done.stdout + done.stderr, 5)}
    report["full_fraction"] = rows
    for mode in ("eager", "graphs"):
        walls = [rows[f"exp{n} {mode}"]["full_estimate"] for n in EPOCHS]
        report[f"full_{mode}_estimate"] = sum(walls) if None not in walls else None


def seconds_of(duration):
    """Seconds of one of the script's durations: '1h09m', '11m17s', '5s'."""
    h, m, sec = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", duration).groups()
    return 3600 * int(h or 0) + 60 * int(m or 0) + int(sec or 0)


def check_plan(report, device, out):
    """`full`'s --plan on this device (eager, nothing trained yet) against the eager wall
    times extrapolated from the timed runs: how far the plan's probe misjudges each
    experiment here."""
    _, done = run(study(f"{out}/plan", device, "--plan"))
    planned = {f"exp{n}": seconds_of(d) for n, d in
               re.findall(r"^  exp(\d+): .*, ~(\S+)$", done.stdout, re.M)}
    timed = {key.split()[0]: row["full_estimate"]
             for key, row in report.get("full_fraction", {}).items()
             if key.endswith("eager") and row["full_estimate"]}
    report["plan"] = {
        "ok": done.returncode == 0 and len(planned) == len(EPOCHS),
        "planned_seconds": planned,
        "planned_over_extrapolated": {name: planned[name] / timed[name]
                                      for name in planned if name in timed},
        "output": tail(done.stdout + done.stderr, 8)}


# Prints {experiment: [its groups' epochs x step seconds at 2 steps an epoch, the same at a
# whole epoch's steps]} for the preset and device given: a subprocess, so that this one's
# device stays untouched, with the plan's own code
PROBE_EPOCHS = """
import json, sys, torch
import neural_collapse_cka as ncc
preset, device = sys.argv[1], torch.device(sys.argv[2])
ncc.apply_settings(ncc.PRESETS[preset])
whole = -(-ncc._dataset_sizes()[0] // ncc.BATCH_SIZE)
seconds = {}
for name, group in ncc.study_groups(range(1, 5), device.type):
    training = [ncc.probe_step_seconds(group, device, steps) * group[0]["epochs"]
                for steps in (2, whole)]
    seconds[name] = [a + b for a, b in zip(seconds.get(name, [0.0, 0.0]), training)]
print(json.dumps({"whole_epoch_steps": whole, "seconds": seconds}))
"""


def check_probe(report, device):
    """The plan's probe times steps in epochs of two steps, whose own costs (a shuffle, a
    host sync) are then shared by two steps, not by a whole epoch's: each experiment's
    training time by the probe at two steps an epoch over the same at a whole epoch's, so
    that a probe misjudging a GPU (the plan check) can be told from a plan missing a
    cost."""
    seconds, done = run([sys.executable, "-c", PROBE_EPOCHS, PRESET, device])
    ratios = {}
    if done.returncode == 0:
        measured = json.loads(done.stdout.strip().splitlines()[-1])
        ratios = {name: two / whole for name, (two, whole) in measured["seconds"].items()}
    report["probe"] = {"ok": done.returncode == 0, "seconds": seconds,
                       "two_over_whole_epoch": ratios,
                       "output": tail(done.stdout + done.stderr, 3)}


def check_shards(report, device, out, fraction):
    import neural_collapse_cka as ncc
    epochs = max(1, round(ncc.EPOCHS_MODEL_WISE * fraction))
    rows = {}
    for count in (1, 2, 4):
        if "1" in rows and time_left() < 1.5 * rows["1"]["wall"]:
            rows[str(count)] = {"ok": None, "epochs": epochs, "wall": None,
                                "output": "skipped: the budget was spent"}
            continue
        folder = f"{out}/shards_{count}"
        args = ["--experiments", "1", "--set", f"EPOCHS_MODEL_WISE={epochs}"]
        # each shard's errors to a file: a pipe nobody reads while it runs can fill and stall it
        errors = [f"{out}/shards_{count}_{i}.stderr" for i in range(count)]
        start = time.time()
        procs = []
        for i in range(count):
            with open(errors[i], "w") as stderr:  # the child keeps its own copy
                procs.append(subprocess.Popen(
                    study(folder, device, *args, "--shard", f"{i}/{count}"), cwd=ROOT,
                    stdout=subprocess.DEVNULL, stderr=stderr))
        codes = []
        for proc in procs:
            try:
                codes.append(proc.wait(timeout=time_left()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                codes.append(124)
        wall = time.time() - start
        _, collect = run(study(folder, device, *args, "--collect"))
        codes.append(collect.returncode)
        output = "; ".join(tail(open(path).read(), 3)
                           for path, code in zip(errors, codes) if code)
        if collect.returncode:
            output += tail(collect.stdout + collect.stderr, 3)
        if 124 in codes:
            output = "out of budget: " + output
        rows[str(count)] = {"ok": not any(codes), "epochs": epochs, "wall": wall,
                            "return_codes": codes, "output": output}
    report["exp1_shards"] = rows


def check_layouts(report, device, epochs=3):
    """Seconds per epoch of Exp 1's fused groups (random inputs of the training set's
    size) with the activations in each memory layout: whether the CPU's channels-last
    layout could serve a GPU too (one code path), or costs there."""
    import torch
    import neural_collapse_cka as ncc
    dev = ncc.resolve_device(device)
    n = 4000 if ncc.TRAIN_SUBSET is None else ncc.TRAIN_SUBSET
    data = {"x_train": torch.randn(n, 40, device=dev),
            "y_train": torch.randint(0, ncc.NUM_CLASSES, (n,), device=dev)}
    groups = ncc.fused_groups(ncc.EXPERIMENTS[1].setup()["specs"], dev.type)
    chosen, rows = ncc.activation_layout, {}
    try:
        for name, layout in (("default", torch.contiguous_format),
                             ("channels_last", torch.channels_last)):
            ncc.activation_layout = lambda device_type, layout=layout: layout
            seconds = 0.0
            for group in groups:
                models = [ncc.make_model(s["arch"], s["width"], 0) for s in group]
                names, seeds = [s["optimizer"] for s in group], list(range(len(group)))
                ncc.train_models(models, data, names, 1, seeds)  # first use of each kernel
                start = time.time()
                ncc.train_models(models, data, names, epochs, seeds)
                seconds += (time.time() - start) / epochs
            rows[name] = seconds
    finally:
        ncc.activation_layout = chosen
    report["layouts"] = {"ok": True, "epoch_seconds": rows, "groups": len(groups),
                         "chosen_here": str(chosen(dev.type)),
                         "output": (f"an epoch of exp1's {len(groups)} groups: default "
                                    f"{rows['default']:.2f} s, channels_last "
                                    f"{rows['channels_last']:.2f} s")}


def summary(report):
    lines = [f"{'check':<28} {'ok':<4} result"]
    for key in report.get("skipped", []):
        lines.append(f"{key:<28} {'-':<4} skipped: the budget was spent")
    for key in ("cuda_tests", "benchmark", "kill_and_resume", "kill_and_resume_graphs",
                "layouts"):
        if key not in report:
            continue
        item = report[key]
        last = item.get("output", "").splitlines()[-1:] or [""]
        lines.append(f"{key:<28} {str(item.get('ok')):<4} {last[0][:70]}")
    for key, row in report.get("full_fraction", {}).items():
        failed = "out of budget" if "timed out after" in row["output"] else "failed"
        wall = failed if row["wall"] is None else (
            f"{row['wall']:.1f} s at {row['epochs']} epochs -> full {row['full_estimate']:.0f} s")
        lines.append(f"{key:<28} {str(row['ok']):<4} {wall}")
    for mode in ("eager", "graphs") if "full_fraction" in report else ():
        value = report.get(f"full_{mode}_estimate")
        lines.append(f"{'full, ' + mode + ', extrapolated':<28} {'':<4} "
                     + ("-" if value is None else f"{value / 60:.1f} min"))
    if "plan" in report:
        ratios = report["plan"]["planned_over_extrapolated"]
        lines.append(f"{'plan / extrapolated (eager)':<28} {str(report['plan']['ok']):<4} "
                     + (", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) or "-"))
    if "probe" in report:
        ratios = report["probe"]["two_over_whole_epoch"]
        lines.append(f"{'probe 2 steps / whole epoch':<28} {str(report['probe']['ok']):<4} "
                     + (", ".join(f"{k} {v:.2f}x" for k, v in ratios.items()) or "-"))
    shards = report.get("exp1_shards", {})
    for count, row in shards.items():
        result = (f"{row['wall']:.1f} s at {row['epochs']} epochs, "
                  f"{shards['1']['wall'] / row['wall']:.2f}x one process") if row["ok"] else (
                  row.get("output", "failed")[:70])
        ok = "-" if row["ok"] is None else str(row["ok"])
        lines.append(f"{'exp1 as ' + count + ' shard(s)':<28} {ok:<4} {result}")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json and the runs' outputs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--fraction", type=float, default=0.005,
                   help="fraction of each experiment's epochs in the timed runs")
    p.add_argument("--budget", type=float, default=480,
                   help="seconds: no check starts after them, and commands end by them")
    p.add_argument("--benchmark-epochs", type=int, default=10)
    p.add_argument("--preset", default="full", choices=["full", "quick", "smoke"],
                   help="the study to time (default full; smoke checks this script quickly)")
    args = p.parse_args()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: error: CUDA is not available here; run it on a GPU machine "
              "(or --device cpu to check this script at tiny sizes)", file=sys.stderr)
        return 2
    if not args.budget > 0:
        print(f"gpu_check.py: error: --budget {args.budget} is not a positive number of "
              "seconds", file=sys.stderr)
        return 2
    if not 0 < args.fraction <= 1:
        print(f"gpu_check.py: error: --fraction {args.fraction} is not in (0, 1]",
              file=sys.stderr)
        return 2
    global PRESET
    PRESET = args.preset
    import neural_collapse_cka as ncc
    ncc.apply_settings(ncc.PRESETS[PRESET])  # so its epochs and checkpoints are read here
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "preset": PRESET,
              "fraction": args.fraction, "budget": args.budget,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "skipped": []}
    start = time.time()
    global DEADLINE
    DEADLINE = start + args.budget
    # most telling first: a check that would start after the budget is spent is skipped,
    # and the report is rewritten after each check, so a run cut short still leaves one
    checks = [("cuda_tests", lambda: check_cuda_tests(report, args.device)),
              ("full_fraction", lambda: check_full_fraction(report, args.device, args.out,
                                                            args.fraction)),
              ("plan", lambda: check_plan(report, args.device, args.out)),
              ("probe", lambda: check_probe(report, args.device)),
              ("kill_and_resume", lambda: check_kill_and_resume(report, args.device,
                                                                args.out)),
              ("kill_and_resume_graphs", lambda: check_kill_and_resume(
                  report, args.device, args.out, graphs=True)),
              ("layouts", lambda: check_layouts(report, args.device)),
              ("benchmark", lambda: check_benchmark(report, args.device,
                                                    args.benchmark_epochs)),
              ("exp1_shards", lambda: check_shards(report, args.device, args.out,
                                                   args.fraction))]
    for key, check in checks:
        if time.time() >= DEADLINE:
            report["skipped"].append(key)
        else:
            check()
        report["seconds"] = time.time() - start
        report["summary"] = summary(report)
        write_atomic_json(os.path.join(args.out, "gpu_check.json"), report)
        progress(f"[{report['seconds']:.0f} s] {key}: "
                 + ("skipped (budget spent)" if key in report["skipped"] else "done"))
    progress(f"{name}, torch {torch.__version__}, {report['seconds']:.0f} s in all")
    progress(report["summary"])
    return 0


def progress(line):
    """A line on stdout. A reader that quits (`| head`) ends the lines, not the checks: the
    report is the file, and the machine's time is too dear to lose to a closed pipe."""
    try:
        print(line, flush=True)
    except BrokenPipeError:
        import neural_collapse_cka as ncc
        ncc.to_devnull(sys.stdout)


def write_atomic_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    sys.exit(main())
