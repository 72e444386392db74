"""Decisions the script takes by device type, with the GPU side forced on a CPU: which
models train together, how many worker processes train them, and the optimizers' fused
kernels with the tensor-valued learning rate that a CUDA graph reads. (The activation
layout of each device is checked in tests/test_fused.py, CUDA graph bookkeeping there too;
the CPU's grouping in tests/test_experiments.py; what truly needs a GPU is run by
tools/gpu_check.py.)"""
import os

import pytest
import torch

import neural_collapse_cka as ncc


def all_specs():
    """Every model of the full study, as each experiment's settings define it."""
    return {number: e.setup()["specs"] for number, e in ncc.EXPERIMENTS.items()}


def same_training(spec):
    """What must be equal for two models to train side by side, written out here."""
    return (spec["arch"], spec["epochs"], "d" in spec, tuple(spec.get("checkpoints", ())))


def as_keys(groups):
    """The groups as comparable values, whatever the order of groups and of their models."""
    return sorted(sorted(repr(sorted(s.items())) for s in g) for g in groups)


@pytest.mark.parametrize("number", [1, 2, 3, 4])
def test_on_a_gpu_every_width_of_one_architecture_and_optimizer_is_one_group(number):
    specs = all_specs()[number]
    groups = ncc.fused_groups(specs, "cuda")
    expected = {}
    for spec in specs:
        expected.setdefault(same_training(spec) + (spec["optimizer"],), []).append(spec)
    assert as_keys(groups) == as_keys(expected.values())
    assert sum(map(len, groups)) == len(specs)
    if number == 1:  # 2 architectures x 2 optimizers, every width in each
        assert len(groups) == 4
        assert all(sorted(s["width"] for s in g) == sorted(ncc.WIDTHS) for g in groups)


def test_a_gpu_trains_in_one_process_whatever_workers_says(monkeypatch):
    cores = len(os.sched_getaffinity(0))
    monkeypatch.setattr(ncc, "WORKERS", 0)
    assert ncc.worker_count("cuda") == 1
    assert ncc.worker_count("cpu") == cores
    monkeypatch.setattr(ncc, "WORKERS", 3)
    assert ncc.worker_count("cuda") == 1
    assert ncc.worker_count("cpu") == 3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_sgd_with_a_tensor_rate_steps_as_with_the_float_rate(dtype):
    # the form a CUDA graph replays: SGD's rate as a float32 tensor that the schedule
    # rewrites in place (RowOptimizers.captured_lr / end_epoch)
    gen = torch.Generator().manual_seed(5)
    start = torch.randn(50, generator=gen, dtype=dtype)
    grads = [torch.randn(50, generator=gen, dtype=dtype) for _ in range(6)]
    rates = [0.01, 0.009, 0.007, 0.004, 0.002, 0.0005]
    weights = []
    for as_tensor in (False, True):
        w = start.clone().requires_grad_()
        optimizer, _ = ncc.make_optimizer([w], "SGD", 10)
        rate = torch.tensor(rates[0], dtype=torch.float32)
        for grad, lr in zip(grads, rates):
            if as_tensor:
                rate.fill_(lr)
                optimizer.param_groups[0]["lr"] = rate
            else:
                optimizer.param_groups[0]["lr"] = float(torch.tensor(lr, dtype=torch.float32))
            w.grad = grad.clone()
            optimizer.step()
        weights.append(w.detach())
    # a plain momentum SGD with weight decay, written here, at the float32 rates
    plain, velocity = start.clone(), None
    for grad, lr in zip(grads, rates):
        d = grad + ncc.SGD_WEIGHT_DECAY * plain
        velocity = d if velocity is None else ncc.SGD_MOMENTUM * velocity + d
        plain = plain - float(torch.tensor(lr, dtype=torch.float32)) * velocity
    tolerance = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(weights[0], weights[1], atol=tolerance, rtol=0)
    assert torch.allclose(weights[0], plain, atol=tolerance, rtol=0)
    assert not torch.equal(weights[0], start)
