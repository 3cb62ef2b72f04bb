"""The wheel holds every module of the three folders (and the shipped model); imports stay lazy."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"optimize": "diffaccel/optimize", "engines": "diffaccel/engines", "eval": "diffaccel/eval"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                    str(ROOT)], check=True, capture_output=True)
    return next(out.glob("diffaccel-*.whl"))


def test_wheel_contains_every_module(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"{pkg}/{p.relative_to(ROOT / folder).as_posix()}"
                for folder, pkg in FOLDERS.items() for p in (ROOT / folder).rglob("*.py")}
    assert expected and expected <= names, sorted(expected - names)
    assert not any(n.startswith(("eval/", "optimize/", "engines/", "tests/")) for n in names)


def test_wheel_contains_the_shipped_model(wheel):
    assets = ROOT / "optimize" / "assets"
    shipped = {f"diffaccel/optimize/assets/{p.relative_to(assets).as_posix()}" for p in assets.rglob("*")
               if p.is_file()}
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "diffaccel/optimize/assets/tinyshapes/model_index.json" in shipped
    assert shipped <= names, sorted(shipped - names)


def test_console_script_declared(wheel):
    z = zipfile.ZipFile(wheel)
    entry = next(n for n in z.namelist() if n.endswith("entry_points.txt"))
    assert "diffaccel = diffaccel.optimize.cli:main" in z.read(entry).decode()


def test_importing_engines_needs_no_backend():
    code = ("import sys, diffaccel.engines, diffaccel.optimize, diffaccel.eval; "
            "from diffaccel.engines import BACKENDS; "
            "print(sorted(m for m in ('onnxruntime', 'tensorrt', 'modelopt') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
