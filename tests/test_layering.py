"""The one-way layering of the three packages, read from the code's imports (top-level and inside functions).

engines -> optimize's artifact layer (and the families' specs); eval -> engines, optimize; optimize -> engines;
optimize -> eval only where its CLI registers eval's commands; families -> the artifact layer only; no cycles.
"""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"optimize": "diffaccel.optimize", "engines": "diffaccel.engines", "eval": "diffaccel.eval"}


def _module_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict:
    return {_module_of(p): p for top in PACKAGES for p in (ROOT / top).rglob("*.py")}


def _imports(path: Path, modules: dict) -> set:
    """diffaccel modules ``path`` imports (a ``from pkg import name`` naming a submodule counts as that module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("diffaccel.")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("diffaccel.") \
                and node.level == 0:
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules.keys()
            out |= subs or {node.module}
    return {m for m in out if m in modules or any(k.startswith(m + ".") for k in modules)}


def _graph() -> dict:
    modules = _modules()
    return {m: _imports(p, modules) - {m} for m, p in modules.items()}


def _allowed(src: str, dst: str) -> bool:
    if src.startswith("diffaccel.engines"):
        return not dst.startswith("diffaccel.eval") and (
            dst.startswith(("diffaccel.engines", "diffaccel.optimize.artifact", "diffaccel.optimize.families"))
            or dst == "diffaccel.optimize")
    if src.startswith("diffaccel.optimize.families") or src.startswith("diffaccel.optimize.artifact"):
        return dst.startswith(("diffaccel.optimize.artifact", "diffaccel.optimize.families"))
    if src.startswith("diffaccel.optimize"):
        return not dst.startswith("diffaccel.eval") or src.startswith("diffaccel.optimize.cli")
    return True


def test_layers_point_one_way():
    bad = sorted(f"{src} -> {dst}" for src, dsts in _graph().items() for dst in dsts if not _allowed(src, dst))
    assert not bad, "imports that break the layering:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph = _graph()
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph.get(m, ())):
            if d not in graph:
                continue
            if state.get(d) == "open":
                cycles.append(" -> ".join(stack[stack.index(d):] + [d]))
            elif d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_check_sees_edges():
    """The graph reader itself: it must find the edges it is meant to police."""
    graph = _graph()
    assert "diffaccel.optimize.artifact.manifest" in graph["diffaccel.engines.pipelines.sd"]
    assert "diffaccel.eval.cli" in graph["diffaccel.optimize.cli"]
    assert not _allowed("diffaccel.engines.backends.torch", "diffaccel.optimize.stages.base")
    assert not _allowed("diffaccel.optimize.quant.ort_static", "diffaccel.eval.harness.timing")
