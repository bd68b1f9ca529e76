"""The plugin system: entry points, PEFTKIT_LOAD_PLUGINS, broken and clashing plugins, the hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import peftkit
from peftkit.errors import PluginError

METHOD_SRC = '''
from dataclasses import dataclass
import torch
import peftkit

@dataclass(frozen=True)
class Cfg:
    pass

class Scale(peftkit.Adapter):
    def __init__(self):
        super().__init__()
        self.s = torch.nn.Parameter(torch.ones(()))
    def transform(self, module, args, kwargs, output):
        return output * self.s

class M(peftkit.Method):
    """{doc}"""
    name = "{name}"
    Config = Cfg
    def build(self, path, module):
        return Scale()

@peftkit.hookimpl
def {hook}(register):
    register(M)
'''


def _dist(root: Path, dist: str, entry: str, module: str, source: str | None) -> None:
    info = root / f"{dist.replace('-', '_')}-0.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.3\n")
    (info / "entry_points.txt").write_text(f"[peftkit]\n{entry} = {module}\n")
    if source is not None:
        (root / f"{module}.py").write_text(source)


def _run(root: Path, code: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if k != "PEFTKIT_LOAD_PLUGINS"}
    environ["PYTHONPATH"] = os.pathsep.join([str(root), environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**environ, **env}, timeout=120)


LIST = "import json, peftkit; print(json.dumps({n: i.distribution for n, i in peftkit.methods().items()}))"


def test_entry_point_plugin_and_broken_one(tmp_path: Path) -> None:
    _dist(tmp_path, "peftkit-double", "double", "peftkit_double", METHOD_SRC.format(name="double", doc="Doubles.", hook="register_methods"))
    _dist(tmp_path, "peftkit-broken", "broken", "module_that_does_not_exist", None)
    out = _run(tmp_path, LIST)
    assert out.returncode == 0, out.stderr
    methods = json.loads(out.stdout)
    assert methods["double"] == "peftkit-double" and methods["lora"] == "peftkit"
    assert "plugin 'broken'" in out.stderr and "failed to load" in out.stderr  # reported, not fatal


def test_peftkit_load_plugins_restricts_third_party(tmp_path: Path) -> None:
    _dist(tmp_path, "peftkit-double", "double", "peftkit_double", METHOD_SRC.format(name="double", doc="Doubles.", hook="register_methods"))
    only_builtins = json.loads(_run(tmp_path, LIST, PEFTKIT_LOAD_PLUGINS="").stdout)
    assert "double" not in only_builtins and "lora" in only_builtins and "ia3" not in only_builtins
    chosen = json.loads(_run(tmp_path, LIST, PEFTKIT_LOAD_PLUGINS="double").stdout)
    assert "double" in chosen and "ia3" not in chosen


def test_name_clash_names_both_plugins(tmp_path: Path) -> None:
    _dist(tmp_path, "peftkit-fake-lora", "fake", "peftkit_fake", METHOD_SRC.format(name="lora", doc="Fake.", hook="register_methods"))
    out = _run(tmp_path, LIST)
    assert out.returncode != 0
    assert "two plugins register the method 'lora'" in out.stderr and "'fake'" in out.stderr and "(peftkit)" in out.stderr


def test_misspelled_hook_is_reported_every_time_and_breaks_nothing_else(tmp_path: Path) -> None:
    _dist(tmp_path, "peftkit-typo", "typo", "peftkit_typo", METHOD_SRC.format(name="typo", doc="Typo.", hook="register_method"))
    code = """
    import json, peftkit, torch
    from peftkit.plugins import failed_plugins
    for _ in range(2):  # the same answer on every call, not only the first
        names = list(peftkit.methods())
        assert "typo" not in names and "lora" in names
    peftkit.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), "lora")
    print(json.dumps(failed_plugins()))
    """
    out = _run(tmp_path, code)
    assert out.returncode == 0, out.stderr
    assert "register_method, which is not a peftkit hook" in json.loads(out.stdout)["typo"]
    assert "plugin 'typo' was skipped" in out.stderr


@pytest.mark.parametrize(("case", "source"), [
    ("raises", METHOD_SRC.format(name="boom", doc="Boom.", hook="register_methods").replace(
        "    register(M)", "    raise RuntimeError('plugin bug')")),
    ("exits", "raise SystemExit(3)\n"),
    ("interrupts_import", "import sys\nsys.exit('bye')\n"),
])
def test_a_plugin_that_raises_breaks_nothing_else(tmp_path: Path, case: str, source: str) -> None:
    _dist(tmp_path, "peftkit-bad", "bad", "peftkit_bad", source)
    code = """
    import json, peftkit, torch
    from peftkit.plugins import failed_plugins
    m = peftkit.wrap(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)), "lora")
    print(json.dumps({"methods": list(peftkit.methods()), "failed": failed_plugins()}))
    """
    out = _run(tmp_path, code)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert "lora" in report["methods"] and "boom" not in report["methods"] and "bad" in report["failed"]


def test_hook_register_methods(register_plugin: Any) -> None:
    """Every hook has a test: a plugin object registers a method through register_methods."""
    calls = []

    class Plugin:
        @peftkit.hookimpl
        def register_methods(self, register: Any) -> None:
            calls.append(register)
            from peftkit_plugins.lora import LoRA

            class Tiny(LoRA):
                """LoRA, rank 1 by default."""

                name = "tiny_lora"

            register(Tiny)

    register_plugin(Plugin(), "test-tiny")
    info = peftkit.methods()["tiny_lora"]
    assert info.plugin == "test-tiny" and info.doc == "LoRA, rank 1 by default."
    assert calls
    m = peftkit.wrap(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "tiny_lora", r=1)
    assert m.peft_adapters["default"].paths == ["0"]


def test_registering_a_non_method_is_an_error(register_plugin: Any) -> None:
    class Bad:
        @peftkit.hookimpl
        def register_methods(self, register: Any) -> None:
            register(object)

    register_plugin(Bad(), "test-bad")
    with pytest.raises(PluginError, match="not a peftkit.Method subclass"):
        peftkit.methods()


def test_every_hook_is_documented() -> None:
    from peftkit import hookspecs

    doc = (Path(__file__).parents[1] / "docs" / "plugins.md").read_text()
    for name in dir(hookspecs):
        if hasattr(getattr(hookspecs, name), "peftkit_spec"):
            assert f"def {name}(" in doc, f"hook {name} is not documented in docs/plugins.md"


def test_third_party_example_is_found_through_its_entry_point() -> None:
    from importlib.metadata import entry_points

    eps = {ep.name: ep for ep in entry_points(group="peftkit")}
    assert eps["ia3"].dist.name == "peftkit-ia3" and eps["lora"].dist.name == "peftkit"
    info = peftkit.methods()["ia3"]
    assert info.distribution == "peftkit-ia3" and info.version == "0.1.0"
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    x = torch.randn(3, 4)
    m = peftkit.wrap(net, "ia3", init=2.0)
    with torch.no_grad():
        y = m(x)
        m.merge()
        torch.testing.assert_close(m(x), y)
