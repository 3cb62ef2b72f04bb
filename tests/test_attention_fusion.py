"""The ONNX Runtime engine fuses exported attention into com.microsoft.MultiHeadAttention (optimize/export/attention.py):
the same outputs, a CPU kernel that never holds the score matrix, and nothing fused that is not plain attention."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from diffaccel.optimize.export.attention import FX_KEY, fuse_attention  # noqa: E402


def _session(model, folder=None):
    so = ort.SessionOptions()
    if folder is not None:
        so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
    return ort.InferenceSession(model.SerializeToString() if hasattr(model, "SerializeToString") else str(model), so,
                                providers=["CPUExecutionProvider"])


def test_fused_unet_matches_the_exported_graph(tiny_ort):
    src = tiny_ort / "unet" / "export" / "model.onnx"
    plain = onnx.load(str(src), load_external_data=False)
    softmaxes = sum(n.op_type == "Softmax" for n in plain.graph.node)
    fused = onnx.load(str(src), load_external_data=False)
    assert fuse_attention(fused) == softmaxes > 0
    ops = [n.op_type for n in fused.graph.node]
    assert "Softmax" not in ops and ops.count("MultiHeadAttention") == softmaxes
    rng = np.random.default_rng(0)
    feeds = {"sample": rng.standard_normal((2, 4, 8, 8), dtype=np.float32), "timestep": np.array([10, 500], np.int64),
             "encoder_hidden_states": rng.standard_normal((2, 77, 32), dtype=np.float32)}
    sess = _session(fused, src.parent)
    feeds = {i.name: feeds[i.name].astype(np.float32 if "float" in i.type else np.int64)
             for i in sess.get_inputs()}
    want = _session(src).run(None, feeds)[0]
    got = sess.run(None, feeds)[0]
    assert np.abs(got - want).max() < 1e-4 * max(1.0, np.abs(want).max())


def test_engine_stage_fuses_on_the_cpu_and_records_it(tiny_ort):
    from diffaccel.optimize.artifact.manifest import Manifest

    m = Manifest.load(tiny_ort)
    unet = m.components["unet"]
    assert unet["fused_attention"] > 0 and unet["validation"]["passed"]
    engine = onnx.load(str(tiny_ort / unet["engine"]), load_external_data=False)
    assert sum(n.op_type == "MultiHeadAttention" for n in engine.graph.node) == unet["fused_attention"]
    assert m.stages["engine"]["config"]["fuse_attention"] is True


def _sdpa_model(kwargs: str = "{}", foreign: bool = False, heads: int = 2, head: int = 4):
    """A hand-made decomposition the way the dynamo exporter writes one, tagged with its FX call."""
    from onnx import TensorProto as T, helper as h, numpy_helper

    fx = ("%scaled_dot_product_attention : [num_users=1] = call_function[target=torch.ops.aten."
          f"scaled_dot_product_attention.default](args = (%q, %k, %v), kwargs = {kwargs})")
    s = numpy_helper.from_array(np.array(head ** -0.25, np.float32), "s")
    nodes = [h.make_node("Mul", ["q", "s"], ["qs"]), h.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
             h.make_node("Mul", ["kt", "s"], ["ks"]), h.make_node("MatMul", ["qs", "ks"], ["a"]),
             h.make_node("Softmax", ["a"], ["p"], axis=-1), h.make_node("MatMul", ["p", "v"], ["o"])]
    for n in nodes:
        n.metadata_props.add(key=FX_KEY, value=fx)
    if foreign:     # a node of another origin inside the attention (as int8 Q/DQ would be)
        nodes.insert(4, h.make_node("Identity", ["a"], ["a_id"]))
        nodes[5].input[0] = "a_id"
    io = [h.make_tensor_value_info(n, T.FLOAT, ["b", heads, "s", head]) for n in "qkv"]
    out = h.make_tensor_value_info("o", T.FLOAT, ["b", heads, "s", head])
    m = h.make_model(h.make_graph(nodes, "g", io, [out], initializer=[s]), opset_imports=[h.make_opsetid("", 18)])
    m.ir_version = 9
    return m


def test_plain_attention_is_fused_and_exact():
    m = _sdpa_model()
    rng = np.random.default_rng(1)
    feeds = {n: rng.standard_normal((2, 2, 5, 4), dtype=np.float32) for n in "qkv"}
    want = _session(m).run(None, feeds)[0]
    assert fuse_attention(m) == 1
    assert [n.op_type for n in m.graph.node].count("MultiHeadAttention") == 1
    assert not [t.name for t in m.graph.initializer if t.name == "s"]       # the decomposition's scale went too
    np.testing.assert_allclose(_session(m).run(None, feeds)[0], want, atol=1e-5)


@pytest.mark.parametrize("kwargs,foreign", [("{attn_mask: %mask}", False), ("{is_causal: True}", False),
                                            ("{dropout_p: 0.1}", False), ("{}", True)])
def test_anything_but_plain_attention_is_left_as_exported(kwargs, foreign):
    m = _sdpa_model(kwargs, foreign)
    before = [n.op_type for n in m.graph.node]
    assert fuse_attention(m) == 0
    assert [n.op_type for n in m.graph.node] == before


def test_a_custom_scale_is_kept():
    m = _sdpa_model("{scale: 0.125}")
    assert fuse_attention(m) == 1
    mha = next(n for n in m.graph.node if n.op_type == "MultiHeadAttention")
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in mha.attribute}
    assert attrs["num_heads"] == 2 and attrs["scale"] == pytest.approx(0.125)


def test_export_check_runs_the_opt_point_fused_and_the_other_as_exported(tiny_ort):
    import torch

    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.artifact.specs import ComponentSpec
    from diffaccel.optimize.stages.export import ExportCheck

    m = Manifest.load(tiny_ort)
    report = m.stages["export"]["components"]["unet"]["validation"]
    assert report["passed"] and report["fused_attention_at_opt"] == m.components["unet"]["fused_attention"]
    spec = ComponentSpec.from_dict("unet", m.components["unet"]["spec"])
    check = ExportCheck(tiny_ort / "unet" / "export" / "model.onnx", spec, None, fuse=True)
    gen = torch.Generator().manual_seed(0)
    alt = check(**spec.random_inputs(gen, **spec.alt_values()))
    assert not check._fused_engine
    opt = check(**spec.random_inputs(gen, **spec.opt_values()))
    assert check._fused_engine and check.fused > 0
    assert all(torch.isfinite(t).all() for t in [*alt.values(), *opt.values()])


@pytest.mark.slow
def test_microbench_times_the_engine_beside_its_unfused_export(tmp_path, capsys):
    """``diffaccel microbench --variants onnxruntime/fp32+unfused-attention,onnxruntime/fp32``: one build, its export
    run with attention as exported beside its fused engine; an isolated child also records its process's peak RSS."""
    import json

    from diffaccel.eval.harness import microbench

    from .helpers import assert_one_line_error, run_cli

    code, out, err = run_cli(capsys, "microbench", "random:tiny", "--variants",
                             "onnxruntime/fp32+unfused-attention,onnxruntime/fp32", "--height", 64, "--width", 64,
                             "--warmup", 0, "--repeat", 2, "--threads", 1, "--isolation", "interleaved",
                             "--work", tmp_path / "w", "--json", tmp_path / "r.json")
    assert code == 0, err
    rows = {r["variant"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    unfused, fused = rows["onnxruntime/fp32+unfused-attention"], rows["onnxruntime/fp32"]
    assert unfused["fused_attention"] == 0 < fused["fused_attention"]
    assert unfused["graph_nodes"] > fused["graph_nodes"]                 # the export, not the optimized engine
    assert all(len(r["samples"]) == 2 for r in (unfused, fused)) and "onnxruntime/fp32+unfused-attention" in out
    assert [p.name for p in (tmp_path / "w").iterdir()] == ["random_tiny-unet-onnxruntime-fp32"]   # one build
    cfg = microbench.StepBenchConfig(src="random:tiny", height=64, width=64, warmup=0, repeat=1, threads=1,
                                     work=str(tmp_path / "w"))
    assert microbench.main([json.dumps(dataclasses.asdict(cfg)), "onnxruntime/fp32+unfused-attention",
                            str(tmp_path / "child.json")]) == 0              # what each isolated process runs
    child = json.loads((tmp_path / "child.json").read_text())
    assert child["facts"]["peak_rss_gb"] > 0 and child["facts"]["fused_attention"] == 0
    code, _, err = run_cli(capsys, "microbench", "random:tiny", "--variants", "onnxruntime/int8+unfused-attention",
                           "--work", tmp_path / "w")
    assert_one_line_error(code, err, "+unfused-attention is for onnxruntime/fp32")


def test_isolated_microbench_table_names_each_process_peak():
    from diffaccel.eval.harness.microbench import format_table

    row = {"variant": "onnxruntime/fp32", "stats": {"median_of_medians": 0.01}, "pass_medians": [0.01],
           "pass_speedups": [1.0], "speedup_vs_first": 1.0, "peak_rss_gb": 1.25}
    result = {"config": {"isolation": "process", "passes": 1, "height": 64, "width": 64, "batch": 2, "warmup": 0,
                         "repeat": 1}, "source": {"spec": "random:tiny"}, "passes": [["onnxruntime/fp32"]],
              "rows": [row], "host": {"cpu": {"model": "x", "logical_cores": 2, "flags": []}}}
    assert format_table(result).splitlines()[-1] == "peak RSS of the first pass's process: onnxruntime/fp32 1.25 GB"


def test_keep_float_rules_apply_to_dynamo_exports(tiny_ort, tmp_path):
    """ORT's pre-processing drops the nodes' module paths; the rules are matched on the export and applied by node
    name (before, no keep-float rule ever matched a dynamo export)."""
    import onnx

    from diffaccel.optimize.families import sd
    from diffaccel.optimize.quant.ort_static import excluded_nodes, preprocess

    export = tiny_ort / "unet" / "export" / "model.onnx"
    if not export.is_file():
        pytest.skip("the artifact keeps no export")
    pre = preprocess(export, tmp_path / "pre.onnx", external=False)
    on_export = excluded_nodes(onnx.load(str(export), load_external_data=False), tuple(sd.KEEP_FLOAT))
    assert on_export and excluded_nodes(onnx.load(str(pre), load_external_data=False), tuple(sd.KEEP_FLOAT)) == []
    assert set(on_export) <= {n.name for n in onnx.load(str(pre), load_external_data=False).graph.node}
