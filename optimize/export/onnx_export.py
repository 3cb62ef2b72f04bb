"""Export one component to ONNX from its :class:`~diffaccel.optimize.artifact.specs.ComponentSpec`.

Two exporters are offered. ``dynamo`` (``torch.onnx.export(dynamo=True)``, the default) gives the cleaner graph: on
the SD 1.5 U-Net (256x256, batch 2, torch 2.13, onnxruntime 1.32) it emitted 1887 nodes against the legacy tracer's
4493 (1807 vs 2352 after ORT's optimizations) and ran 4% faster in ONNX Runtime (1962 vs 2043 ms per step); both
wrote one external-data file. ``torchscript`` (the legacy tracer) exports faster (40 s vs 70 s) and is kept for
models the dynamo exporter cannot trace. Reproduce: ``diffaccel microbench random:sd15 --variants
onnxruntime/fp32,onnxruntime/fp32@torchscript``.

Weights stay inside ``model.onnx`` below 2 GB; above, they go to one ``model.onnx.data`` file beside it.
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from pathlib import Path

from diffaccel.optimize.config import Exporter
from diffaccel.optimize.artifact.errors import DiffaccelError, one_line
from diffaccel.optimize.artifact.files import TMP_PREFIX

EXTERNAL_DATA_THRESHOLD = 1_800_000_000  # bytes of weights above which we store them in one external file
DATA_SUFFIX = ".data"


def param_bytes(module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters()) + sum(
        b.numel() * b.element_size() for b in module.buffers())


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporters' progress prints and warnings for the duration of one export (restored after)."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, lvl in zip(loggers, levels):
            lg.setLevel(lvl)


def export_onnx(spec, module, dst: Path, *, exporter: Exporter = Exporter.DYNAMO, opset: int = 18,
                seed: int = 0) -> list[Path]:
    """Export ``module`` (whose forward takes the spec's inputs by name) to ``dst`` (a .onnx path).

    Returns the files written (the model, plus its external-data file for large models).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    example = spec.random_inputs(gen, **spec.export_values())
    args = tuple(example[t.name] for t in spec.inputs)
    external = param_bytes(module) > EXTERNAL_DATA_THRESHOLD
    names = dict(input_names=[t.name for t in spec.inputs], output_names=[t.name for t in spec.outputs])
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dst.parent, prefix=TMP_PREFIX + "export-") as tmp:
        raw = Path(tmp) / "model.onnx"
        try:
            with torch.no_grad(), _quiet_exporter():
                if exporter == Exporter.DYNAMO:
                    prog = torch.onnx.export(module, args, None, dynamo=True, opset_version=opset, verbose=False,
                                             dynamic_shapes=spec.dynamic_shapes(), optimize=True, **names)
                    prog.save(str(raw), external_data=external)
                else:
                    torch.onnx.export(module, args, str(raw), dynamo=False, opset_version=opset,
                                      dynamic_axes=spec.dynamic_axes(), do_constant_folding=True, **names)
        except Exception as e:
            other = "torchscript" if exporter == Exporter.DYNAMO else "dynamo"
            raise DiffaccelError(f"exporting {spec.name} with the {exporter} exporter failed ({one_line(e)[:200]}); "
                                 f"try --exporter {other} or another --opset") from e
        finally:
            _drop_rewriter_state()
        return _finalize(raw, dst, external)


def _drop_rewriter_state() -> None:
    """Forget the graph onnxscript's rewrite rules matched last. The rules are module-level objects whose matchers
    keep the last graph they saw, and with it the exported model's initializers: the torch weights (SD 1.5's U-Net,
    3.4 GB, stayed alive after its export, through every later stage; onnxscript 0.7)."""
    import gc

    try:
        from onnxscript.rewriter import _matcher
    except ImportError:        # another onnxscript layout: nothing we know to clear
        return
    for obj in gc.get_objects():
        if isinstance(obj, _matcher.PatternMatcher):
            for attr in ("_graph", "_current_node", "_match"):
                if getattr(obj, attr, None) is not None:
                    setattr(obj, attr, None)


def _finalize(raw: Path, dst: Path, external: bool) -> list[Path]:
    """Move the exported model into place, gathering loose weight files into one external-data file."""
    import onnx

    data_name = dst.name + DATA_SUFFIX
    for p in (dst, dst.with_name(data_name)):
        p.unlink(missing_ok=True)
    if not external:
        model = onnx.load(str(raw))  # pulls in any external tensors, then saves self-contained
        onnx.save_model(model, str(dst))
        return [dst]
    gather_external_data(raw, dst)
    return [dst, dst.with_name(data_name)]


ALIGNMENT = 4096          # external tensors start on page boundaries (ONNX Runtime can map them)
_CHUNK = 64 << 20


def gather_external_data(src: Path, dst: Path) -> None:
    """Write ``src``'s graph to ``dst`` with every external tensor copied, in graph order, into one file
    ``dst.name + ".data"``, streaming (one 64 MB chunk in memory at a time, never the weights: loading a 3.4 GB
    U-Net to re-save it cost 2 copies of its weights at the export stage's peak)."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(src), load_external_data=False)
    data_path = dst.with_name(dst.name + DATA_SUFFIX)
    offset, files = 0, {}
    try:
        with open(data_path, "wb") as out:
            for t in _get_all_tensors(model):
                if t.data_location != onnx.TensorProto.EXTERNAL:
                    continue
                info = {e.key: e.value for e in t.external_data}
                path = src.parent / info["location"]
                f = files.get(path) or files.setdefault(path, open(path, "rb"))
                start = int(info.get("offset", 0))
                length = int(info["length"]) if "length" in info else path.stat().st_size - start
                pad = -offset % ALIGNMENT
                out.write(b"\0" * pad)
                offset += pad
                f.seek(start)
                left = length
                while left:
                    chunk = f.read(min(left, _CHUNK))
                    if not chunk:
                        raise DiffaccelError(f"{path} ends before tensor {t.name}'s data; re-run the export")
                    out.write(chunk)
                    left -= len(chunk)
                del t.external_data[:]
                for k, v in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                    e = t.external_data.add()
                    e.key, e.value = k, v
                offset += length
    finally:
        for f in files.values():
            f.close()
    onnx.save_model(model, str(dst))


def onnx_files(model_path: Path) -> list[Path]:
    """The model file plus the external-data file(s) it references."""
    import onnx
    from onnx.external_data_helper import _get_all_tensors

    model = onnx.load(str(model_path), load_external_data=False)
    locations = {e.value for t in _get_all_tensors(model) if t.data_location == onnx.TensorProto.EXTERNAL
                 for e in t.external_data if e.key == "location"}
    return [model_path] + [model_path.parent / loc for loc in sorted(locations)]
