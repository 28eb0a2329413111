"""The package's layers read from its own imports: a report and the diagram in docs/architecture.md.

    python scripts/architecture.py [--plot docs/images/architecture.png] [--json]

Every ``import`` in ``src/napari_stgen`` is parsed (nothing is imported or run). A module's layer
is its sub-package: ``io``, ``models``, ``inference``, ``training``, ``widgets``, ``cli``;
``core`` for the top-level modules (errors, coords); ``api`` for the package root (its lazy
re-exports). The allowed direction is ``core <- io, models <- inference <- widgets, cli``
with ``training`` beside inference (it may use inference; inference never uses training).
The report lists imports against that direction, imports of the package's own modules made
inside functions, and the largest modules. ``tests/test_architecture.py`` asserts the same limits.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "src" / "napari_stgen"
PACKAGE = "napari_stgen"
LAYERS = ("core", "io", "models", "inference", "training", "widgets", "cli")
#: What each layer may import from the package (itself always).
ALLOWED = {
    "core": {"core"},
    "io": {"core"},
    "models": {"core", "io"},
    "inference": {"core", "io", "models"},
    "training": {"core", "io", "models", "inference"},
    "widgets": {"core", "io", "models", "inference"},
    "cli": {"core", "io", "models", "inference", "training", "widgets"},
    "api": {"core", "io", "models", "inference"},
}
MAX_OWN_LOCAL_IMPORTS = 20
MAX_MODULE_LINES = 600


@dataclass(frozen=True)
class Edge:
    """One import of a package module by another."""

    src: str
    dst: str
    line: int
    local: bool  # inside a function (deferred) rather than at module level


def module_name(path: Path, root: Path = ROOT) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def layer_of(module: str) -> str:
    """The layer of a dotted module name (the package root is its public ``api``)."""
    parts = module.split(".")
    if len(parts) == 1:
        return "api"
    return parts[1] if parts[1] in LAYERS else "core"


def _resolve(node: ast.ImportFrom, module: str, is_pkg: bool) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        parts = module.split(".")
        parts = parts if is_pkg else parts[:-1]
        parts = parts[: len(parts) - (node.level - 1)]
        base = ".".join(parts + ([node.module] if node.module else []))
    if not base.startswith(PACKAGE):
        return []
    if node.module is None:  # `from . import x`: x is a module
        return [f"{base}.{a.name}" for a in node.names]
    return [base]


def package_edges(root: Path = ROOT) -> list[Edge]:
    """Every import of a package module in the package, with whether it sits in a function."""
    edges: list[Edge] = []
    for path in sorted(root.rglob("*.py")):
        module = module_name(path, root)
        tree = ast.parse(path.read_text(), str(path))
        local: set[int] = set()
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                nodes = ast.walk(fn)
                local.update(id(n) for n in nodes if isinstance(n, ast.Import | ast.ImportFrom))
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                targets = _resolve(node, module, path.name == "__init__.py")
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith(PACKAGE)]
            else:
                continue
            edges += [Edge(module, t, node.lineno, id(node) in local) for t in targets]
    return edges


def upward_imports(edges: list[Edge]) -> list[Edge]:
    """Imports against the layer direction (e.g. inference importing training or widgets).

    The package root imports nothing at module level (its re-exports are lazy), so any layer
    may read it (``__version__``) and it may re-export any layer."""
    return [
        e
        for e in edges
        if PACKAGE not in (e.src, e.dst)
        and layer_of(e.dst) not in ALLOWED[layer_of(e.src)] | {layer_of(e.src)}
    ]


def module_lines(root: Path = ROOT) -> dict[str, int]:
    return {
        module_name(p, root): len(p.read_text().splitlines()) for p in sorted(root.rglob("*.py"))
    }


def report(root: Path = ROOT) -> dict:
    edges = package_edges(root)
    lines = module_lines(root)
    own_local = [e for e in edges if e.local]
    layer_edges = Counter(
        (layer_of(e.src), layer_of(e.dst))
        for e in {(e.src, e.dst): e for e in edges}.values()
        if layer_of(e.src) != layer_of(e.dst)
    )
    return {
        "modules": len(lines),
        "lines": sum(lines.values()),
        "largest_modules": dict(sorted(lines.items(), key=lambda kv: -kv[1])[:8]),
        "upward_imports": [f"{e.src}:{e.line} -> {e.dst}" for e in upward_imports(edges)],
        "own_local_imports": len(own_local),
        "own_local_import_sites": [f"{e.src}:{e.line} -> {e.dst}" for e in own_local],
        "layer_edges": {f"{a} -> {b}": n for (a, b), n in sorted(layer_edges.items())},
        "layer_modules": dict(Counter(layer_of(m) for m in lines)),
    }


def _in_box(pos: dict, x: float, y: float) -> bool:
    return any(abs(x - bx) < 0.15 and abs(y - by) < 0.06 for bx, by in pos.values())


def plot(rep: dict, out: Path) -> None:
    """Layers as boxes (module count, lines), arrows for module-to-module imports between them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pos = {
        "widgets": (0.15, 0.88), "api": (0.5, 0.88), "cli": (0.85, 0.88),
        "inference": (0.25, 0.58), "training": (0.75, 0.58),
        "io": (0.25, 0.28), "models": (0.75, 0.28),
        "core": (0.5, 0.06),
    }  # fmt: skip
    lines = module_lines()
    per_layer = Counter()
    for m, n in lines.items():
        per_layer[layer_of(m)] += n
    fig, ax = plt.subplots(figsize=(8, 6.4), dpi=120)
    ax.set_xlim(0, 1)
    ax.set_ylim(-0.04, 1)
    ax.axis("off")
    for name, (x, y) in pos.items():
        ax.text(
            x, y,
            f"{name}\n{rep['layer_modules'].get(name, 0)} modules, {per_layer[name]:,} lines",
            ha="center", va="center", fontsize=10,
            bbox={"boxstyle": "round,pad=0.6", "fc": "#eef3fb", "ec": "#3b5b92"},
        )  # fmt: skip
    for key, n in rep["layer_edges"].items():
        a, b = key.split(" -> ")
        if b == "core" and a != "core":
            continue  # every layer uses core (errors, coords): said in the caption
        (x0, y0), (x1, y1) = pos[a], pos[b]
        bad = b not in ALLOWED[a] and "api" not in (a, b)  # the root: see upward_imports
        ax.annotate(
            "", xy=(x1, y1), xytext=(x0, y0),
            arrowprops={"arrowstyle": "-|>", "color": "#c0392b" if bad else "#777",
                        "lw": 0.6 + 0.08 * min(n, 25), "shrinkA": 24, "shrinkB": 24,
                        "connectionstyle": "arc3,rad=0.06"},
        )  # fmt: skip
        t = next(
            (t for t in (0.5, 0.35, 0.65, 0.25, 0.75) if not _in_box(pos, x0 + t * (x1 - x0),
                                                             y0 + t * (y1 - y0))),
            0.5,
        )  # fmt: skip
        ax.text(x0 + t * (x1 - x0), y0 + t * (y1 - y0), str(n), fontsize=7,
                color="#c0392b" if bad else "#333", ha="center", va="center",
                bbox={"fc": "white", "ec": "none", "pad": 0.5})  # fmt: skip
    big, big_n = next(iter(rep["largest_modules"].items()))
    ax.set_title(
        "napari-stgen layers, read from the code: an arrow counts the module pairs importing\n"
        "across two layers (red: against the layer direction; every layer also uses core)\n"
        f"upward imports: {len(rep['upward_imports'])}, package imports inside functions: "
        f"{rep['own_local_imports']} (≤ {MAX_OWN_LOCAL_IMPORTS})\nlargest module: "
        f"{big.removeprefix(PACKAGE + '.')} {big_n} lines (≤ {MAX_MODULE_LINES})",
        fontsize=10,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.partial.png")
    fig.savefig(tmp, bbox_inches="tight")
    plt.close(fig)
    tmp.replace(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plot", type=Path, default=None, help="write the layer diagram here")
    ap.add_argument("--json", action="store_true", help="print the whole report as JSON")
    args = ap.parse_args(argv)
    rep = report()
    if args.json:
        print(json.dumps(rep, indent=2))
    else:
        print(f"{rep['modules']} modules, {rep['lines']:,} lines")
        print("largest:", ", ".join(f"{m} {n}" for m, n in rep["largest_modules"].items()))
        print(f"upward imports: {len(rep['upward_imports'])}", *rep["upward_imports"], sep="\n  ")
        print(f"package imports inside functions: {rep['own_local_imports']}")
    if args.plot:
        plot(rep, args.plot)
    ok = (
        not rep["upward_imports"]
        and rep["own_local_imports"] <= MAX_OWN_LOCAL_IMPORTS
        and max(rep["largest_modules"].values()) <= MAX_MODULE_LINES
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
