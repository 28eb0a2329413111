"""The package's layering and size limits, read from its source (docs/architecture.md)."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from collections import defaultdict
from fnmatch import fnmatch
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "napari_stgen"

# Public top-level function names defined in more than one module on purpose: name ->
# (the modules, as globs under src/napari_stgen, that may define it; why).
SHARED_NAMES = {
    "register": (("cli/*.py",), "CLI area protocol: cli/main.py calls each mod.register(sub)"),
    "register_train": (("cli/*.py",), "CLI area protocol: cli/main.py calls mod.register_train"),
    "register_evaluate": (("cli/*.py",), "CLI area protocol: cli/main.py calls it per area"),
    "run": (("cli/*_commands.py",), "a command's handler, named 'X_commands:run' by cli/X.py"),
    "train": (("cli/*_commands.py",), "`stgen train <model>`'s handler, 'X_commands:train'"),
    "evaluate": (("cli/*_commands.py",), "`stgen evaluate <model>`'s handler"),
    "collect": (
        ("inference/engine.py", "inference/synthesis_grid.py"),
        "engine.collect merges PartialResults, synthesis_grid.collect runs a step generator; "
        "renaming either needs the synthesis modules (synthesis_profile imports engine.collect)",
    ),
    "pearson_per_gene": (
        ("training/metrics.py", "training/evaluate_stmdit.py"),
        "evaluate_stmdit's gives NaN for a constant column, metrics' 0: STMDiT's to settle",
    ),
}


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


def public_functions(root: Path = SRC) -> dict[str, list[str]]:
    """Public (no leading underscore) top-level function name -> the modules defining it."""
    found = defaultdict(list)
    for path in sorted(root.rglob("*.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            is_def = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            if is_def and not node.name.startswith("_"):
                found[node.name].append(path.relative_to(root).as_posix())
    return found


def test_no_two_modules_define_one_public_function_name():
    """One name, one behaviour: a public function name is defined once in the package
    (re-exports are imports, not definitions), except the listed protocols and pairs."""
    clashes = {}
    for name, mods in public_functions().items():
        if len(mods) < 2:
            continue
        globs = SHARED_NAMES.get(name, ((), ""))[0]
        if not all(any(fnmatch(m, g) for g in globs) for m in mods):
            clashes[name] = mods
    assert not clashes, clashes


def test_the_name_rule_catches_a_second_definition(tmp_path):
    for mod in ("a.py", "b.py"):
        (tmp_path / mod).write_text("def tile_mask():\n    pass\n\ndef _own():\n    pass\n")
    assert public_functions(tmp_path) == {"tile_mask": ["a.py", "b.py"]}
