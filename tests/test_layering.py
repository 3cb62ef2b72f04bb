"""The one-way layering of the three packages, read from the code's imports (top-level and inside functions; imports
under ``if TYPE_CHECKING:`` are annotations, not edges).

engines -> optimize's artifact layer (and the families' specs); eval -> engines, optimize; optimize -> engines;
optimize -> eval only where its CLI registers eval's commands; families -> the artifact layer only; no cycles.

Inside optimize, its sub-folders (and top-level modules) are layers, each importing only the layers below it
(``OPTIMIZE_LAYERS``, lowest first): a stage may use quant/export/artifact/families, quant never a stage. So no two
folders import each other (no folder-level loop), which a second test checks on the folder graph itself.
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


def _type_checking_only(tree) -> set:
    """The nodes under ``if TYPE_CHECKING:`` (never run: annotations only)."""
    skip = set()
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (getattr(test, "id", None) == "TYPE_CHECKING"
                                         or getattr(test, "attr", None) == "TYPE_CHECKING"):
            skip |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    return skip


def _imports(path: Path, modules: dict) -> set:
    """diffaccel modules ``path`` imports (a ``from pkg import name`` naming a submodule counts as that module)."""
    out = set()
    tree = ast.parse(path.read_text())
    skip = _type_checking_only(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
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


# optimize's layers, lowest first: each imports only layers listed before it (a new folder or module must be placed)
OPTIMIZE_LAYERS = ("artifact", "config", "memory", "families", "sources", "export", "quant", "stages", "api", "cli")


def _layer(module: str) -> "str | None":
    """The optimize layer of a module (None: not inside a layer of diffaccel.optimize)."""
    parts = module.split(".")
    return parts[2] if parts[:2] == ["diffaccel", "optimize"] and len(parts) > 2 else None


def _layer_allows(src: str, dst: str) -> bool:
    a, b = _layer(src), _layer(dst)
    if a is None or b is None or a == b:
        return True
    return OPTIMIZE_LAYERS.index(b) < OPTIMIZE_LAYERS.index(a)


def _allowed(src: str, dst: str) -> bool:
    if not _layer_allows(src, dst):
        return False
    if src.startswith("diffaccel.engines"):
        return not dst.startswith("diffaccel.eval") and (
            dst.startswith(("diffaccel.engines", "diffaccel.optimize.artifact", "diffaccel.optimize.families"))
            or dst == "diffaccel.optimize")
    if src.startswith("diffaccel.optimize.families") or src.startswith("diffaccel.optimize.artifact"):
        return dst.startswith(("diffaccel.optimize.artifact", "diffaccel.optimize.families"))
    if src.startswith("diffaccel.optimize"):
        return not dst.startswith("diffaccel.eval") or src.startswith("diffaccel.optimize.cli")
    return True


def _why(src: str, dst: str) -> str:
    a, b = _layer(src), _layer(dst)
    if not _layer_allows(src, dst):
        return f"{src} -> {dst}  (optimize.{a} may not import optimize.{b}, a layer above it: {OPTIMIZE_LAYERS})"
    return f"{src} -> {dst}"


def test_layers_point_one_way():
    bad = sorted(_why(src, dst) for src, dsts in _graph().items() for dst in dsts if not _allowed(src, dst))
    assert not bad, "imports that break the layering:\n" + "\n".join(bad)


def test_every_optimize_module_is_in_a_layer():
    unplaced = sorted({_layer(m) for m in _graph() if _layer(m) and _layer(m) not in OPTIMIZE_LAYERS})
    assert not unplaced, f"place these in OPTIMIZE_LAYERS (lowest first): {unplaced}"


def _folder(module: str) -> str:
    """The folder a module lives in: diffaccel.optimize.quant, diffaccel.engines.backends, ... (a top-level module
    of a package is its own folder)."""
    parts = module.split(".")
    return ".".join(parts[:3])


def _folder_cycles(graph: dict) -> list:
    """Each pair of folders that import each other, named by one module edge each way."""
    edges = {}
    for src, dsts in graph.items():
        for dst in dsts:
            a, b = _folder(src), _folder(dst)
            if a != b:
                edges.setdefault((a, b), f"{src} -> {dst}")
    return sorted(f"{a} <-> {b}: {edges[(a, b)]}; {edges[(b, a)]}" for a, b in edges if a < b and (b, a) in edges)


def test_no_folder_level_loop_in_optimize():
    graph = {m: {d for d in ds if _layer(d)} for m, ds in _graph().items() if _layer(m)}
    loops = _folder_cycles(graph)
    assert not loops, "folders of diffaccel.optimize that import each other:\n" + "\n".join(loops)


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
    assert "diffaccel.optimize.artifact.manifest" in graph["diffaccel.engines.pipelines.base"]
    assert "diffaccel.optimize.quant.calibration" in graph["diffaccel.optimize.stages.int8"]   # inside a function
    assert not _allowed("diffaccel.engines.backends.torch", "diffaccel.optimize.stages.base")
    assert not _allowed("diffaccel.optimize.quant.ort_static", "diffaccel.eval.harness.timing")
    assert not _allowed("diffaccel.optimize.quant.modelopt", "diffaccel.optimize.stages.base")
    assert _allowed("diffaccel.optimize.stages.int8", "diffaccel.optimize.quant.ort_static")
    assert "optimize.quant may not import optimize.stages" in _why("diffaccel.optimize.quant.x",
                                                                    "diffaccel.optimize.stages.y")
    loop = {"diffaccel.optimize.quant.a": {"diffaccel.optimize.stages.b"},
            "diffaccel.optimize.stages.c": {"diffaccel.optimize.quant.d"}}
    assert _folder_cycles(loop) == ["diffaccel.optimize.quant <-> diffaccel.optimize.stages: "
                                    "diffaccel.optimize.quant.a -> diffaccel.optimize.stages.b; "
                                    "diffaccel.optimize.stages.c -> diffaccel.optimize.quant.d"]
    base = ROOT / "optimize" / "stages" / "base.py"          # its TYPE_CHECKING import of api is not an edge
    assert "diffaccel.optimize.api" not in _imports(base, _modules())
