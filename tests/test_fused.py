"""Fused multi-model training (FusedModels, train_models) against plain PyTorch training of
each model alone, written here independently."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import neural_collapse_cka as ncc


def plain_training(model, x, y, optimizer, seed, steps):
    """Textbook loop: nn.Module, torch.optim, the model's own shuffled order."""
    if optimizer == "SGD":
        opt = torch.optim.SGD(model.parameters(), lr=ncc.SGD_LR, momentum=ncc.SGD_MOMENTUM,
                              weight_decay=ncc.SGD_WEIGHT_DECAY)
    else:
        opt = torch.optim.Adam(model.parameters(), lr=ncc.ADAM_LR,
                               weight_decay=ncc.ADAM_WEIGHT_DECAY)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    model.train()
    for step in range(steps):
        idx = perm[step * ncc.BATCH_SIZE:(step + 1) * ncc.BATCH_SIZE]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model


def make(arch, width, seed, d=None):
    return ncc.make_model(arch, width, seed, d)


CASES = [("ResNet", [2, 5, 8], None), ("CNN", [3, 6], None), ("ResNet", [4, 4, 6], [2, 9, 5])]


@pytest.fixture(params=[torch.float64, torch.float32], ids=["float64", "float32"])
def dtype(request):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(request.param)
    yield request.param
    torch.set_default_dtype(previous)


@pytest.mark.parametrize("layout_of", ["cpu", "cuda"])
@pytest.mark.parametrize("optimizer", ["SGD", "Adam", "mixed"])
@pytest.mark.parametrize("arch, widths, dims", CASES)
def test_fused_equals_one_by_one_after_five_steps(arch, widths, dims, optimizer, dtype,
                                                  layout_of, monkeypatch):
    # layout_of="cuda" runs the fused models here in the activation layout they use on a GPU
    layout = ncc.activation_layout(layout_of)
    monkeypatch.setattr(ncc, "activation_layout", lambda device_type: layout)
    # "mixed": SGD, Adam, SGD, ... in one group, each model's rows under its own optimizer
    # float64 shows the two are the same computation (they agree to ~1e-15); in float32
    # the grouped channels-last kernels and the fused Adam kernel round differently. The
    # target is 1e-5. Seen: 2e-7 for SGD everywhere; for Adam 1e-6 on an Intel Xeon,
    # but 4e-5 on an AMD EPYC in the projector case, where at the fourth step a ReLU input
    # of 1.7e-8 lies on opposite sides of 0 in the two computations: the kink switches that
    # activation's gradient on in one and off in the other, and Adam, dividing by the
    # running RMS, turns it into a step-sized difference. No float32 implementation that
    # rounds differently can rule that out, so Adam gets 1e-4 in float32.
    if dtype == torch.float64:
        tolerance = 1e-10
    else:
        tolerance = 1e-5 if optimizer == "SGD" else 1e-4
    gen = torch.Generator().manual_seed(0)
    n = 5 * ncc.BATCH_SIZE  # one epoch = 5 steps
    data = {"x_train": torch.randn(n, 40, generator=gen),
            "y_train": torch.randint(0, 10, (n,), generator=gen)}
    dims = dims or [None] * len(widths)
    seeds = [11 * (i + 1) for i in range(len(widths))]
    names = ([("SGD", "Adam")[i % 2] for i in range(len(widths))] if optimizer == "mixed"
             else [optimizer] * len(widths))
    fused = [make(arch, w, s, d) for w, s, d in zip(widths, seeds, dims)]
    ncc.train_models(fused, data, optimizer if optimizer != "mixed" else names, 1, seeds)
    for model, w, s, d, opt_name in zip(fused, widths, seeds, dims, names):
        alone = plain_training(make(arch, w, s, d), data["x_train"], data["y_train"],
                               opt_name, s, 5)
        for (name, a), b in zip(alone.state_dict().items(), model.state_dict().values()):
            if name.endswith("num_batches_tracked"):
                continue
            assert torch.allclose(a, b, atol=tolerance, rtol=0), (arch, w, name,
                                                             (a - b).abs().max())


def test_zero_padding_stays_exactly_zero():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(256, 40, generator=gen), torch.randint(0, 10, (256,), generator=gen)
    widths = (2, 5, 3)  # the first and last are padded, under Adam and under SGD
    models = [make("CNN", w, w) for w in widths]
    fused = ncc.FusedModels(models)
    # where the real weights live: a fused copy of models whose every entry is 1
    ones = [make("CNN", w, 0) for w in widths]
    for m in ones:
        for t in m.state_dict().values():
            t.fill_(1)
    real = {k: v != 0 for k, v in ncc.FusedModels(ones).named_parameters()}
    optimizers = ncc.RowOptimizers(fused, ["Adam", "SGD", "SGD"], 5)  # training's step
    for _ in range(5):
        idx = torch.randint(0, 256, (3, 64), generator=gen)
        loss = F.cross_entropy(fused(x[idx].transpose(0, 1)).permute(0, 2, 1), y[idx].T)
        loss.backward()
        optimizers.step()
    for name, p in fused.named_parameters():
        assert (p[~real[name]] == 0).all(), name
        assert (p[real[name]] != 0).any(), name


def test_fused_training_gives_the_same_test_errors(data_cache):
    data = ncc.get_data(cache_path=data_cache)
    data["x_train"], data["y_train"] = data["x_train"][:512], data["y_train"][:512]
    # SGD's cosine schedule steps every epoch; here it runs beside an Adam model
    widths, seeds, names = [2, 6, 16], [1, 2, 3], ["SGD", "Adam", "SGD"]
    fused = [make("ResNet", w, s) for w, s in zip(widths, seeds)]
    ncc.train_models(fused, data, names, 8, seeds)
    for model, w, s, name in zip(fused, widths, seeds, names):
        alone = make("ResNet", w, s)
        ncc.train_models([alone], data, name, 8, [s])
        assert abs(ncc.evaluate(model, data)["test_err"]
                   - ncc.evaluate(alone, data)["test_err"]) <= 0.01


def test_a_diverging_model_leaves_its_group_alone(monkeypatch):
    gen = torch.Generator().manual_seed(2)
    data = {"x_train": torch.randn(256, 40, generator=gen),
            "y_train": torch.randint(0, 10, (256,), generator=gen)}
    models = [make("ResNet", 3, 1), make("ResNet", 3, 2)]
    with torch.no_grad():
        models[0].classifier.weight.fill_(float("nan"))
    out = ncc.train_models(models, data, "Adam", 3, [1, 2])
    assert out[0]["diverged"] and out[0]["epochs_run"] == 1
    assert not out[1]["diverged"]
    # the same group with a healthy first model: the same kernels, so the second model
    # must come out bit for bit the same, and close to it trained alone
    healthy = [make("ResNet", 3, 1), make("ResNet", 3, 2)]
    ncc.train_models(healthy, data, "Adam", 3, [1, 2])
    alone = make("ResNet", 3, 2)
    ncc.train_models([alone], data, "Adam", 3, [2])
    for a, b, c in zip(healthy[1].parameters(), models[1].parameters(), alone.parameters()):
        assert torch.equal(a, b)
        assert torch.allclose(b, c, atol=1e-4)


class ReplayOnCpu(ncc.EpochGraph):
    """EpochGraph with its CUDA calls taken out, so its bookkeeping runs on a CPU: the
    warm-up is a plain epoch, and a "replay" calls the recorded epoch inside
    `captured_lr`, so the optimizers read what a captured graph reads (SGD's rate from its
    device tensor, which only `end_epoch` updates). The capture itself needs a GPU: see
    the CUDA test below."""
    captures = replays = 0

    @staticmethod
    def usable(device):
        return True

    def _warm_up(self):
        self.epoch_steps()

    def _capture(self):
        ReplayOnCpu.captures += 1
        return self

    def replay(self):
        ReplayOnCpu.replays += 1
        with self.optimizers.captured_lr():
            self.epoch_steps()


def graph_test_case(device):
    gen = torch.Generator().manual_seed(3)
    data = {"x_train": torch.randn(3 * ncc.BATCH_SIZE + 32, 40, generator=gen).to(device),
            "y_train": torch.randint(0, 10, (3 * ncc.BATCH_SIZE + 32,),
                                     generator=gen).to(device)}
    return data, [("ResNet", [2, 5, 8]), ("CNN", [3, 6])], ["SGD", "Adam", "SGD"]


def train_case(data, arch, widths, names, epochs, device, **snapshots):
    models = [make(arch, w, 7 * w).to(device) for w in widths]
    out = ncc.train_models(models, data, names[:len(widths)], epochs, [7 * w for w in widths],
                           **snapshots)
    return models, out


def test_epoch_graph_bookkeeping_matches_eager_epochs(monkeypatch):
    # float64, so that the one intended difference, SGD's rate read as float32 from its
    # tensor, stays far below the tolerance; a stale rate (end_epoch not writing the
    # cosine schedule's new value) would differ by 1e-3
    monkeypatch.setattr(ncc, "EpochGraph", ReplayOnCpu)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data, cases, names = graph_test_case("cpu")
        for arch, widths in cases:
            eager, eager_out = train_case(data, arch, widths, names, 4, "cpu")
            monkeypatch.setattr(ncc, "CUDA_GRAPHS", True)
            ReplayOnCpu.captures = ReplayOnCpu.replays = 0
            graphed, graphed_out = train_case(data, arch, widths, names, 4, "cpu")
            monkeypatch.setattr(ncc, "CUDA_GRAPHS", False)
            assert (ReplayOnCpu.captures, ReplayOnCpu.replays) == (1, 3)
            for a, b in zip(eager, graphed):
                for p, q in zip(a.state_dict().values(), b.state_dict().values()):
                    assert torch.allclose(p, q, atol=1e-9, rtol=0)
            for a, b in zip(eager_out, graphed_out):
                assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-9)
    finally:
        torch.set_default_dtype(previous)


def test_epoch_graph_resumed_from_a_snapshot_goes_on_as_if_never_stopped(monkeypatch):
    # a resumed group warms up and captures anew; the rates its replays read must be the
    # restored schedule's (with the scheduler's state not loaded, this test fails)
    monkeypatch.setattr(ncc, "EpochGraph", ReplayOnCpu)
    monkeypatch.setattr(ncc, "CUDA_GRAPHS", True)
    monkeypatch.setattr(ncc, "SNAPSHOT_SECONDS", 0.0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        data, _, names = graph_test_case("cpu")
        widths, epochs, stop_after = [2, 5], 7, 3
        snapshots = {}
        uninterrupted, fits = train_case(data, "ResNet", widths, names, epochs, "cpu",
                                         save_snapshot=lambda s: snapshots.setdefault(
                                             s["epoch"], copy.deepcopy(s)))
        ReplayOnCpu.captures = ReplayOnCpu.replays = 0
        resumed, resumed_fits = train_case(data, "ResNet", widths, names, epochs, "cpu",
                                           resume=snapshots[stop_after])
        # the epoch after the resume is the warm-up, the next one captured and replayed
        assert (ReplayOnCpu.captures, ReplayOnCpu.replays) == (1, epochs - stop_after - 1)
        for a, b in zip(uninterrupted, resumed):
            for name, p in a.state_dict().items():
                assert torch.allclose(p, b.state_dict()[name], atol=1e-9, rtol=0), name
        for a, b in zip(fits, resumed_fits):
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-9)
    finally:
        torch.set_default_dtype(previous)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step")
def test_captured_lr_swaps_in_sgd_rate_tensors_and_restores_the_floats():
    models = [make("ResNet", 2, 1), make("ResNet", 3, 2)]
    fused = ncc.FusedModels(models)
    optimizers = ncc.RowOptimizers(fused, ["SGD", "Adam"], 10)
    (sgd, _, _, _), (adam, _, _, _) = optimizers.parts
    assert sgd.defaults["fused"] and adam.defaults["fused"]  # the kernels a GPU runs
    with optimizers.captured_lr():
        assert isinstance(sgd.param_groups[0]["lr"], torch.Tensor)
        assert adam.param_groups[0]["capturable"]
    assert sgd.param_groups[0]["lr"] == ncc.SGD_LR
    assert not adam.param_groups[0]["capturable"]
    optimizers.end_epoch()
    (_, rate), = optimizers.lr_tensors
    cosine = ncc.SGD_LR * (1 + math.cos(math.pi / 10)) / 2
    assert sgd.param_groups[0]["lr"] == pytest.approx(cosine, rel=1e-12)
    assert float(rate) == pytest.approx(cosine, rel=1e-7)  # float32


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_epochs_match_eager_epochs(monkeypatch):
    # on the GPU the eager path runs the same kernels; the graph reads SGD's rate as
    # float32 (fused SGD's tensor-lr kernel). A capture fails outright on any host
    # synchronisation inside the epoch, so passing also shows the step never waits.
    device = torch.device("cuda")
    data, cases, names = graph_test_case(device)
    for arch, widths in cases:
        eager, eager_out = train_case(data, arch, widths, names, 4, device)
        monkeypatch.setattr(ncc, "CUDA_GRAPHS", True)
        graphed, graphed_out = train_case(data, arch, widths, names, 4, device)
        monkeypatch.setattr(ncc, "CUDA_GRAPHS", False)
        for a, b in zip(eager, graphed):
            for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
                assert torch.allclose(p, q, atol=1e-4, rtol=0), (arch, name)
        for a, b in zip(eager_out, graphed_out):
            assert a["train_loss"] == pytest.approx(b["train_loss"], abs=1e-5)
