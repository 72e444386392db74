"""One command that proves the GPU path (not part of the pytest run; about 8 minutes on one
H100 or H200 at the default sizes, by an estimate from earlier H100 timings; not yet run on
a GPU):

    python tests/gpu_check.py OUT_DIR [--fraction 0.01] [--benchmark-epochs 10]

1. the CUDA tests of tests/test_fused.py (CUDA graphs against eager epochs);
2. tests/benchmark.py at --benchmark-epochs (plain, fused, fused with CUDA graphs);
3. a smoke run killed with SIGKILL after its first record and rerun, against an
   uninterrupted one: the same numbers;
4. each experiment of `full` at `--fraction` of its epochs, eager and with CUDA graphs,
   and Exp 1 at that fraction as 1, 2 and 4 concurrent shard processes on the one GPU;
   from these, `full`'s wall time extrapolated (training time scales with the epochs).

It prints one summary table and writes it, with every command and its output's tail, to
OUT_DIR/gpu_check.json. Without CUDA it exits 2 with one line. `--device cpu` runs the same
steps on the CPU, to check this script itself at tiny sizes.
"""
import argparse
import json
import os
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


def run(cmd, timeout=600, **kwargs):
    """(seconds, completed process) of `cmd` run from the repository root; a command that
    runs past `timeout` counts as failed (return code 124), and the check goes on."""
    start = time.time()
    try:
        done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout, **kwargs)
    except subprocess.TimeoutExpired as e:
        done = subprocess.CompletedProcess(cmd, 124, e.stdout or "", e.stderr or "")
        done.stdout = done.stdout if isinstance(done.stdout, str) else done.stdout.decode()
        done.stderr = (done.stderr if isinstance(done.stderr, str) else done.stderr.decode())
        done.stderr += f"\ntimed out after {timeout} s"
    return time.time() - start, done


def tail(text, lines=15):
    return "\n".join(text.strip().splitlines()[-lines:])


def study(out, device, *args):
    return [sys.executable, SCRIPT, "--device", device, "--out", out, *args]


def check_cuda_tests(report, device):
    seconds, done = run([sys.executable, "-m", "pytest", "-q", "tests/test_fused.py", "-k",
                         "cuda or graph"])
    report["cuda_tests"] = {"ok": done.returncode == 0, "seconds": seconds,
                            "output": tail(done.stdout)}


def check_benchmark(report, device, epochs):
    seconds, done = run([sys.executable, "tests/benchmark.py", "--device", device,
                         "--epochs", str(epochs)])
    report["benchmark"] = {"ok": done.returncode == 0, "seconds": seconds,
                           "output": tail(done.stdout + done.stderr)}


def check_kill_and_resume(report, device, out):
    from test_cli import numbers_only
    args = ["--preset", "smoke", "--set", "EPOCHS_MODEL_WISE=15", "--set", "CPU_GROUP_WIDTH=4"]
    _, reference = run(study(f"{out}/resume_ref", device, *args))
    killed = f"{out}/resume_killed"
    proc = subprocess.Popen(study(killed, device, *args), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    records = os.path.join(killed, "records", "exp1")
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if os.path.isdir(records) and any(f.endswith(".json") for f in os.listdir(records)):
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, resumed = run(study(killed, device, *args))
    same = False
    if reference.returncode == 0 and resumed.returncode == 0:
        load = lambda folder: numbers_only(json.load(open(os.path.join(folder, RESULTS))))
        same = load(f"{out}/resume_ref") == load(killed)
    report["kill_and_resume"] = {"ok": same, "cached_lines": resumed.stdout.count("(cached)"),
                                 "output": tail(resumed.stdout + resumed.stderr)}


def check_full_fraction(report, device, out, fraction):
    import neural_collapse_cka as ncc
    rows = {}
    for number, name in EPOCHS.items():
        epochs = max(1, round(getattr(ncc, name) * fraction))
        for graphs in (False, True):
            folder = f"{out}/full_exp{number}_{'graphs' if graphs else 'eager'}"
            seconds, done = run(study(folder, device, "--experiments", str(number), "--set",
                                      f"{name}={epochs}", "--set", f"CUDA_GRAPHS={graphs}"))
            wall = None
            if done.returncode == 0:
                wall = json.load(open(os.path.join(folder, RESULTS)))["env"]["wall_seconds"]
                wall = wall[f"exp{number}"]
            rows[f"exp{number} {'graphs' if graphs else 'eager'}"] = {
                "ok": done.returncode == 0, "epochs": epochs, "wall": wall,
                "full_estimate": wall / fraction if wall is not None else None,
                "output": tail(done.stdout + done.stderr, 5)}
    report["full_fraction"] = rows
    for mode in ("eager", "graphs"):
        walls = [rows[f"exp{n} {mode}"]["full_estimate"] for n in EPOCHS]
        report[f"full_{mode}_estimate"] = sum(walls) if None not in walls else None


def check_shards(report, device, out, fraction):
    import neural_collapse_cka as ncc
    epochs = max(1, round(ncc.EPOCHS_MODEL_WISE * fraction))
    rows = {}
    for count in (1, 2, 4):
        folder = f"{out}/shards_{count}"
        args = ["--experiments", "1", "--set", f"EPOCHS_MODEL_WISE={epochs}"]
        start = time.time()
        procs = [subprocess.Popen(study(folder, device, *args, "--shard", f"{i}/{count}"),
                                  cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)
                 for i in range(count)]
        codes = [p.wait() for p in procs]
        wall = time.time() - start
        _, collect = run(study(folder, device, *args, "--collect"))
        rows[str(count)] = {"ok": not any(codes) and collect.returncode == 0,
                            "epochs": epochs, "wall": wall}
    report["exp1_shards"] = rows


def summary(report):
    lines = [f"{'check':<28} {'ok':<4} result"]
    for key in ("cuda_tests", "benchmark", "kill_and_resume"):
        item = report.get(key, {})
        last = item.get("output", "").splitlines()[-1:] or [""]
        lines.append(f"{key:<28} {str(item.get('ok')):<4} {last[0][:70]}")
    for key, row in report.get("full_fraction", {}).items():
        wall = "failed" if row["wall"] is None else (
            f"{row['wall']:.1f} s at {row['epochs']} epochs -> full {row['full_estimate']:.0f} s")
        lines.append(f"{key:<28} {str(row['ok']):<4} {wall}")
    for mode in ("eager", "graphs"):
        value = report.get(f"full_{mode}_estimate")
        lines.append(f"{'full, ' + mode + ', extrapolated':<28} {'':<4} "
                     + ("-" if value is None else f"{value / 60:.1f} min"))
    for count, row in report.get("exp1_shards", {}).items():
        lines.append(f"{'exp1 as ' + count + ' shard(s)':<28} {str(row['ok']):<4} "
                     f"{row['wall']:.1f} s at {row['epochs']} epochs")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="folder for gpu_check.json and the runs' outputs")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--fraction", type=float, default=0.01,
                   help="fraction of each experiment's epochs in the timed runs (default 0.01)")
    p.add_argument("--benchmark-epochs", type=int, default=10)
    args = p.parse_args()
    import torch
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check.py: error: CUDA is not available here; run it on a GPU machine "
              "(or --device cpu to check this script at tiny sizes)", file=sys.stderr)
        return 2
    if not 0 < args.fraction <= 1:
        print(f"gpu_check.py: error: --fraction {args.fraction} is not in (0, 1]",
              file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    report = {"device": name, "torch": torch.__version__, "fraction": args.fraction,
              "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    start = time.time()
    check_cuda_tests(report, args.device)
    check_benchmark(report, args.device, args.benchmark_epochs)
    check_kill_and_resume(report, args.device, args.out)
    check_full_fraction(report, args.device, args.out, args.fraction)
    check_shards(report, args.device, args.out, args.fraction)
    report["seconds"] = time.time() - start
    report["summary"] = summary(report)
    with open(os.path.join(args.out, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(f"{name}, torch {torch.__version__}, {report['seconds']:.0f} s in all")
    print(report["summary"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
