"""Benchmark (not part of the pytest run): Exp 1's 44 models trained for N epochs two ways,
in one run on one machine, printing model-epochs per second and their ratio.

    plain: the way the published version of this study does it: one model at a time,
           a torch DataLoader (batch 128, shuffled) over the training tensors.
    ours:  this script's path: the whole dataset on the device, models grouped and trained
           side by side by `train_models` (on a GPU every width of one architecture and
           optimizer together; on a CPU neighbouring widths of both optimizers within
           CPU_GROUP_WIDTH, and pairs of equal width, in WORKERS processes).
    Both analyse every trained model as Exp 1 does (errors, NC metrics, per-layer NC, spectra).
    On a GPU a third row: ours with CUDA_GRAPHS (each epoch after the first one CUDA graph).

    python tools/benchmark.py --epochs 5 [--device cpu|cuda] [--widths 2,4,...] [--repeats 3]

With --bound (CPU), it times one epoch of every Exp 1 model alone three ways, the plain
way on all threads, the plain way on one thread, and this script's loop on one thread,
then one epoch of each of the groups this script fuses on a CPU (`ModelRuns.groups`) on
one thread, and prints the most that two one-thread worker processes could gain over the
plain way if they split the work perfectly: sum(plain, all threads) / (sum(groups) / 2).

    python tools/benchmark.py --bound

With --curves, it prices Exp 1's learning curves: each of Exp 1's groups (as this device
forms them, at the script's settings) trains --epochs epochs with a checkpoint evaluation
after every epoch, on one thread on a CPU as in a worker; the time spent evaluating over
the time spent training, scaled to MODEL_WISE_POINTS evaluations in EPOCHS_MODEL_WISE
epochs, is what the curves add to Exp 1's training time.

    python tools/benchmark.py --curves --epochs 2
"""
import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import neural_collapse_cka as ncc  # noqa: E402


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def plain_optimizer(model, name, epochs):
    """The published way's optimizers: torch.optim's defaults (no fused Adam)."""
    if name == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=ncc.SGD_LR, momentum=ncc.SGD_MOMENTUM,
                              weight_decay=ncc.SGD_WEIGHT_DECAY)
        return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
    return torch.optim.Adam(model.parameters(), lr=ncc.ADAM_LR,
                            weight_decay=ncc.ADAM_WEIGHT_DECAY), None


def plain(specs, data, epochs, device):
    x, y = data["x_train"].cpu(), data["y_train"].cpu()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
                                         batch_size=ncc.BATCH_SIZE, shuffle=True)
    for spec in specs:
        model = ncc.make_model(spec["arch"], spec["width"], 0).to(device).train()
        opt, scheduler = plain_optimizer(model, spec["optimizer"], epochs)
        for _ in range(epochs):
            for xb, yb in loader:
                xb, yb = xb.to(device), yb.to(device)
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad()
                loss.backward()
                opt.step()
            if scheduler is not None:
                scheduler.step()
        ncc.analyse_model(model, data)  # what every Exp 1 model records, as `ours` does
    sync(device)


def plain_epoch(model, opt, loader):
    for xb, yb in loader:
        loss = F.cross_entropy(model(xb), yb)
        opt.zero_grad()
        loss.backward()
        opt.step()


def ours_epoch(models, data, optimizers):
    ncc.train_models(models, data, optimizers, 1, list(range(len(models))))


def seconds_per_epoch(run, threads, repeats=2):
    """One warm-up epoch, then the mean of `repeats` epochs, on `threads` threads."""
    torch.set_num_threads(threads)
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def bound(widths, data):
    threads = torch.get_num_threads()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(data["x_train"], data["y_train"]),
        batch_size=ncc.BATCH_SIZE, shuffle=True)
    ncc.say(f"one epoch of each Exp 1 model alone, seconds; plain on {threads} threads")
    ncc.say(f"{'model':<18} {'plain ' + str(threads) + 't':>9} {'plain 1t':>9} {'ours 1t':>9}")
    totals = [0.0, 0.0, 0.0]
    for arch in ("ResNet", "CNN"):
        for optimizer in ("SGD", "Adam"):
            for w in widths:
                model = ncc.make_model(arch, w, 0).train()
                opt, _ = plain_optimizer(model, optimizer, 1)
                times = [seconds_per_epoch(lambda: plain_epoch(model, opt, loader), threads),
                         seconds_per_epoch(lambda: plain_epoch(model, opt, loader), 1),
                         seconds_per_epoch(lambda: ours_epoch([model], data, optimizer), 1)]
                totals = [a + b for a, b in zip(totals, times)]
                ncc.say(f"{arch + ' ' + optimizer + ' w=' + str(w):<18} "
                        + " ".join(f"{t:9.3f}" for t in times))
    ncc.say(f"{'sum':<18} " + " ".join(f"{t:9.2f}" for t in totals))
    specs = [{"arch": a, "optimizer": o, "width": w, "epochs": 1}
             for a in ("ResNet", "CNN") for o in ("SGD", "Adam") for w in widths]
    ncc.say("one epoch of each group this script fuses on a CPU, one thread, seconds")
    fused_total = 0.0
    for group in ncc.ModelRuns("bound", data, log=None).groups(specs):
        models = [ncc.make_model(s["arch"], s["width"], 0).train() for s in group]
        names = [s["optimizer"] for s in group]
        seconds = seconds_per_epoch(lambda: ours_epoch(models, data, names), 1)
        fused_total += seconds
        label = (f"{group[0]['arch']} {'+'.join(sorted(set(names)))} w="
                 + ",".join(str(w) for w in sorted({s["width"] for s in group}))
                 + f" ({len(group)})")
        ncc.say(f"{label:<34} {seconds:9.3f}")
    torch.set_num_threads(threads)
    ncc.say(f"{'sum':<34} {fused_total:9.2f}")
    ncc.say(f"most two one-thread workers can gain over plain on {threads} threads: "
            f"models alone {totals[0] / (totals[2] / 2):.2f}x, "
            f"fused groups {totals[0] / (fused_total / 2):.2f}x")


def ours(specs, data, epochs, device):
    """What the drivers do: fused groups, longest first, CPU worker processes (training and
    evaluation; nothing written)."""
    runs = ncc.ModelRuns("benchmark", data, log=None)
    groups = sorted(runs.groups(specs), key=lambda g: -ncc.group_cost(g))
    for _ in runs._fit_groups(groups, None):
        pass
    sync(device)


def ours_graphed(specs, data, epochs, device):
    """`ours` with CUDA_GRAPHS: each epoch after the first replayed as one CUDA graph."""
    ncc.CUDA_GRAPHS = True
    try:
        ours(specs, data, epochs, device)
    finally:
        ncc.CUDA_GRAPHS = False


def curves_cost(data, epochs):
    setup = ncc.model_wise_setup()
    groups = ncc.fused_groups(setup["specs"], data["x_train"].device.type)
    ncc.say(f"Exp 1: {len(setup['specs'])} models in {len(groups)} groups, "
            f"{len(setup['grid'])} evaluations in {setup['epochs']} epochs; timing {epochs} "
            f"epochs of each group with an evaluation after every one")
    training = evaluating = 0.0
    for group in groups:
        models = [ncc.make_model(s["arch"], s["width"], 0) for s in group]
        spent = [0.0]

        def measure(g, model, epoch):
            start = time.perf_counter()
            ncc.model_wise_measure(group[g], model, epoch, data)
            spent[0] += time.perf_counter() - start

        start = time.perf_counter()
        ncc.train_models(models, data, [s["optimizer"] for s in group], epochs,
                         list(range(len(group))), range(1, epochs + 1), measure)
        training += time.perf_counter() - start - spent[0]
        evaluating += spent[0]
    share = (evaluating / epochs * len(setup["grid"])) / (training / epochs * setup["epochs"])
    ncc.say(f"one epoch of every group: training {training / epochs:.2f} s, evaluating "
            f"{evaluating / epochs:.2f} s ({evaluating / training:.1%} of an epoch)")
    ncc.say(f"learning curves cost {share:.2%} of Exp 1's training time "
            f"({len(setup['grid'])} evaluations over {setup['epochs']} epochs)")


def refuse(message):
    print(f"benchmark.py: error: {message}", file=sys.stderr)
    return 2


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--device", default="auto")
    p.add_argument("--widths", default=",".join(map(str, ncc.WIDTHS)))
    p.add_argument("--bound", action="store_true",
                   help="CPU: time each model alone and print the two-worker upper bound")
    p.add_argument("--curves", action="store_true",
                   help="the cost of Exp 1's learning curves against its training")
    p.add_argument("--repeats", type=int, default=1,
                   help="time both ways this many times, alternating which goes first, and "
                        "print each round's speed-up and their median (a shared machine's "
                        "speed drifts between minutes)")
    args = p.parse_args()
    try:
        device = ncc.resolve_device(args.device)
    except ValueError as e:
        return refuse(str(e))
    try:
        widths = [int(w) for w in args.widths.split(",")]
    except ValueError:
        widths = [0]
    if not all(1 <= w <= ncc.MAX_WIDTH for w in widths):
        return refuse(f"--widths {args.widths!r}: expected comma-separated integers in "
                      f"1..{ncc.MAX_WIDTH}, like 2,4,8")
    if args.epochs < 1 or args.repeats < 1:
        return refuse(f"--epochs {args.epochs}, --repeats {args.repeats}: each must be >= 1")
    data = ncc.get_data(device=device)
    if args.bound:
        return bound(widths, data)
    if args.curves:
        with ncc.torch_threads(1 if device.type == "cpu" else torch.get_num_threads()):
            return curves_cost(data, args.epochs)
    specs = [{"arch": a, "optimizer": o, "width": w, "epochs": args.epochs}
             for a in ("ResNet", "CNN") for o in ("SGD", "Adam") for w in widths]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    ncc.say(f"{len(specs)} models x {args.epochs} epochs on {device} ({name}), "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    # warm-up: allocator, kernels, oneDNN primitives
    ours([{**s, "epochs": 1} for s in specs[:4]], data, 1, device)
    ways = [("plain (DataLoader, one at a time)", plain), ("ours (fused)", ours)]
    if device.type == "cuda":
        ways.append(("ours (fused, CUDA graphs)", ours_graphed))
    speedups = {label: [] for label, _ in ways[1:]}
    for round_ in range(args.repeats):
        rates = {}
        for label, fn in (ways if round_ % 2 == 0 else ways[::-1]):
            start = time.perf_counter()
            fn(specs, data, args.epochs, device)
            seconds = time.perf_counter() - start
            rates[label] = len(specs) * args.epochs / seconds
            ncc.say(f"{label:<36} {seconds:8.1f} s  {rates[label]:8.2f} model-epochs/s")
        for label in speedups:
            speedups[label].append(rates[label] / rates[ways[0][0]])
            ncc.say(f"speed-up of {label}: {speedups[label][-1]:.2f}x")
    if args.repeats > 1:
        for label, values in speedups.items():
            ncc.say(f"median speed-up of {label} over {args.repeats} rounds: "
                    f"{statistics.median(values):.2f}x")


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ncc.OutputClosed:  # `| head`: the reader has what it wanted
        sys.exit(ncc.EXIT_OUTPUT_CLOSED)
