"""Backbone + head, weight resolution (torch hub cache, local file, none), freezing helpers,
parameter groups and checkpoints. No network: downloads are made to fail on purpose."""
from __future__ import annotations


import pytest
import torch
import torchvision
from torch import nn

from src import model as M
from src.config import TrialConfig
from src.errors import UserError
from src.model import (SUPPORTED, WeightsUnavailable, build_model, expected_cache_file, head_name,
                       make_checkpoint, model_from_checkpoint, param_groups, save_checkpoint)


def _all_ids(model):
    return [id(p) for p in model.parameters()]


# --- heads -------------------------------------------------------------------------------------

HEADS = {"resnet18": "fc", "resnet50": "fc", "mobilenet_v2": "classifier.1",
         "mobilenet_v3_large": "classifier.3", "efficientnet_b0": "classifier.1"}


def test_every_supported_backbone_is_covered():
    assert set(SUPPORTED) == set(HEADS)


@pytest.mark.parametrize("backbone", SUPPORTED)
def test_head_is_a_fresh_linear_to_n_classes(backbone):
    torch.manual_seed(0)
    reference = torchvision.models.get_model(backbone, weights=None)
    old_head = reference.get_submodule(HEADS[backbone])
    model = build_model(backbone, 7, weights="none")
    assert head_name(model) == HEADS[backbone]
    head = model.get_submodule(HEADS[backbone])
    assert type(head) is nn.Linear
    assert (head.in_features, head.out_features) == (old_head.in_features, 7)
    assert head.bias is not None
    # only the head changed shape: every other entry of the state dict is as torchvision builds it
    own, ref = model.state_dict(), reference.state_dict()
    assert set(own) == set(ref)
    assert {k for k in own if own[k].shape != ref[k].shape} == {f"{HEADS[backbone]}.weight",
                                                                f"{HEADS[backbone]}.bias"}
    model.eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", ["resnet19", "not_a_model"])
def test_unknown_backbone_is_a_user_error_naming_it(name):
    with pytest.raises(UserError) as info:
        build_model(name, 3, weights="none")
    assert repr(name) in str(info.value) or name in str(info.value)
    assert "resnet18" in str(info.value)  # suggests supported ones


def test_norm_stats_are_the_imagenet_statistics():
    mean, std = M.norm_stats("resnet18")
    assert mean == pytest.approx([0.485, 0.456, 0.406]) and std == pytest.approx([0.229, 0.224, 0.225])


# --- freezing helpers and parameter groups ---------------------------------------------------

@pytest.mark.parametrize("backbone", ["resnet18", "mobilenet_v3_large"])
def test_param_groups_split_head_and_backbone(backbone):
    model = build_model(backbone, 4, weights="none")
    head = model.get_submodule(HEADS[backbone])
    head_ids = {id(head.weight), id(head.bias)}

    M.freeze_backbone(model)
    g1 = param_groups(model, head_lr=1e-3, backbone_lr=1e-4)
    assert len(g1) == 1
    assert g1[0]["lr"] == 1e-3 and g1[0]["name"] == "head"
    assert {id(p) for p in g1[0]["params"]} == head_ids and len(g1[0]["params"]) == 2

    M.unfreeze(model)
    g2 = param_groups(model, head_lr=1e-3, backbone_lr=1e-4)
    by_name = {g["name"]: g for g in g2}
    assert set(by_name) == {"head", "backbone"} and len(g2) == 2
    assert by_name["head"]["lr"] == 1e-3 and by_name["backbone"]["lr"] == 1e-4
    h = [id(p) for p in by_name["head"]["params"]]
    b = [id(p) for p in by_name["backbone"]["params"]]
    assert set(h) == head_ids
    assert len(set(b)) == len(b) and not set(h) & set(b)            # disjoint, no duplicates
    assert sorted(h + b) == sorted(_all_ids(model))                 # covering every parameter
    if backbone == "mobilenet_v3_large":                             # the first of two Linears is backbone
        inner = model.get_submodule("classifier.0")
        assert id(inner.weight) in set(b)
    # torch accepts them as they are
    opt = torch.optim.Adam(g2)
    assert [g["lr"] for g in opt.param_groups] == [1e-3, 1e-4]


def test_freeze_unfreeze_and_train_mode_per_phase():
    model = build_model("mobilenet_v2", 3, weights="none")
    head = model.get_submodule(head_name(model))
    M.freeze_backbone(model)
    M.train_mode(model)
    for name, p in model.named_parameters():
        assert p.requires_grad == name.startswith("classifier.1."), name
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout)]
    assert bns and dropouts
    assert not any(m.training for m in bns) and not any(m.training for m in dropouts)
    assert head.training
    M.unfreeze(model)
    M.train_mode(model)
    assert all(p.requires_grad for p in model.parameters())
    assert all(m.training for m in model.modules())


# --- weights -----------------------------------------------------------------------------------

def _marked_resnet18_state(value=0.5):
    torch.manual_seed(1)
    state = torchvision.models.resnet18().state_dict()
    state["conv1.weight"].fill_(value)
    state["layer4.1.bn2.running_mean"].fill_(value / 2)
    state["layer4.1.bn2.running_var"].fill_(value * 3)
    state["fc.weight"].fill_(value)          # the 1000-class ImageNet head must not survive
    state["fc.bias"].fill_(value)
    return state


def _assert_backbone_is(model, state, n_classes):
    own = model.state_dict()
    for k, v in state.items():
        if not k.startswith("fc."):
            assert torch.equal(own[k], v), k
    assert model.fc.out_features == n_classes and model.fc.in_features == 512
    assert not torch.all(model.fc.weight == state["fc.weight"][0, 0])  # a fresh head
    assert torch.all(model.conv1.weight == state["conv1.weight"][0, 0, 0, 0])


def test_expected_cache_file_is_under_torch_home(tmp_path):
    assert expected_cache_file("resnet18") == tmp_path / "torch_home" / "hub" / "checkpoints" / "resnet18-f37072fd.pth"


def test_imagenet_weights_load_from_the_torch_hub_cache(no_network):
    state = _marked_resnet18_state()
    path = expected_cache_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(state, path)
    model = build_model("resnet18", 3, weights="imagenet")
    _assert_backbone_is(model, state, 3)
    assert no_network == []  # served from the cache, no download attempted


def test_missing_imagenet_weights_explain_both_remedies(no_network):
    expected = expected_cache_file("resnet18")
    with pytest.raises(WeightsUnavailable) as info:
        build_model("resnet18", 3, weights="imagenet")
    msg = str(info.value)
    assert isinstance(info.value, UserError)
    assert str(expected) in msg                         # where to put the file
    assert "resnet18-f37072fd.pth" in msg and "copy" in msg.lower()
    assert "--weights PATH" in msg                      # the other remedy
    assert no_network and no_network[0].endswith("resnet18-f37072fd.pth")
    assert not expected.exists()                         # nothing half-written left behind


def test_truncated_imagenet_cache_file_is_a_user_error():
    path = expected_cache_file("resnet18")
    path.parent.mkdir(parents=True)
    torch.save(_marked_resnet18_state(), path)
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 3])  # an interrupted copy
    with pytest.raises(UserError):
        build_model("resnet18", 3, weights="imagenet")


def test_garbage_imagenet_cache_file_is_a_user_error_naming_it():
    path = expected_cache_file("resnet18")
    path.parent.mkdir(parents=True)
    path.write_text("<html><body>Access denied</body></html>")
    with pytest.raises(UserError) as info:
        build_model("resnet18", 3, weights="imagenet")
    assert str(path) in str(info.value)


@pytest.mark.parametrize("wrapped", [False, True])
def test_weights_path_loads_a_local_state_dict(tmp_path, wrapped):
    state = _marked_resnet18_state(0.25)
    path = tmp_path / "mine.pth"
    torch.save({"state_dict": state} if wrapped else state, path)
    model = build_model("resnet18", 5, weights=str(path))
    _assert_backbone_is(model, state, 5)


def test_weights_path_of_another_architecture_is_a_user_error(tmp_path):
    path = tmp_path / "mobilenet.pth"
    torch.save(torchvision.models.mobilenet_v2().state_dict(), path)
    with pytest.raises(UserError) as info:
        build_model("resnet18", 3, weights=str(path))
    assert str(path) in str(info.value) and "do not fit" in str(info.value)


def test_weights_path_with_a_wrong_shape_is_a_user_error(tmp_path):
    state = _marked_resnet18_state()
    state["conv1.weight"] = torch.zeros(64, 1, 7, 7)  # a grayscale stem
    path = tmp_path / "gray.pth"
    torch.save(state, path)
    with pytest.raises(UserError, match="conv1.weight"):
        build_model("resnet18", 3, weights=str(path))


def test_missing_weights_path_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "nowhere" / "weights.pth"
    with pytest.raises(UserError) as info:
        build_model("resnet18", 3, weights=str(path))
    assert str(path) in str(info.value)


def test_unloadable_weights_path_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "junk.pth"
    path.write_bytes(b"not a state dict")
    with pytest.raises(UserError) as info:
        build_model("resnet18", 3, weights=str(path))
    assert str(path) in str(info.value)


# --- checkpoints -------------------------------------------------------------------------------

def _config(classes=("cat", "dog", "owl")):
    return TrialConfig(backbone="mobilenet_v2", weights="none", image_size=32, batch_size=4,
                       max_epochs_phase1=1, max_epochs_phase2=1, phase2_head_lr_factor=1.0,
                       head_lr=1e-3, backbone_lr_ratio=0.1, patience=2, aug_strength="seed", seed=11,
                       classes=classes).to_dict()


def test_checkpoint_round_trips_weights_and_config(tmp_path):
    config = _config()
    torch.manual_seed(0)
    model = build_model("mobilenet_v2", 3, weights="none")
    with torch.no_grad():  # non-default BatchNorm buffers, so a fresh init cannot pass by chance
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.num_batches_tracked.fill_(17)
    path = save_checkpoint(make_checkpoint(model, config, phase=2, epoch=3, valid_acc=0.75),
                           tmp_path / "checkpoints" / "phase2_best.pt")
    assert path.is_file() and [p.name for p in path.parent.iterdir()] == ["phase2_best.pt"]
    rebuilt, got_config = model_from_checkpoint(path)
    assert got_config == config
    assert TrialConfig.from_dict(got_config).classes == ("cat", "dog", "owl")
    want, have = model.state_dict(), rebuilt.state_dict()
    assert set(want) == set(have)
    for k in want:
        assert torch.equal(want[k], have[k]), k
    x = torch.randn(2, 3, 32, 32)
    model.eval(), rebuilt.eval()
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))
    ckpt = torch.load(path, weights_only=True)
    assert (ckpt["phase"], ckpt["epoch"], ckpt["valid_acc"]) == (2, 3, 0.75)


def test_damaged_checkpoint_is_a_user_error_naming_it(tmp_path):
    path = tmp_path / "phase1_best.pt"
    path.write_bytes(b"\x00garbage")
    with pytest.raises(UserError) as info:
        model_from_checkpoint(path)
    assert str(path) in str(info.value)
