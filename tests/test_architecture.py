"""The package's layering and size limits, read from its source (docs/architecture.md)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def arch():
    spec = importlib.util.spec_from_file_location("architecture", ROOT / "scripts/architecture.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_no_import_runs_up_the_layers(arch):
    up = arch.upward_imports(arch.package_edges())
    assert not up, [f"{e.src}:{e.line} -> {e.dst}" for e in up]


def test_the_layer_rule_catches_an_upward_import(arch, tmp_path):
    pkg = tmp_path / "napari_stgen"
    (pkg / "inference").mkdir(parents=True)
    (pkg / "training").mkdir()
    for p in (pkg, pkg / "inference", pkg / "training"):
        (p / "__init__.py").write_text("")
    (pkg / "training" / "t.py").write_text("X = 1\n")
    (pkg / "inference" / "i.py").write_text("def f():\n    from ..training.t import X\n")
    up = arch.upward_imports(arch.package_edges(pkg))
    assert [(e.src, e.dst, e.local) for e in up] == [
        ("napari_stgen.inference.i", "napari_stgen.training.t", True)
    ]


def test_package_imports_sit_at_module_top_and_modules_stay_small(arch):
    rep = arch.report()
    assert rep["own_local_imports"] <= arch.MAX_OWN_LOCAL_IMPORTS, rep["own_local_import_sites"]
    big = {m: n for m, n in rep["largest_modules"].items() if n > arch.MAX_MODULE_LINES}
    assert not big


def test_cli_help_loads_neither_torch_nor_napari():
    code = (
        "import sys; from napari_stgen.cli.main import build_parser; build_parser(); "
        "heavy = ('torch', 'napari', 'anndata', 'spatialdata'); "
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
