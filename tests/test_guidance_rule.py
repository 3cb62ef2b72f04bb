"""One guidance rule (#26): a build records the guidance it deploys (a trained built-in's recommended one: 2 for
tinyshapes; else the family's diffusers pipeline default), and every command defaults to it: generate, eval, bench,
microbench (its builds), serve and demo all run one tinyshapes artifact at the same guidance. Before, eval and bench
ran a tinyshapes artifact at 7.5 while generate and serve ran it at 2."""
import json

import pytest

from .helpers import FAST, run_cli

WANT = 2.0                                      # tinyshapes' recommended guidance (docs/tinyshapes.md)


@pytest.fixture(scope="module")
def shapes(artifacts):
    return artifacts("tinyshapes", "onnxruntime", **FAST)


@pytest.mark.slow
def test_every_command_runs_one_artifact_at_its_built_guidance(shapes, tmp_path, capsys):
    from diffaccel.optimize.artifact.manifest import Manifest

    assert Manifest.load(shapes).built_guidance == WANT
    used = {}

    code, out, err = run_cli(capsys, "generate", shapes, "a red circle", "--steps", 2, "-o", tmp_path / "g.png")
    assert code == 0, err
    used["generate"] = float(out.split("(guidance ")[1].split(")")[0])

    code, _, err = run_cli(capsys, "eval", shapes, "-o", tmp_path / "eval", "--steps", 2, "--seeds", 0,
                           "--batch-sizes", 1, "--repeat", 1, "--warmup", 0, "--peers", "", "--prompts",
                           _prompts(tmp_path))
    assert code == 0, err
    used["eval"] = json.loads((tmp_path / "eval" / "report.json").read_text())["config"]["guidance_scale"]

    code, _, err = run_cli(capsys, "bench", shapes, "-o", tmp_path / "bench", "--requests", 3, "--steps", 2,
                           "--rate", "50", "--calib-repeats", 1)
    assert code == 0, err
    used["bench"] = json.loads((tmp_path / "bench" / "bench.json").read_text())["config"]["guidance"]

    from diffaccel.eval.harness.microbench import StepBenchConfig, run_step_bench

    run_step_bench(StepBenchConfig(src="tinyshapes", variants=("onnxruntime/fp32@torchscript",), height=64, width=64,
                                   warmup=0, repeat=1, isolation="interleaved", work=str(tmp_path / "mb")))
    (built,) = (tmp_path / "mb").iterdir()
    used["microbench"] = Manifest.load(built).built_guidance

    from diffaccel.engines.serving.models import load_models, resolve
    from diffaccel.engines.serving.schemas import JobInput
    from diffaccel.engines.serving.config import ServeConfig

    models = load_models([shapes])
    used["serve"] = resolve(JobInput(prompt="a red circle"), models, {}, ServeConfig())["guidance_scale"]

    from diffaccel.eval.cli.demo import demo_configs
    from diffaccel.optimize.api import default_guidance
    from diffaccel.optimize.cli import build_parser
    from diffaccel.optimize.families import detect
    from diffaccel.optimize.sources import resolve_source

    configs, eval_cfg = demo_configs(build_parser().parse_args(["demo"]))
    source = resolve_source("tinyshapes")
    rule = default_guidance(source, detect(source.configs(), "tinyshapes"))
    assert eval_cfg.guidance_scale is None            # the demo evaluates at what it built, which the rule decides
    used["demo"] = {c.resolved(rule).guidance for c in configs.values()}.pop()

    assert used == dict.fromkeys(used, WANT), used


def _prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a small red circle at the top left on a navy background\n")
    return path


def test_the_rule_is_the_built_ins_or_the_pipelines_default():
    from diffaccel.optimize.api import OptimizeConfig, default_guidance
    from diffaccel.optimize.families import detect
    from diffaccel.optimize.sources import resolve_source

    want = {"tinyshapes": 2.0, "tinyshapes-xl": 3.0, "tinyshapes-sd3": 3.0, "random:tiny": 7.5, "random:tiny-xl": 5.0,
            "random:tiny-sd3": 7.0, "random:tiny-flux": 3.5}
    for name, scale in want.items():
        source = resolve_source(name)
        assert default_guidance(source, detect(source.configs(), name)) == scale, name
    assert OptimizeConfig().guidance is None and OptimizeConfig(guidance=4).resolved(2.0).guidance == 4.0
    assert OptimizeConfig().resolved(2.0).quant.guidance_scale == 2.0      # int8 calibrates at what is deployed
