import io

import pytest
import torch

from conftest import file_digest
from squeeze.errors import InputShapeError, ModelLoadError, UntrustedModelError
from squeeze.model.loading import ArchRef, LoadedModel, load_model, register_plan_kind, save_checkpoint
from squeeze.util.shapes import parse_input_shape


def test_zoo_model_carries_arch_and_shape():
    m = load_model("zoo:digits-cnn")
    assert m.kind == "zoo" and m.input_shape == (1, 1, 16, 16)
    assert m.arch.ref == "squeeze.model.zoo.digits_cnn:digits_cnn"


@pytest.mark.parametrize("old, new, shape", [
    ("squeeze.zoo:digits_cnn", "squeeze.model.zoo.digits_cnn:digits_cnn", (1, 1, 16, 16)),
    ("squeeze.zoo:fashion_cnn", "squeeze.model.zoo.fashion_cnn:fashion_cnn", (1, 1, 28, 28)),
])
def test_checkpoint_naming_the_old_zoo_module_loads(tmp_path, old, new, shape):
    """Checkpoints saved when every zoo factory lived in `squeeze.zoo` name their architecture there."""
    module = ArchRef(new, {"num_classes": 7}).build().eval()
    save_checkpoint(tmp_path / "old.pt", LoadedModel("old", "factory", shape, module, arch=ArchRef(old, {"num_classes": 7})))
    assert torch.load(tmp_path / "old.pt", weights_only=True)["arch"]["ref"] == old
    back = load_model(str(tmp_path / "old.pt"))
    assert back.arch == ArchRef(new, {"num_classes": 7})
    x = torch.randn(2, *shape[1:])
    with torch.no_grad():
        assert torch.equal(back.module(x), module(x))


def test_factory_needs_input_shape_then_loads():
    with pytest.raises(InputShapeError, match="--input-shape"):
        load_model("testnets:tiny_cnn")
    m = load_model("testnets:tiny_cnn", input_shape=(1, 3, 16, 16))
    assert m.kind == "factory" and m.module(torch.zeros(2, 3, 16, 16)).shape == (2, 4)


def test_wrong_input_shape_is_a_clear_error():
    with pytest.raises(InputShapeError, match=r"rejected an input of shape \(1, 5, 16, 16\) \(.*channels"):
        load_model("testnets:tiny_cnn", input_shape=(1, 5, 16, 16))


def test_checkpoint_round_trip_without_pickle(tmp_path):
    src = load_model("zoo:digits-cnn")
    path = tmp_path / "digits.pt"
    save_checkpoint(path, src)
    # The file is loadable by torch's restricted unpickler: no classes, only tensors and plain data.
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "squeeze-checkpoint" and raw["plans"] == []
    back = load_model(str(path))
    assert back.kind == "checkpoint" and back.input_shape == src.input_shape and back.arch == src.arch
    x = src.example_input(batch_size=4)
    with torch.no_grad():
        assert torch.equal(src.module(x), back.module(x))


def test_checkpoint_with_unknown_plan_kind_is_refused(tmp_path):
    src = load_model("zoo:digits-cnn")
    src.plans = [{"kind": "from-the-future"}]
    save_checkpoint(tmp_path / "c.pt", src)
    with pytest.raises(ModelLoadError, match="cannot replay"):
        load_model(str(tmp_path / "c.pt"))


def test_registered_plan_kind_is_replayed_before_weights(tmp_path):
    @register_plan_kind("test-widen-fc")
    def widen(module, plan, input_shape):
        module.fc = torch.nn.Linear(module.fc.in_features, plan["classes"])
        return module

    src = load_model("zoo:digits-cnn")
    src.module.fc = torch.nn.Linear(src.module.fc.in_features, 3)
    src.plans = [{"kind": "test-widen-fc", "classes": 3}]
    save_checkpoint(tmp_path / "c.pt", src)
    back = load_model(str(tmp_path / "c.pt"))
    assert back.module.fc.out_features == 3 and back.plans == src.plans


def test_factory_with_weights(tmp_path):
    model = torch.nn.Linear(1, 1)  # wrong architecture for the weights below
    torch.save(load_model("testnets:tiny_cnn", input_shape=(1, 3, 8, 8)).module.state_dict(), tmp_path / "w.pt")
    m = load_model("testnets:tiny_cnn", input_shape=(1, 3, 8, 8), weights=str(tmp_path / "w.pt"))
    assert m.module[0].weight.shape == (8, 3, 3, 3)
    torch.save(model.state_dict(), tmp_path / "bad.pt")
    with pytest.raises(ModelLoadError, match="do not fit the architecture"):
        load_model("testnets:tiny_cnn", input_shape=(1, 3, 8, 8), weights=str(tmp_path / "bad.pt"))


def test_bare_state_dict_file_explains_how_to_load(tmp_path):
    torch.save(torch.nn.Linear(2, 2).state_dict(), tmp_path / "sd.pt")
    with pytest.raises(ModelLoadError, match="bare state_dict.*package.module:factory@.*package.module:factory --weights"):
        load_model(str(tmp_path / "sd.pt"))


def _booby_file(tmp_path, monkeypatch):
    import testnets

    path = tmp_path / "booby.pt"
    torch.save(testnets.Booby(), path)
    canary = tmp_path / "canary"
    monkeypatch.setenv("SQUEEZE_TEST_CANARY", str(canary))
    return path, canary


def test_pickled_module_is_refused_and_runs_no_code(tmp_path, monkeypatch):
    path, canary = _booby_file(tmp_path, monkeypatch)
    before = file_digest(path)
    with pytest.raises(UntrustedModelError, match=r"--trust-model") as exc:
        load_model(str(path), input_shape=(1, 4))
    assert "testnets.Booby" in str(exc.value)
    assert not canary.exists()
    assert file_digest(path) == before


def test_pickled_module_loads_with_trust(tmp_path, monkeypatch):
    path, canary = _booby_file(tmp_path, monkeypatch)
    m = load_model(str(path), input_shape=(1, 4), trust=True)
    assert m.kind == "pickle" and canary.exists()  # the code ran: that is exactly what trust allows


def test_torchscript_file(tmp_path):
    scripted = torch.jit.script(load_model("testnets:tiny_cnn", input_shape=(1, 3, 8, 8)).module)
    torch.jit.save(scripted, tmp_path / "ts.pt")
    with pytest.raises(InputShapeError):
        load_model(str(tmp_path / "ts.pt"))
    m = load_model(str(tmp_path / "ts.pt"), input_shape=(1, 3, 8, 8))
    assert m.kind == "torchscript"


def test_onnx_file_records_its_shape(tmp_path):
    from squeeze.export.onnx import export_onnx

    art = export_onnx(load_model("testnets:tiny_cnn", input_shape=(1, 3, 12, 12)))
    m = load_model(str(art.path))
    assert m.kind == "onnx" and m.input_shape == (1, 3, 12, 12)
    with pytest.raises(InputShapeError, match="expects input"):
        load_model(str(art.path), input_shape=(1, 3, 10, 10))


@pytest.mark.parametrize("content", [b"", b"\x80\x04garbage" * 10, b"PK\x03\x04broken-zip"])
def test_corrupt_files_are_clear_errors(tmp_path, content):
    path = tmp_path / "broken.pt"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError, match="not a readable PyTorch file"):
        load_model(str(path))
    assert path.read_bytes() == content


def test_truncated_checkpoint(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(1000)}, buf)
    (tmp_path / "t.pt").write_bytes(buf.getvalue()[:500])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        load_model(str(tmp_path / "t.pt"))


def test_corrupt_onnx(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"not a protobuf at all")
    with pytest.raises(ModelLoadError, match="not a valid ONNX model"):
        load_model(str(tmp_path / "m.onnx"))


def test_unknown_reference():
    with pytest.raises(ModelLoadError, match="neither an existing file"):
        load_model("no/such/file.pt")
    with pytest.raises(ModelLoadError, match="Cannot import the model factory"):
        load_model("nosuchpkg.mod:fn", input_shape=(1, 3))


@pytest.mark.parametrize("text,shape", [("1,3,224,224", (1, 3, 224, 224)), ("1x1x16x16", (1, 1, 16, 16))])
def test_parse_input_shape(text, shape):
    assert parse_input_shape(text) == shape


@pytest.mark.parametrize("text", ["abc", "1", "1,0,3", "-1,3"])
def test_parse_input_shape_rejects(text):
    with pytest.raises(InputShapeError, match="not a shape"):
        parse_input_shape(text)


def test_fingerprint_tracks_weights():
    a = LoadedModel("a", "factory", (1, 3, 8, 8), load_model("testnets:tiny_cnn", input_shape=(1, 3, 8, 8)).module,
                    arch=ArchRef("testnets:tiny_cnn"))
    fp = a.fingerprint
    assert fp == a.fingerprint
    with torch.no_grad():
        a.module[0].weight[0, 0, 0, 0] += 1
    assert a.fingerprint != fp
