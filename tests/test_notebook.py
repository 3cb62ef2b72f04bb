"""notebooks/quickstart.ipynb runs top to bottom (optimize -> generate -> evaluate -> report) with its outputs checked.

It executes in a temporary working directory with a kernel on this interpreter, so nothing lands in the repository
and the committed notebook stays without outputs."""
import json
import sys
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "quickstart.ipynb"


def _kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec on this interpreter (not whatever 'python3' means on this machine)."""
    spec = tmp_path / "jupyter" / "kernels" / "diffaccel-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "diffaccel test", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return "diffaccel-test"


def _text(cell) -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream")


def _images(cell) -> int:
    return sum("image/png" in o.get("data", {}) for o in cell.outputs)


@pytest.mark.slow
def test_quickstart_notebook(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    nb = nbformat.read(str(NOTEBOOK), as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), "commit the notebook without outputs"
    assert 'SOURCE = "' in code[0].source

    work = tmp_path / "run"
    work.mkdir()
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name=_kernel(tmp_path, monkeypatch),
                                     resources={"metadata": {"path": str(work)}})
    client.execute()

    cells = {c.get("id"): c for c in nb.cells}
    assert "onnxruntime fp32" in _text(cells["optimize"])
    assert _images(cells["generate"]) == 1
    summary = _text(cells["evaluate"])
    for row in ("torch-fp32 (baseline)", "torch-bf16", "onnxruntime-fp32", "U-Net p50 ms", "PSNR dB"):
        assert row in summary, (row, summary)
    assert _images(cells["report"]) == 2 and "report.html" in _text(cells["report"])

    report = json.loads((work / "quickstart-work" / "report" / "report.json").read_text())
    assert {"schema_version", "config", "host", "metrics", "variants"} <= set(report)
    assert [(v["name"], v["status"]) for v in report["variants"]] == [
        ("torch-fp32", "ok"), ("torch-bf16", "ok"), ("onnxruntime-fp32", "ok")]
    assert report["variants"][2]["quality"]["aggregate"]["psnr"] > 40
    assert not (NOTEBOOK.parent / "quickstart-work").exists()
