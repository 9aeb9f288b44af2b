import importlib.metadata
import logging
import sys
from pathlib import Path

import pytest

from squeeze.errors import RecipeError, SqueezeError
from squeeze.measure.runtimes import OrtRuntime, Runtime, runtime_registry
from squeeze.methods import pass_registry
from squeeze.prune.importance import Criterion, importance_registry
from squeeze.recipe import load_recipe
from squeeze.registry import Registry

PLUGIN_DIR = Path(__file__).resolve().parents[1] / "examples" / "plugin"


def entry_point(name: str, value: str, group: str = "squeeze.tests") -> importlib.metadata.EntryPoint:
    return importlib.metadata.EntryPoint(name=name, value=value, group=group)


def test_duplicate_name_is_refused_naming_both_owners():
    reg = Registry("widget")
    reg.register("a", 1, owner="pkg_one")
    with pytest.raises(SqueezeError, match=r"widget `a` is registered twice: by pkg_one and by pkg_two"):
        reg.register("a", 2, owner="pkg_two")
    assert reg.get("a") == 1


def test_decorator_form_returns_the_object_and_registering_it_again_is_harmless():
    reg = Registry("widget")

    @reg.register("f")
    def f():
        return 1

    assert reg.register("f", f) is f and reg.get("f") is f and list(reg) == [f]


def test_unknown_name_lists_the_registered_ones():
    reg = Registry("method", error=RecipeError)
    reg.register("b", 2)
    reg.register("a", 1)
    with pytest.raises(RecipeError, match=r"Unknown method `x`\. Valid methods: a, b\."):
        reg.get("x")
    assert reg.names() == ["a", "b"] and list(reg) == [1, 2] and "a" in reg and "x" not in reg


def test_plugins_load_once_on_first_lookup(monkeypatch):
    calls = []

    def entry_points(group):
        calls.append(group)
        return [entry_point("sqrt", "math:sqrt", group)]

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)
    reg = Registry("function", group="squeeze.tests")
    assert calls == []  # nothing is loaded before a lookup
    assert reg.names() == ["sqrt"] and reg.get("sqrt")(9.0) == 3.0
    assert calls == ["squeeze.tests"]


def test_failing_plugin_is_a_one_line_warning(caplog):
    reg = Registry("function", group="squeeze.tests")
    with caplog.at_level(logging.WARNING, logger="squeeze.plugins"):
        reg.load_plugins([entry_point("broken", "no_such_module_xyz"), entry_point("sqrt", "math:sqrt")])
    assert reg.names() == ["sqrt"]
    (record,) = caplog.records
    message = record.getMessage()
    assert "\n" not in message
    assert "plugin `broken` (no_such_module_xyz) in squeeze.tests failed to load" in message
    assert "ModuleNotFoundError" in message


def with_plugins(monkeypatch, registry: Registry, eps: list[importlib.metadata.EntryPoint]) -> None:
    """`registry` as on a machine where `eps` are installed: its plugins load again; what they add is undone."""
    monkeypatch.setattr(registry, "_items", dict(registry._items))
    monkeypatch.setattr(registry, "_owners", dict(registry._owners))
    monkeypatch.setattr(registry, "_plugins_loaded", False)
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group: [ep for ep in eps if ep.group == group])


def test_plugin_taking_a_registered_name_is_warned_about_and_the_first_stays(caplog):
    reg = Registry("function", group="squeeze.tests")
    reg.register("sqrt", abs, owner="squeeze.builtins")
    with caplog.at_level(logging.WARNING, logger="squeeze.plugins"):
        reg.load_plugins([entry_point("sqrt", "math:sqrt")])
    assert reg.get("sqrt") is abs
    assert "registered twice: by squeeze.builtins and by plugin `sqrt` (math:sqrt)" in caplog.records[0].getMessage()


@pytest.fixture
def noop_plugin(monkeypatch):
    """The example plugin (examples/plugin) as if pip-installed."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    with_plugins(monkeypatch, pass_registry, [entry_point("quant.noop", "squeeze_noop", "squeeze.methods")])
    yield
    sys.modules.pop("squeeze_noop", None)


def test_plugin_method_is_listed_and_accepted_by_recipes(noop_plugin, cli, tmp_path):
    r = cli("list", "methods")
    assert r.exit_code == 0 and "quant.noop" in r.stdout
    path = tmp_path / "r.yaml"
    path.write_text("name: x\nstages:\n  - method: quant.noop\n")
    assert [s.method for s in load_recipe(str(path)).stages] == ["quant.noop"]


def test_list_importances(cli):
    r = cli("list", "importances")
    assert r.exit_code == 0
    for name in ("bn_scale", "l1", "l2", "taylor"):
        assert name in r.stdout


def test_plugin_runtime_is_accepted_in_target_files(monkeypatch, tmp_path):
    from squeeze.target import load_target

    ep = entry_point("ort-copy", "squeeze.measure.runtimes:OrtRuntime", "squeeze.runtimes")
    with_plugins(monkeypatch, runtime_registry, [ep])
    path = tmp_path / "t.yaml"
    path.write_text("name: t\nruntime: ort-copy\n")
    assert load_target(str(path)).runtime == "ort-copy" and runtime_registry.get("ort-copy") is OrtRuntime


# Contracts every registered runtime and criterion keeps (the passes' contract is in test_recipe.py).
@pytest.mark.parametrize("name", runtime_registry.names())
def test_every_runtime_is_named_after_its_registration(name):
    cls = runtime_registry.get(name)
    assert issubclass(cls, Runtime) and cls.name == name


@pytest.mark.parametrize("name", importance_registry.names())
def test_every_criterion_has_a_summary_and_its_name(name):
    cls = importance_registry.get(name)
    assert issubclass(cls, Criterion) and cls.name == name and cls.summary
