"""The shared train engine: phase 1 really freezes (parameters AND BatchNorm statistics), phase 2
really fine-tunes with two learning rates, early stopping restores the best state, and the global
step only increases. Real loaders from src/data.py over tiny images; weights="none"."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from src import model as M
from src import train as T
from src.data import ImageList, build_transform, find_splits, loader
from src.model import build_model, head_name
from src.device import amp_dtype
from src.errors import UserError
from src.train import Evaluation, evaluate, fit_phase, fit_two_phase, make_optimizer

CPU = torch.device("cpu")
SIZE = 16


@pytest.fixture
def loaders(split_folder):
    return _make_loaders(split_folder)


def _make_loaders(split_folder, size=SIZE):
    """24 training images (2 batches of 12), 9 validation images, 3 classes, `size` px (16)."""
    splits = find_splits(split_folder)
    mean, std = M.norm_stats("resnet18")
    train_tf = build_transform("seed", size, mean, std, train=True)
    eval_tf = build_transform("none", size, mean, std, train=False)
    train = loader(ImageList(split_folder, splits.train, train_tf), batch_size=12, train=True, seed=0)
    valid = loader(ImageList(split_folder, splits.valid, eval_tf), batch_size=8, train=False)
    return train, valid


def _fit(model, phase, train, valid, *, head_lr, backbone_lr, **kw):
    """One phase as the recipe runs it: phase 1 on a frozen backbone, phase 2 on everything."""
    M.freeze_backbone(model) if phase == 1 else M.unfreeze(model)
    optimizer = make_optimizer(M.param_groups(model, head_lr, backbone_lr))
    return fit_phase(model, train, valid, optimizer, phase=phase, **kw)


def _snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bn_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --- freezing ----------------------------------------------------------------------------------

@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v2"])
def test_phase1_leaves_backbone_params_and_batchnorm_stats_untouched(loaders, backbone):
    train, valid = loaders
    torch.manual_seed(0)
    model = build_model(backbone, 3, weights="none")
    # Non-trivial running stats, so that any update (even towards the init values) would show.
    with torch.no_grad():
        for _, bn in _bn_layers(model):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
            bn.num_batches_tracked.fill_(100)
    before = _snapshot(model)
    head = head_name(model) + "."

    result = _fit(model, 1, train, valid, head_lr=1e-2, backbone_lr=1e-2, max_epochs=2,
                       patience=5, device=CPU)
    assert result.epochs == 2

    bns = _bn_layers(model)
    assert len(bns) >= 17
    for name, bn in bns:  # layer by layer, buffer by buffer
        assert torch.equal(bn.running_mean, before[f"{name}.running_mean"]), name
        assert torch.equal(bn.running_var, before[f"{name}.running_var"]), name
        assert torch.equal(bn.num_batches_tracked, before[f"{name}.num_batches_tracked"]), name
    backbone_names = [n for n, _ in model.named_parameters() if not n.startswith(head)]
    assert len(backbone_names) > 50
    for name, p in model.named_parameters():
        if not name.startswith(head):
            assert torch.equal(p, before[name]), name
            assert not p.requires_grad and p.grad is None, name
    assert not torch.equal(model.state_dict()[head + "weight"], before[head + "weight"])
    assert not torch.equal(model.state_dict()[head + "bias"], before[head + "bias"])


def test_phase2_changes_backbone_params_and_batchnorm_stats(loaders):
    train, valid = loaders
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    before = _snapshot(model)
    result = _fit(model, 2, train, valid, head_lr=1e-3, backbone_lr=1e-3, max_epochs=1,
                       patience=5, device=CPU)
    assert result.epochs == 1
    after = model.state_dict()
    for name, bn in _bn_layers(model):
        assert not torch.equal(bn.running_mean, before[f"{name}.running_mean"]), name
        assert not torch.equal(bn.running_var, before[f"{name}.running_var"]), name
        assert bn.num_batches_tracked.item() == before[f"{name}.num_batches_tracked"].item() + 2, name
    for name in ("conv1.weight", "layer1.0.conv1.weight", "layer4.1.conv2.weight", "bn1.weight", "fc.weight"):
        assert not torch.equal(after[name], before[name]), name
    assert all(p.requires_grad for p in model.parameters())


# --- the two-phase recipe ----------------------------------------------------------------------

def _run_two_phase(model, train, valid, **kw):
    epochs, phase_ends = [], []

    def on_epoch(r):
        epochs.append((r, _snapshot(model)))

    def on_phase_end(result, m):
        assert m is model
        phase_ends.append((result, _snapshot(model)))

    p1, p2 = fit_two_phase(model, train, valid, device=CPU, on_epoch=on_epoch,
                           on_phase_end=on_phase_end, **kw)
    return p1, p2, epochs, phase_ends


def test_two_phase_learning_rates_steps_and_handover(loaders):
    train, valid = loaders
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    initial = _snapshot(model)
    p1, p2, epochs, ends = _run_two_phase(
        model, train, valid, head_lr=1e-2, backbone_lr_ratio=0.1, phase2_head_lr_factor=0.5,
        patience=10, max_epochs_phase1=2, max_epochs_phase2=1)

    records = [r for r, _ in epochs]
    assert [(r.phase, r.epoch) for r in records] == [(1, 1), (1, 2), (2, 1)]
    for r in records:
        if r.phase == 1:  # the phase-1 optimizer holds the head alone
            assert r.lrs == {"head": pytest.approx(1e-2)}
        else:
            assert r.lrs == {"head": pytest.approx(1e-2 * 0.5), "backbone": pytest.approx(1e-2 * 0.1)}
        assert 0.0 <= r.train_acc <= 1.0 and 0.0 <= r.valid_acc <= 1.0
    steps = [r.step for r in records]
    assert steps == [1, 2, 3] and all(a < b for a, b in zip(steps, steps[1:]))
    assert p1.last_step == 2 and p2.last_step == 3
    assert p1.history == records[:2] and p2.history == records[2:]
    assert (p1.phase, p2.phase) == (1, 2)

    # phase 1 left the backbone as it was; phase 2 starts from phase 1's best epoch
    (r1, end1), (r2, end2) = ends
    assert r1 is p1 and r2 is p2
    head = head_name(model) + "."
    for k, v in initial.items():
        if not k.startswith(head):
            assert torch.equal(end1[k], v), k
    best1 = epochs[p1.best_epoch - 1][1]
    assert _same_state(end1, best1)
    # phase 2 moved the backbone, and the model handed back is phase 2's best
    assert not torch.equal(end2["conv1.weight"], initial["conv1.weight"])
    assert _same_state(model.state_dict(), epochs[2 + p2.best_epoch - 1][1])
    assert evaluate(model, valid, CPU).acc == pytest.approx(p2.best_valid_acc)


def test_early_stopping_after_patience_epochs_without_improvement(loaders):
    """head lr 0 in phase 1: the model cannot change, so valid acc cannot improve after epoch 1;
    phase 1 stops after 1 + patience epochs and phase 2 goes on counting steps."""
    train, valid = loaders
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    p1, p2, epochs, _ = _run_two_phase(
        model, train, valid, head_lr=0.0, backbone_lr_ratio=1.0, patience=2,
        max_epochs_phase1=9, max_epochs_phase2=1)
    assert p1.epochs == 3 and p1.best_epoch == 1 and p1.last_step == 3   # 1 best + 2 without gain
    assert len({r.valid_acc for r in p1.history}) == 1
    assert p1.best_valid_acc == p1.history[0].valid_acc
    assert [r.step for r, _ in epochs] == [1, 2, 3, 10]  # phase-2 epoch 1 at 9 + 1, not at 4
    assert p2.history[0].phase == 2 and p2.history[0].step == 10


class _FrozenLabels:
    """A validation 'loader' whose labels are the model's own eval-mode predictions the first time
    it is read: epoch 1 scores 1.0, so no later epoch can improve on it (ties do not count)."""

    def __init__(self, model, base):
        self.model, self.base, self.batches = model, base, None

    def __iter__(self):
        if self.batches is None:
            with torch.no_grad():
                self.batches = [(x, self.model(x).argmax(1)) for x, _ in self.base]
        return iter(self.batches)


def test_early_stopping_restores_the_best_state_with_real_evaluation(loaders):
    train, valid = loaders
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    frozen = _FrozenLabels(model, valid)
    snapshots = []
    result = _fit(model, 1, train, frozen, head_lr=1e-1, backbone_lr=1e-1, max_epochs=10,
                       patience=2, device=CPU, first_step=5,
                       on_epoch=lambda r: snapshots.append(_snapshot(model)))
    assert result.best_epoch == 1 and result.best_valid_acc == 1.0
    assert result.epochs == 3 and result.last_step == 7
    assert not _same_state(snapshots[-1], snapshots[0])   # training did move the weights...
    assert _same_state(model.state_dict(), snapshots[0])  # ...and the best epoch's were restored
    assert evaluate(model, frozen, CPU).acc == result.best_valid_acc


def test_best_epoch_in_the_middle_is_restored(loaders, monkeypatch):
    """Scripted validation accuracies: best at epoch 3, then `patience` epochs without improvement."""
    train, valid = loaders
    accs = iter([0.5, 0.4, 0.8, 0.8, 0.6, 0.9, 0.95])

    def scripted(model, loader, device, amp=None, keep_mistakes=0):
        acc = next(accs)
        return Evaluation(loss=1 - acc, acc=acc, preds=[int(acc * 100)], targets=[0])

    monkeypatch.setattr(T, "evaluate", scripted)
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    snapshots, seen = [], []

    def on_epoch(r):
        seen.append(r)
        snapshots.append(_snapshot(model))

    result = _fit(model, 1, train, valid, head_lr=1e-2, backbone_lr=1e-2, max_epochs=7,
                       patience=2, device=CPU, on_epoch=on_epoch)
    assert [r.valid_acc for r in seen] == [0.5, 0.4, 0.8, 0.8, 0.6]   # stopped: 2 epochs after the best
    assert (result.best_epoch, result.best_valid_acc) == (3, 0.8)
    assert result.best_valid_loss == pytest.approx(0.2)
    assert result.valid_preds == [80] and result.valid_targets == [0]
    assert not _same_state(snapshots[-1], snapshots[2])
    assert _same_state(model.state_dict(), snapshots[2])


def test_on_epoch_exception_stops_training_and_propagates(loaders):
    train, valid = loaders
    model = build_model("resnet18", 3, weights="none")

    class Pruned(Exception):
        pass

    calls = []

    def prune(r):
        calls.append(r.step)
        raise Pruned

    with pytest.raises(Pruned):
        fit_two_phase(model, train, valid, head_lr=1e-3, backbone_lr_ratio=0.1, patience=3,
                      max_epochs_phase1=3, max_epochs_phase2=3, device=CPU, on_epoch=prune)
    assert calls == [1]


def test_weights_that_turn_non_finite_while_the_loss_stays_finite_are_a_divergence_never_kept(loaders):
    """A NaN weight that meets no image (here: one the optimizer steps to NaN but the forward never
    reads, as oneDNN's bf16 conv backward does at the padding of a 1x1 map) leaves the loss finite;
    the phase must still stop as diverged rather than keep that model as its best."""
    train, valid = loaders
    model = build_model("resnet18", 3, weights="none")
    model.unused = nn.Parameter(torch.zeros(3))  # trained, never in the forward
    M.unfreeze(model)
    optimizer = make_optimizer(M.param_groups(model, 1e-3, 1e-3))
    step = optimizer.step

    def poisoned_step(*args, **kwargs):
        out = step(*args, **kwargs)
        with torch.no_grad():
            model.unused.fill_(float("nan"))
        return out

    optimizer.step = poisoned_step
    with pytest.raises(T.Diverged, match="weights became non-finite .* phase 2, epoch 1"):
        fit_phase(model, train, valid, optimizer, phase=2, max_epochs=2, patience=2, device=CPU)


def test_evaluate_counts_every_validation_image(loaders):
    _, valid = loaders
    model = build_model("resnet18", 3, weights="none")
    model.train()
    ev = evaluate(model, valid, CPU)
    assert len(ev.preds) == len(ev.targets) == 9
    assert ev.acc == pytest.approx(sum(p == t for p, t in zip(ev.preds, ev.targets)) / 9)
    assert ev.loss > 0
    assert not model.training  # evaluation runs in eval mode


# --- precision -----------------------------------------------------------------------------------

@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_where_the_cpu_does_it_natively(monkeypatch, native):
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, probe, lambda: native, raising=False)
    assert amp_dtype(CPU, "auto") == (torch.bfloat16 if native else None)
    assert amp_dtype(CPU, "fp32") is None
    assert amp_dtype(CPU, "bf16") == torch.bfloat16
    with pytest.raises(ValueError, match="fp16"):
        amp_dtype(CPU, "fp16")


def test_bf16_applies_to_phase2_only_and_phase1_is_unchanged(split_folder):
    """Phase 1 stays fp32 (so cached features and recomputing agree); phase 2's convolutions
    run in bf16 and it still trains."""
    runs = {}
    for amp in (None, torch.bfloat16):
        # 32 px, not 16: at 16 px ResNet18's last stage sees a 1x1 map, where oneDNN's bf16 conv
        # backward gives non-finite gradients on some CPUs (see fit_phase); real sizes never do
        train, valid = _make_loaders(split_folder, size=32)  # fresh shuffles and views for each run
        torch.manual_seed(0)
        model = build_model("resnet18", 3, weights="none")
        dtypes = []
        model.conv1.register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
        phases = []
        p1, p2 = fit_two_phase(model, train, valid, head_lr=1e-2, backbone_lr_ratio=0.1, patience=5,
                               max_epochs_phase1=2, max_epochs_phase2=1, device=CPU, amp=amp,
                               on_epoch=lambda r: phases.append((r.phase, dtypes[-1])))
        runs[amp] = (p1, p2, phases)
    (p1_fp32, p2_fp32, phases_fp32), (p1_bf16, p2_bf16, phases_bf16) = runs[None], runs[torch.bfloat16]
    assert p1_bf16.history == p1_fp32.history  # identical, not just close
    assert phases_fp32 == [(1, torch.float32), (1, torch.float32), (2, torch.float32)]
    assert phases_bf16 == [(1, torch.float32), (1, torch.float32), (2, torch.bfloat16)]
    assert p2_bf16.history[0].train_loss != p2_fp32.history[0].train_loss
    # bf16 rounds (differently at every step of a tiny random-init net), it does not break training
    assert p2_bf16.history[0].train_loss == pytest.approx(p2_fp32.history[0].train_loss, rel=0.25)


# --- the transfer-aware parameters (config.OPTIONAL) -------------------------------------------

def test_weight_decay_reaches_adamw_on_weights_but_never_on_biases_or_norm_layers():
    model = build_model("resnet18", 3, weights="none")
    M.unfreeze(model)
    groups = M.param_groups(model, 1e-3, 1e-4, weight_decay=0.05)
    optimizer = make_optimizer(groups)
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.05 for p in g["params"]}
    plain = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    bn = {id(p) for _, m in _bn_layers(model) for p in m.parameters()}
    biases = {id(p) for n, p in model.named_parameters() if n.endswith("bias")}
    assert bn and biases and (bn | biases) <= plain and not (decayed & plain)
    assert decayed | plain == {id(p) for p in model.parameters()}  # every parameter, once
    assert {id(model.fc.weight), id(model.conv1.weight)} <= decayed
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {"head": 1e-3, "backbone": 1e-4}
    assert isinstance(make_optimizer(M.param_groups(model, 1e-3, 1e-4)), torch.optim.Adam)  # 0: Adam, as before


def test_label_smoothing_smooths_the_training_loss_only():
    torch.manual_seed(0)
    x, y = torch.randn(16, 3, 4, 4), torch.arange(16) % 3
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 3))
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    frozen = torch.optim.SGD([{"params": model.parameters(), "lr": 0.0, "name": "head"}])  # nothing moves
    with torch.no_grad():
        plain = nn.functional.cross_entropy(model(x), y).item()
        smooth = nn.functional.cross_entropy(model(x), y, label_smoothing=0.3).item()
    assert smooth != pytest.approx(plain)
    assert T.train_epoch(model, data, frozen, CPU, label_smoothing=0.3)[0] == pytest.approx(smooth, rel=1e-5)
    result = fit_phase(model, data, data, frozen, max_epochs=1, patience=1, device=CPU, label_smoothing=0.3)
    assert result.history[0].train_loss == pytest.approx(smooth, rel=1e-5)
    assert result.history[0].valid_loss == pytest.approx(plain, rel=1e-5)  # valid/loss: plain cross-entropy


def test_cosine_schedule_warms_up_then_decays_to_zero_per_optimizer_step():
    param = nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([{"params": [param], "lr": 0.1, "name": "head"}])
    scheduler = T.make_scheduler(optimizer, "cosine", steps=100)  # warmup: 5 steps
    lrs = []
    for _ in range(100):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[0] == pytest.approx(0.1 / 5) and lrs[4] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] < 0.001
    assert lrs[4 + 48] == pytest.approx(0.05, rel=0.05)  # half way down at the middle of the cosine
    assert T.make_scheduler(optimizer, "constant", steps=100) is None


def test_cosine_schedule_in_a_phase_runs_over_its_max_epochs(loaders):
    train, valid = loaders  # 2 batches per epoch
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    result = _fit(model, 2, train, valid, head_lr=1e-2, backbone_lr=1e-3, max_epochs=4, patience=10,
                  device=CPU, lr_schedule="cosine")
    heads = [r.lrs["head"] for r in result.history]  # after each epoch's last step
    assert heads[0] > heads[1] > heads[2] > heads[3] == pytest.approx(0.0, abs=1e-9)
    assert [r.lrs["backbone"] / r.lrs["head"] for r in result.history[:3]] == pytest.approx([0.1] * 3)


def test_unfreeze_last_stages_trains_them_and_leaves_earlier_stages_and_their_batchnorm_untouched(loaders):
    train, valid = loaders
    torch.manual_seed(0)
    model = build_model("resnet18", 3, weights="none")
    assert M.stages(model) == [["conv1", "bn1"], ["layer1"], ["layer2"], ["layer3"], ["layer4"]]
    before = _snapshot(model)
    p1, p2, _, _ = _run_two_phase(model, train, valid, head_lr=1e-2, backbone_lr_ratio=1.0, patience=10,
                                  max_epochs_phase1=1, max_epochs_phase2=2, unfreeze=1)
    after = model.state_dict()
    frozen = [k for k in before if not k.startswith(("layer4.", "fc."))]
    assert any("running_mean" in k for k in frozen)
    for k in frozen:  # weights AND BatchNorm running statistics of the stem and layer1-3
        assert torch.equal(before[k], after[k]), k
    assert not torch.equal(before["layer4.1.conv2.weight"], after["layer4.1.conv2.weight"])
    assert not torch.equal(before["layer4.1.bn2.running_mean"], after["layer4.1.bn2.running_mean"])  # in train mode
    with pytest.raises(UserError, match="unfreeze = 6.*5 stages"):
        M.unfreeze(model, 6)


def test_unfreeze_gives_the_phase2_optimizer_only_the_stages_it_trains():
    model = build_model("mobilenet_v2", 3, weights="none")
    M.unfreeze(model, 2)
    learning = {n for n, p in model.named_parameters() if p.requires_grad}
    assert learning and all(n.startswith(("classifier.1.", *[f"features.{i}." for i in range(7, 19)]))
                            for n in learning)
    backbone = next(g for g in M.param_groups(model, 1e-3, 1e-4) if g["name"] == "backbone")
    assert {id(p) for p in backbone["params"]} == {id(p) for n, p in model.named_parameters()
                                                 if p.requires_grad and not n.startswith("classifier.")}
    M.train_mode(model)
    assert not model.features[3].conv[0][1].training and model.features[14].conv[0][1].training


def test_unfreezing_every_stage_trains_what_follows_them_too_and_frozen_stages_run_in_eval_mode():
    model = build_model("mobilenet_v3_large", 3, weights="none")
    M.unfreeze(model, len(M.stages(model)))  # all stages: the same as "all", the 960->1280 projection too
    assert all(p.requires_grad for p in model.parameters())
    model = build_model("efficientnet_b0", 3, weights="none")
    M.unfreeze(model, 1)
    M.train_mode(model)
    frozen_depth = [m for n, m in model.named_modules() if n.startswith("features.2.") and "stochastic" in type(m).__name__.lower()]
    assert frozen_depth and not any(m.training for m in frozen_depth)  # no random drops in a frozen stage
    assert model.features[8].training and model.classifier.training
