import importlib

import pytest
import torch
from torch import nn

from squeeze.model import zoo
from squeeze.model.zoo import trained
from squeeze.model.zoo.digits_cnn import digits_cnn
from squeeze.model.zoo.mobilenet_v2 import mobilenet_v2
from squeeze.util.cache import cache_dir
from squeeze.data import digits_splits
from squeeze.errors import ModelLoadError, SqueezeError
from squeeze.train import evaluate

MODEL_NAMES = [entry.name for entry in zoo.list_models()]

# Reference parameter counts at 1000 classes (the published torchvision counts).
IMAGENET_PARAMS = {"resnet18": 11_689_512, "resnet50": 25_557_032, "mobilenet_v2": 3_504_872,
                   "densenet121": 7_978_856}


def _n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_registry_lists_all_models_sorted():
    assert MODEL_NAMES == sorted(MODEL_NAMES)
    assert set(MODEL_NAMES) >= {"resnet18", "mobilenet_v2", "densenet121", "digits-cnn"}


@pytest.mark.parametrize("name", sorted(IMAGENET_PARAMS))
def test_imagenet_param_counts(name):
    model = zoo.create_model(name)
    assert _n_params(model) == IMAGENET_PARAMS[name]
    assert not model.training
    assert zoo.get_entry(name).input_shape == (1, 3, 224, 224)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_forward_shape(name):
    # The factory alone (no training): every zoo architecture takes `num_classes`.
    entry = zoo.get_entry(name)
    model = entry.factory(num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(entry.input_shape))
    assert out.shape == (1, 7)
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_arch_ref_imports_the_factory(name):
    entry = zoo.get_entry(name)
    module_name, function_name = entry.arch_ref.split(":")
    assert module_name.startswith("squeeze.model.zoo.")
    assert getattr(importlib.import_module(module_name), function_name) is entry.factory


def test_width_mult_thins_mobilenet_but_keeps_last_conv():
    half = mobilenet_v2(width_mult=0.5)
    convs = [m for m in half.features.modules() if isinstance(m, nn.Conv2d)]
    assert convs[0].out_channels == 16  # 32 * 0.5
    assert convs[-2].out_channels == 160  # the 320-channel bottleneck, halved
    assert convs[-1].out_channels == 1280  # the paper keeps the last conv at 1280 below width 1
    assert half.classifier[-1].in_features == 1280


def test_unknown_name_lists_known_models():
    with pytest.raises(ModelLoadError) as info:
        zoo.get_entry("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in MODEL_NAMES:
        assert name in message
    with pytest.raises(ModelLoadError):
        zoo.create_model("nope")


def test_duplicate_registration_is_refused():
    with pytest.raises(SqueezeError, match="zoo model `digits-cnn` is registered twice: by squeeze.model.zoo and by squeeze.model.zoo.digits_cnn"):
        zoo.register_model("digits-cnn")(digits_cnn)


def test_digits_cnn_adds_conv3_to_conv4():
    # The residual add couples conv3's and conv4's output channels: pruning must keep them in step.
    model = digits_cnn().eval()
    seen = {}
    model.conv3.register_forward_hook(lambda module, args, out: seen.setdefault("conv3", out))
    model.conv4.register_forward_hook(lambda module, args, out: seen.setdefault("conv4", out))
    model.pool2.register_forward_pre_hook(lambda module, args: seen.setdefault("sum", args[0]))
    with torch.no_grad():
        model(torch.randn(2, 1, 16, 16))
    assert seen["sum"].shape == (2, 64, 8, 8)
    assert torch.equal(seen["sum"], seen["conv3"] + seen["conv4"])


def test_unreadable_weights_file_is_retrained(tmp_path, monkeypatch):
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(trained, "train_classifier", lambda *args, **kwargs: calls.append(kwargs))
    zoo.create_model("digits-cnn")
    (weights,) = (tmp_path / "zoo").glob("digits-cnn-*.pt")
    weights.write_bytes(b"half a file")
    zoo.create_model("digits-cnn")
    assert len(calls) == 2
    assert torch.load(weights, weights_only=True).keys() == digits_cnn().state_dict().keys()


@pytest.fixture(scope="module")
def trained_digits(tmp_path_factory):
    """Train digits-cnn once into a private cache folder; yields (model, that folder)."""
    folder = tmp_path_factory.mktemp("squeeze-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SQUEEZE_CACHE_DIR", str(folder))
        model = zoo.create_model("digits-cnn")
    return model, folder


def test_trained_digits_cnn_accuracy(trained_digits):
    model, _ = trained_digits
    assert not model.training
    result = evaluate(model, digits_splits().test)
    assert result.n == 360
    assert result.top1 >= 0.97


def test_second_create_loads_from_cache(trained_digits, monkeypatch):
    model, folder = trained_digits
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(folder))
    weight_files = list(cache_dir("zoo").glob("digits-cnn-*.pt"))
    assert len(weight_files) == 1

    def no_training(*args, **kwargs):
        raise AssertionError("digits-cnn was trained again instead of loaded from the cache")

    monkeypatch.setattr(trained, "train_classifier", no_training)
    again = zoo.create_model("digits-cnn")
    assert not again.training
    for (key, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), key


def test_other_architecture_gets_its_own_weights_file(trained_digits, monkeypatch):
    # A different width changes the model's repr, hence the key: it must not load the 1.0 weights.
    _, folder = trained_digits
    monkeypatch.setenv("SQUEEZE_CACHE_DIR", str(folder))
    calls = []
    monkeypatch.setattr(trained, "train_classifier", lambda *args, **kwargs: calls.append(kwargs))
    zoo.create_model("digits-cnn", width=0.5)
    assert len(calls) == 1 and calls[0]["seed"] == 0
    assert len(list((folder / "zoo").glob("digits-cnn-*.pt"))) == 2
