"""SmoothQuant-style activation/weight balancing on an ONNX graph (Xiao et al., 2023).

For every LayerNormalization whose output feeds only MatMuls with constant weights (the q/k/v and feed-forward
projections of a transformer block), per-channel scales ``s = max|X|^a / max|W|^(1-a)`` move activation outliers
into the weights: LayerNorm's gamma and beta are divided by ``s`` and the weights' input rows multiplied by it. The
float model computes the same function; int8 then has an easier activation range to cover.
"""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _smoothable(model) -> list:
    """(layernorm node, [consumer MatMul nodes]) pairs whose scale can be folded (Shape consumers read no values)."""
    inits = {i.name for i in model.graph.initializer}
    consumers: dict = {}
    for n in model.graph.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    pairs = []
    for n in model.graph.node:
        if n.op_type != "LayerNormalization" or len(n.input) < 3 or n.input[1] not in inits or n.input[2] not in inits:
            continue
        users = [(u, i) for u, i in consumers.get(n.output[0], []) if u.op_type not in ("Shape", "Size")]
        if users and all(u.op_type == "MatMul" and i == 0 and u.input[1] in inits for u, i in users):
            pairs.append((n, [u for u, _ in users]))
    return pairs


def _activation_absmax(model_path: Path, tensors: list, samples: list) -> dict:
    """Per-channel (last axis) max |x| of ``tensors`` over the calibration samples, via ONNX Runtime."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(model_path), load_external_data=False)
    known = {o.name for o in model.graph.output}
    for t in tensors:
        if t not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None))
    tmp = model_path.with_name(model_path.stem + ".stats.onnx")
    onnx.save_model(model, str(tmp))    # external data (if any) stays where it is, next to the model
    try:
        sess = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        stats = {t: None for t in tensors}
        for s in samples:
            outs = sess.run(tensors, {k: v.numpy() for k, v in s.items()})
            for t, o in zip(tensors, outs):
                m = np.abs(o).reshape(-1, o.shape[-1]).max(axis=0)
                stats[t] = m if stats[t] is None else np.maximum(stats[t], m)
    finally:
        tmp.unlink(missing_ok=True)
    return stats


def smooth(src: Path, dst: Path, samples: list, alpha: float, *, external: bool) -> dict:
    """Write the balanced model to ``dst``; returns what was changed (for the manifest)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(src), load_external_data=True)
    pairs = _smoothable(model)
    stats = _activation_absmax(src, [ln.output[0] for ln, _ in pairs], samples)
    inits = {i.name: i for i in model.graph.initializer}
    arrays = {name: numpy_helper.to_array(t) for name, t in inits.items()}

    def rewire(node, slot: int, array) -> None:
        """Give ``node`` its own copy of the initializer (exporters deduplicate equal tensors, e.g. LayerNorm
        gammas of 1, so changing a shared one in place would change other layers too)."""
        name = f"{node.input[slot]}__smooth_{node.name}_{slot}"
        model.graph.initializer.append(numpy_helper.from_array(array.astype(np.float32), name))
        node.input[slot] = name

    for ln, mms in pairs:
        act = np.maximum(stats[ln.output[0]], 1e-5)
        weights = [arrays[m.input[1]] for m in mms]
        w = np.maximum(np.max([np.abs(x).max(axis=1) for x in weights], axis=0), 1e-5)
        s = np.clip(act ** alpha / w ** (1.0 - alpha), 1e-2, 1e2)
        rewire(ln, 1, arrays[ln.input[1]] / s)
        rewire(ln, 2, arrays[ln.input[2]] / s)
        for m, x in zip(mms, weights):
            rewire(m, 1, x * s[:, None])
    used = {i for n in model.graph.node for i in n.input}
    kept = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept)
    onnx.save_model(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
    log.info("smoothquant alpha=%.2f balanced %d layer norms", alpha, len(pairs))
    return {"alpha": alpha, "balanced_layernorms": len(pairs),
            "balanced_matmuls": sum(len(m) for _, m in pairs)}
