"""Subnormal floats on a CPU: with FLUSH_DENORMALS every thread that trains computes them as
zero (in this process's intra-op threads and in worker processes), without it they survive.
Each case runs in a fresh interpreter, because the flags belong to threads that outlive a
test."""
import subprocess
import sys

import pytest

from conftest import ROOT

SCRIPT = r"""
import sys
import torch
import neural_collapse_cka as ncc

flush = sys.argv[1] == "on"
ncc.FLUSH_DENORMALS = flush
# torch's intra-op threads start before training sets the flags: the hard case
torch.set_num_threads(2)
(torch.randn(1_000_000) * 2).sum()

data = {"x_train": torch.randn(64, 40), "y_train": torch.randint(0, 10, (64,))}
model = ncc.make_model("ResNet", 2, 0)

if __name__ == "__main__":
    ncc.train_model(model, data, "Adam", 1, 0)
    here = ncc.subnormals_survive()
    # a subnormal weight with a zero gradient, through one step of each optimizer
    steps = []
    for name in ("SGD", "Adam"):
        # 2^-129 written as bits: a float converted on a flushing thread would be 0
        weight = torch.nn.Parameter(torch.full((300_000,), 1 << 20, dtype=torch.int32)
                                    .view(torch.float32))
        weight.grad = torch.zeros_like(weight)
        opt, _ = ncc.make_optimizer([weight], name, 10)
        opt.step()
        steps.append(int((weight != 0).sum()))
    # one worker started as the runner starts its workers: it trains, then is probed
    with ncc.Workers(1, ncc.hyperparameters()) as pool:
        done = dict(pool.map_unordered([(ncc.train_model, (model, data, "Adam", 1, 0)),
                                        (ncc.subnormals_survive, ())]))
    in_worker = done[1]
    print(here, steps[0], steps[1], in_worker)
"""


@pytest.mark.parametrize("flush", ["on", "off"])
def test_subnormals_are_zero_on_every_thread_and_worker_exactly_when_flushed(flush):
    done = subprocess.run([sys.executable, "-c", SCRIPT, flush], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    here, sgd_nonzero, adam_nonzero, in_worker = done.stdout.split()
    if flush == "on":
        # False: no thread keeps a subnormal (None would be some threads only)
        assert (here, in_worker) == ("False", "False")
        assert (sgd_nonzero, adam_nonzero) == ("0", "0")
    else:
        assert (here, in_worker) == ("True", "True")
        # weight decay shrinks them a little; they stay subnormal, not zero
        assert (sgd_nonzero, adam_nonzero) == ("300000", "300000")


def test_flush_denormals_reaches_threads_started_before_it():
    script = ("import torch, neural_collapse_cka as ncc\n"
              "torch.set_num_threads(2)\n"
              "(torch.randn(1_000_000) * 2).sum()\n"
              "torch.set_flush_denormal(True)  # the calling thread alone\n"
              "print(ncc.subnormals_survive(), ncc.flush_denormals(True),"
              " ncc.subnormals_survive(), ncc.flush_denormals(False), ncc.subnormals_survive())")
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # mixed (main thread flushes, the other not), then every thread, then none
    assert done.stdout.split() == ["None", "True", "False", "True", "True"]
