"""Imports point one way: data and configuration at the bottom, then the components (strategies, modes,
networks, samplers), then training and the sampling pipeline, then generation and evaluation, then the command
lines and the Python API. Read from the source (every import statement, inside functions too), so a lazy import
cannot hide a circle."""
from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("common", "config", "eval", "Generation", "medgen")
CORE = "medgen.Generation.TrainGen.core"
# module prefix -> layer; the longest matching prefix decides
LAYERS = {
    "medgen.common": 0, "medgen.config": 0,
    f"{CORE}.phantom": 0,                             # the embedded demo dataset is data
    CORE: 1,                                          # config, strategies, modes, network, samplers, checkpoints
    f"{CORE}.trainer": 2, f"{CORE}.validation": 2, f"{CORE}.lr_finder": 2, f"{CORE}.autobatch": 2,
    f"{CORE}.autoencoder": 2, f"{CORE}.run": 2, f"{CORE}.generation": 2,
    f"{CORE}.generate": 3, f"{CORE}.segment_images": 3, f"{CORE}.inserting": 3, "medgen.eval": 3,
    "medgen.Generation.TrainGen.train": 4, "medgen.Generation.TrainGen.generate": 4,
    "medgen.Generation.TrainGen.demo": 4, "medgen.eval.obj_eval.run_evaluation": 4,
    "medgen.eval.obj_eval.run_utility": 4, "medgen.eval.obj_eval.generate_report": 4,
    "medgen.eval.obj_eval.metrics": 4, "medgen": 4,
}
NAMES = {0: "data and configuration", 1: "components", 2: "training and sampling", 3: "generation and evaluation",
         4: "command lines and API"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    parts = parts if parts[0] == "medgen" else ["medgen", *parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def imports(path: Path, known: dict) -> set[str]:
    """Every medgen module `path` imports (resolved to the module, not the name imported from it)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("medgen"):
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("medgen")]
        for name in names:
            while name not in known and "." in name:
                name = name.rsplit(".", 1)[0]
            if name in known:
                out.add(name)
    return out


def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(p, known) - {m} for m, p in known.items()}


def test_every_import_points_down_or_sideways():
    g = graph()
    upward = [f"{m} ({NAMES[layer(m)]}) imports {t} ({NAMES[layer(t)]})"
              for m, targets in g.items() for t in targets if layer(t) > layer(m)]
    assert not upward, "\n".join(sorted(upward))


def test_no_import_circle():
    g = graph()
    index, low, stack, on, circles = {}, {}, [], set(), []

    def visit(v):   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))
    for v in g:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_the_checker_finds_a_circle_and_an_upward_import(tmp_path):
    """The two checks above on a made-up graph: a test that cannot fail checks nothing."""
    pkg = tmp_path / "medgen"
    (pkg / "common").mkdir(parents=True)
    (pkg / "common" / "a.py").write_text("from medgen.eval.b import x\n")
    (pkg / "eval").mkdir()
    (pkg / "eval" / "b.py").write_text("def f():\n    from medgen.common.a import y\n")
    known = {"medgen.common.a": pkg / "common" / "a.py", "medgen.eval.b": pkg / "eval" / "b.py"}
    g = {m: imports(p, known) for m, p in known.items()}
    assert g == {"medgen.common.a": {"medgen.eval.b"}, "medgen.eval.b": {"medgen.common.a"}}
    assert layer("medgen.common.a") < layer("medgen.eval.b")
