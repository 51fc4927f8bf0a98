"""The plugin registry: built-ins, entry points, name clashes, broken plugins, env switches."""

from __future__ import annotations

import importlib.metadata as md
import sys
import textwrap
import types
from pathlib import Path

import pytest
import torch

from vsd.core import hookspecs, registry as registry_module
from vsd.core.errors import PluginError
from vsd.core.hookspecs import SLOTS, hookimpl
from vsd.core.registry import ENV_ALLOW, ENV_DISABLE, Registry
from vsd.plugins import builtins
from vsd.plugins.aggregators.pooling import MeanAggregator
from vsd.plugins.encoders.conv import ConvEncoder

BUILTINS = {
    ("encoder", "conv"),
    ("aggregator", "attention"),
    ("aggregator", "mean"),
    ("aggregator", "max"),
    ("aggregator", "weighted-mean"),
    ("representation", "voxel-grid"),
    ("renderer", "volume"),
    ("dataset", "minens"),
}


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    monkeypatch.delenv(ENV_ALLOW, raising=False)
    monkeypatch.delenv(ENV_DISABLE, raising=False)


def plugin_module(name: str, **hooks) -> types.ModuleType:
    """An in-memory plugin module whose hooks return the given dicts (or raise them)."""
    mod = types.ModuleType(name)
    for hook_name, result in hooks.items():

        def impl(result=result):
            if isinstance(result, Exception):
                raise result
            return result

        impl.__name__ = hook_name
        setattr(mod, hook_name, hookimpl(impl))
    return mod


class Quiet(MeanAggregator):
    """A second mean aggregator, registered under names of the tests' choosing."""


# ---- built-ins and lookups ------------------------------------------------------------------------
def test_builtins_are_registered_by_vsd():
    reg = Registry.load(autoload=False)
    assert not reg.failures and not reg.duplicates
    for slot, name in BUILTINS:
        info = reg.get(slot, name)
        assert info.provider == "vsd" and info.version == md.version("vsd")
        assert info.slot == slot and info.name == name


def test_every_hook_is_documented_and_used_by_the_builtins():
    specs = {n for n in dir(hookspecs) if hasattr(getattr(hookspecs, n), "vsd_spec")}
    assert specs == set(SLOTS.values())
    reg = Registry.load(autoload=False)
    for slot, hook_name in SLOTS.items():
        doc = getattr(hookspecs, hook_name).__doc__ or ""
        assert "Constructed as" in doc and len(doc.split()) > 10, hook_name
        assert hasattr(getattr(builtins, hook_name, None), "vsd_impl"), f"built-ins do not implement {hook_name}"
        assert any(i.provider == "vsd" for i in reg.plugins[slot].values()), slot


def test_duplicate_name_names_both_providers():
    clash = plugin_module("clash", vsd_aggregators={"mean": Quiet, "quiet": Quiet})
    reg = Registry.load(autoload=False, extra=[(clash, "vsd-clash")])
    with pytest.raises(PluginError) as exc:
        reg.get("aggregator", "mean")
    msg = str(exc.value)
    assert "registered twice" in msg and "'mean'" in msg
    assert "vsd " in msg and "MeanAggregator" in msg  # the built-in ...
    assert "vsd-clash" in msg and "Quiet" in msg  # ... and the newcomer
    assert ENV_ALLOW in msg  # and how to resolve it
    assert reg.get("aggregator", "quiet").provider == "vsd-clash"  # the rest of the plugin works
    assert reg.get("aggregator", "max").provider == "vsd"
    assert "mean" not in reg.names("aggregator")


def test_unknown_name_lists_what_exists():
    reg = Registry.load(autoload=False, extra=[(plugin_module("q", vsd_aggregators={"quiet": Quiet}), "vsd-quiet")])
    with pytest.raises(PluginError) as exc:
        reg.get("aggregator", "maen")
    msg = str(exc.value)
    assert "unknown aggregator 'maen'" in msg
    for listed in ("attention (vsd)", "mean (vsd)", "max (vsd)", "weighted-mean (vsd)", "quiet (vsd-quiet)"):
        assert listed in msg
    with pytest.raises(PluginError, match="unknown plugin slot 'aggregators'.*aggregator"):
        reg.get("aggregators", "mean")


def test_bad_hook_results_are_recorded_as_failures():
    bad = plugin_module(
        "bad",
        vsd_aggregators={"not-an-aggregator": torch.nn.Identity, "wrong-slot": ConvEncoder, "not-a-class": 3, "fine": Quiet},
        vsd_renderers=["volume"],
        vsd_datasets=RuntimeError("no data today"),
    )
    reg = Registry.load(autoload=False, extra=[(bad, "vsd-bad")])
    errors = [f.error for f in reg.failures]
    assert all(f.provider == "vsd-bad" for f in reg.failures) and len(errors) == 5, errors
    for name in ("not-an-aggregator", "wrong-slot", "not-a-class"):
        assert any(f"'{name}' is not a subclass of vsd.core.contracts.aggregator.Aggregator" in e for e in errors), name
    assert any("vsd_renderers must return a dict" in e and "list" in e for e in errors)
    assert any("vsd_datasets raised RuntimeError: no data today" in e for e in errors)
    assert reg.names("aggregator") == sorted(["attention", "fine", "max", "mean", "weighted-mean"])
    assert all(i.provider == "vsd" for i in reg.plugins["renderer"].values()) and "volume" in reg.names("renderer")
    assert reg.get("dataset", "minens").provider == "vsd"


def test_hook_with_a_wrong_signature_is_a_failure():
    mod = types.ModuleType("wrong_signature")

    @hookimpl
    def vsd_encoders(unexpected):
        return {}

    mod.vsd_encoders = vsd_encoders
    reg = Registry.load(autoload=False, extra=[(mod, "vsd-wrong")])
    assert [f.provider for f in reg.failures] == ["vsd-wrong"]
    assert "unexpected" in reg.failures[0].error
    assert reg.names("encoder") == ["conv"]


def test_a_module_named_twice_loads_once():
    reg = Registry.load(autoload=False, extra=[(builtins, "vsd-again")])
    assert not reg.failures and not reg.duplicates
    assert reg.get("aggregator", "mean").provider == "vsd"


def test_process_registry_is_cached_until_reset(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", None)
    first = registry_module.get_registry()
    assert registry_module.get_registry() is first
    registry_module.reset_registry()
    assert registry_module.get_registry() is not first


# ---- installed distributions (throwaway ones on sys.path) -----------------------------------------
GOOD = """
from vsd.core.hookspecs import hookimpl
from vsd.plugins.aggregators.pooling import MeanAggregator


class {cls}(MeanAggregator):
    pass


@hookimpl
def vsd_aggregators():
    return {{"{name}": {cls}}}
"""


@pytest.fixture
def site(tmp_path, monkeypatch):
    """A folder on sys.path where tests install throwaway distributions."""
    root = tmp_path / "site"
    root.mkdir()
    monkeypatch.syspath_prepend(str(root))
    made: list[str] = []

    def install(dist: str, module: str, source: str, ep_name: str | None = None) -> None:
        info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
        (info / "entry_points.txt").write_text(f"[vsd]\n{ep_name or module} = {module}\n")
        if source:
            (root / f"{module}.py").write_text(textwrap.dedent(source))
        made.append(module)

    yield install
    for module in made:
        sys.modules.pop(module, None)


def test_a_plugin_that_fails_to_import_is_listed_and_the_rest_load(site):
    site("vsd-test-broken", "vsd_test_broken_mod", "raise RuntimeError('plugin exploded on import')\n", ep_name="broken")
    site("vsd-test-fine", "vsd_test_fine_mod", GOOD.format(cls="Fine", name="test-fine"))
    reg = Registry.load()
    [failure] = [f for f in reg.failures if f.provider == "vsd-test-broken"]
    assert failure.entry_point == "broken" and failure.version == "0.3"
    assert failure.error == "RuntimeError: plugin exploded on import"
    info = reg.get("aggregator", "test-fine")
    assert (info.provider, info.version) == ("vsd-test-fine", "0.3")
    for slot, name in BUILTINS:
        assert reg.get(slot, name).provider == "vsd"


def test_entry_point_to_a_missing_module_is_a_failure(site):
    site("vsd-test-missing", "vsd_test_no_such_module", "", ep_name="missing")
    reg = Registry.load()
    [failure] = [f for f in reg.failures if f.provider == "vsd-test-missing"]
    assert "ModuleNotFoundError" in failure.error and "vsd_test_no_such_module" in failure.error


def test_entry_point_to_the_builtins_is_harmless(site):
    site("vsd-test-rebuiltins", "vsd.plugins.builtins", "", ep_name="builtins")
    reg = Registry.load()
    assert not [f for f in reg.failures if f.provider == "vsd-test-rebuiltins"] and not reg.duplicates


@pytest.fixture
def two_plugins(site):
    site("vsd-test-alpha", "vsd_test_alpha_mod", GOOD.format(cls="Alpha", name="test-alpha"), ep_name="alpha")
    site("vsd-test-beta", "vsd_test_beta_mod", GOOD.format(cls="Beta", name="test-beta"), ep_name="beta")
    site("vsd-test-broken2", "vsd_test_broken2_mod", "raise ImportError('nope')\n", ep_name="broken2")


def _loaded(reg: Registry) -> set[str]:
    return {n for n in reg.names("aggregator") if n.startswith("test-")}


def _failed(reg: Registry) -> set[str]:
    return {f.provider for f in reg.failures}


@pytest.mark.parametrize(
    "allow, loaded",
    [
        (None, {"test-alpha", "test-beta"}),
        ("vsd-test-alpha", {"test-alpha"}),  # by distribution name
        ("beta", {"test-beta"}),  # by entry-point name
        (" alpha , vsd-test-beta ", {"test-alpha", "test-beta"}),
        ("something-else", set()),
    ],
)
def test_allowlist(two_plugins, monkeypatch, allow, loaded):
    if allow is not None:
        monkeypatch.setenv(ENV_ALLOW, allow)
    reg = Registry.load()
    assert _loaded(reg) == loaded
    # A broken plugin outside the allowlist is not even imported.
    assert ("vsd-test-broken2" in _failed(reg)) == (allow is None)
    assert {(s, n) for s, n in BUILTINS} <= {(i.slot, i.name) for i in reg.all()}


@pytest.mark.parametrize("value, disabled", [("1", True), ("true", True), ("YES", True), ("0", False), ("", False)])
def test_disable_autoload(two_plugins, monkeypatch, value, disabled):
    monkeypatch.setenv(ENV_DISABLE, value)
    monkeypatch.setenv(ENV_ALLOW, "alpha,broken2")  # the switch wins over the allowlist
    reg = Registry.load()
    assert _loaded(reg) == (set() if disabled else {"test-alpha"})
    assert ("vsd-test-broken2" in _failed(reg)) == (not disabled)
    for slot, name in BUILTINS:
        assert reg.get(slot, name).provider == "vsd"


def test_autoload_false_ignores_installed_plugins(two_plugins):
    reg = Registry.load(autoload=False)
    assert _loaded(reg) == set() and not reg.failures


def test_the_registry_reads_the_vsd_group(site):
    # Entry points of another group are not plugins.
    site("vsd-test-othergroup", "vsd_test_other_mod", GOOD.format(cls="Other", name="test-other"))
    info = Path(sys.path[0]) / "vsd_test_othergroup-0.3.dist-info" / "entry_points.txt"
    info.write_text("[not_vsd]\nother = vsd_test_other_mod\n")
    assert "test-other" not in Registry.load().names("aggregator")
