"""fp16 for ONNX Runtime's GPU providers.

fp16 keeps the engines' inputs and outputs fp32 (what the pipeline passes), blocks the ops ONNX Runtime's converter
knows to be unsafe, and keeps the VAE decoder fp32: SD VAEs overflow fp16 at large sizes (NaN or black images).
Every fp16 engine is then checked on inputs captured from the real pipeline; NaN/inf or a constant (black) output
fails the build, naming the component and what to do.
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.optimize.artifact.errors import BackendUnavailableError
from diffaccel.optimize.artifact.files import fresh_dir
from diffaccel.optimize.artifact.specs import tolerance
from diffaccel.optimize.export.onnx_export import onnx_files
from diffaccel.optimize.stages.base import ComponentOutcome, Stage, StageResult

FP32_COMPONENTS = {"vae_decoder": "SD VAE decoders overflow fp16 at large sizes (NaN/black images); kept fp32",
                   "vae_encoder": "only used by img2img; kept fp32 with the decoder"}


def convert_fp16(src: Path, dst: Path) -> list:
    """fp16 weights and compute, fp32 inputs/outputs. Returns the files written."""
    import onnx
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    model = _constants_to_initializers(onnx.load(str(src), load_external_data=True))
    # Resize stays fp32: its scales input must be float32 (the legacy exporter feeds it from a Constant)
    model = convert_float_to_float16(model, keep_io_types=True, disable_shape_infer=True,
                                     op_block_list=list(DEFAULT_OP_BLOCK_LIST) + ["Resize"])
    big = model.ByteSize() > 1_800_000_000
    onnx.save_model(model, str(dst), save_as_external_data=big, all_tensors_to_one_file=True,
                    location=dst.name + ".data")
    return onnx_files(dst)


def _constants_to_initializers(model):
    """Constant nodes become initializers, so the converter keeps those feeding fp32-only inputs in fp32."""
    from onnx import numpy_helper

    keep = []
    for node in model.graph.node:
        attr = {a.name: a for a in node.attribute}
        if node.op_type == "Constant" and "value" in attr and not node.domain:
            array = numpy_helper.to_array(attr["value"].t)
            model.graph.initializer.append(numpy_helper.from_array(array, node.output[0]))
        else:
            keep.append(node)
    del model.graph.node[:]
    model.graph.node.extend(keep)
    return model


def capture_validation_inputs(ctx, prompts: list, steps: int = 8) -> dict:
    """Realistic inputs: the denoiser's inputs early/middle/late in sampling, and final latents for the VAE
    decoder."""
    import torch

    from diffaccel.optimize.quant.calibration import calibration_size

    pipe = ctx.pipe
    h, w = calibration_size(ctx)
    steps_in = ctx.family.capture_denoiser_inputs(pipe, prompts, steps=steps, guidance_scale=ctx.config.guidance,
                                                  seed=0, height=h, width=w)
    shift = getattr(pipe.vae.config, "shift_factor", None) or 0.0     # SD3 / FLUX VAEs: decode(z / scale + shift)
    latents = []
    for i, p in enumerate(prompts):
        with torch.no_grad():
            out = pipe(p, num_inference_steps=steps, height=h, width=w, output_type="latent",
                       generator=torch.Generator().manual_seed(i)).images
        latents.append({"latent_sample": out / pipe.vae.config.scaling_factor + shift})
    return {ctx.denoiser: [steps_in[0], steps_in[len(steps_in) // 2], steps_in[-1]], "vae_decoder": latents}


class Fp16Stage(Stage):
    name = "fp16"

    @classmethod
    def preflight(cls, config):
        if config.provider == "cpu":
            raise BackendUnavailableError(
                "fp16 is built for ONNX Runtime's GPU providers; on the CPU provider use --precision fp32 or int8 "
                "(or --backend torch --precision bf16), or pass --provider cuda on an NVIDIA machine")

    def settings(self, ctx):
        return {"precision": "fp16", "fp32_components": sorted(FP32_COMPONENTS)}

    def run(self, ctx):
        import torch

        from diffaccel.optimize.sources.prompts import default_prompts

        result = StageResult()
        prompts = list(default_prompts(n=2))
        samples = capture_validation_inputs(ctx, prompts)
        for comp in ctx.components:
            if comp in FP32_COMPONENTS:
                result.add(comp, ComponentOutcome(facts={"decision": "fp32", "reason": FP32_COMPONENTS[comp]}))
                continue
            outcome = ComponentOutcome(model=f"{comp}/fp16/model.onnx", tolerance=tolerance("fp16"),
                                       facts={"decision": "fp16"})
            with ctx.timed(self.name, comp), fresh_dir(ctx.root / comp / "fp16") as d:
                written = convert_fp16(ctx.latest_model(comp, self.name), d / "model.onnx")
                if comp in samples:
                    torch.save(samples[comp], d / "validation_inputs.pt")
                    outcome.validation_inputs = f"{comp}/fp16/validation_inputs.pt"
                    written.append(d / "validation_inputs.pt")
            result.add(comp, outcome, [ctx.root / comp / "fp16" / p.name for p in written])
        return result
