"""The size budget (docs/development.md, "Size budget"): every module of the three packages is at most
``MODULE_LINES`` lines long, and every function in them (methods and nested functions included, counted from its
``def`` line to its last line) at most ``FUNCTION_LINES``. A unit that outgrows it fails here, named with its size,
so growth is a decision (split it along a seam) rather than a drift."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("optimize", "engines", "eval")
MODULE_LINES = 300
FUNCTION_LINES = 50


def over_budget(source: str, name: str) -> list:
    """What in one module's ``source`` is over the budget, one line each, named ``name`` (the module's path) or
    ``name:LINE qualified.name()``, with its size and the budget."""
    out = []
    lines = len(source.splitlines())
    if lines > MODULE_LINES:
        out.append(f"{name}: {lines} lines (budget {MODULE_LINES})")

    def visit(node, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = child.end_lineno - child.lineno + 1
                if size > FUNCTION_LINES:
                    out.append(f"{name}:{child.lineno} {prefix}{child.name}(): {size} lines "
                               f"(budget {FUNCTION_LINES})")
                visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                visit(child, f"{prefix}{child.name}.")
            else:
                visit(child, prefix)

    visit(ast.parse(source), "")
    return out


def _modules() -> list:
    return sorted(p for top in PACKAGES for p in (ROOT / top).rglob("*.py"))


def test_every_module_and_function_keeps_the_budget():
    offenders = [o for p in _modules()
                 for o in over_budget(p.read_text(encoding="utf-8"), p.relative_to(ROOT).as_posix())]
    assert not offenders, ("over the size budget; split along a seam (docs/development.md, \"Size budget\") "
                           "rather than raise it:\n" + "\n".join(offenders))


def test_the_check_reads_every_package():
    names = {p.relative_to(ROOT).as_posix() for p in _modules()}
    assert {"optimize/families/sd.py", "engines/pipelines/base.py", "eval/cli/bench.py"} <= names
    assert len(names) > 100


def test_the_check_names_each_offender_with_its_size():
    def function(name: str, body_lines: int, indent: str = "") -> str:
        return f"{indent}def {name}():\n" + "".join(f"{indent}    x = {i}\n" for i in range(body_lines - 1))

    source = ("import os\n\n\n" + function("fits", FUNCTION_LINES) + "\n\n"
              + "class Big:\n" + "    @staticmethod\n" + function("method", FUNCTION_LINES + 1, "    ") + "\n\n"
              + "def outer():\n" + function("inner", FUNCTION_LINES + 2, "    ") + "    return inner\n")
    assert over_budget(source, "pkg/mod.py") == [
        f"pkg/mod.py:{source.splitlines().index('    def method():') + 1} Big.method(): {FUNCTION_LINES + 1} lines "
        f"(budget {FUNCTION_LINES})",
        f"pkg/mod.py:{source.splitlines().index('def outer():') + 1} outer(): {FUNCTION_LINES + 4} lines "
        f"(budget {FUNCTION_LINES})",
        f"pkg/mod.py:{source.splitlines().index('    def inner():') + 1} outer.inner(): {FUNCTION_LINES + 2} lines "
        f"(budget {FUNCTION_LINES})",
    ]
    long_module = "\n".join(f"x{i} = {i}" for i in range(MODULE_LINES + 1)) + "\n"
    assert over_budget(long_module, "pkg/long.py") == [f"pkg/long.py: {MODULE_LINES + 1} lines (budget {MODULE_LINES})"]
    assert over_budget(long_module.split("\n", 1)[1], "pkg/fits.py") == []
