"""PyTorch engines: the reference backend (eager, fp32 or bf16), running the same named signature as the exports.

The artifact stores each model with ``save_pretrained`` (safetensors); the engine wraps it with the export wrapper of its
model family (:mod:`diffaccel.optimize.families`), so inputs and outputs are named exactly as in the ONNX engines.
"""
from __future__ import annotations

from pathlib import Path

from diffaccel.optimize.families import family

_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _model_class(name: str):
    import diffusers
    import transformers

    return getattr(diffusers, name, None) or getattr(transformers, name)


class TorchEngine:
    def __init__(self, module, dtype: str = "float32", device: str = "cpu", compile: bool = False):
        import torch

        self.dtype = getattr(torch, dtype)
        self._device = torch.device(device)
        self.module = module.to(self._device, self.dtype).eval()
        self.fn = torch.compile(self.module) if compile else self.module
        params = dict(__import__("inspect").signature(self.module.forward).parameters)
        self.input_names = tuple(params)
        # inputs a family's wrapper takes only for some models (an LCM U-Net's timestep_cond): None when not given
        self._optional = {n for n, p in params.items() if p.default is None}
        self.output_names = ()

    @property
    def device(self):
        return self._device

    def __call__(self, **inputs) -> dict:
        import torch

        args = []
        for name in self.input_names:
            if inputs.get(name) is None and name in self._optional:
                args.append(None)
                continue
            t = inputs[name].to(self._device)
            args.append(t.to(self.dtype) if t.is_floating_point() else t)
        with torch.inference_mode():
            out = self.fn(*args)
        out = out if isinstance(out, tuple) else (out,)
        names = self.output_names or tuple(f"output_{i}" for i in range(len(out)))
        return {n: o.float() for n, o in zip(names, out)}


def load(root, component: str, entry: dict, device: str = "cpu", compile: bool = False, **_ignored) -> TorchEngine:
    cls = _model_class(entry["model_class"])
    model = cls.from_pretrained(str(Path(root) / entry["engine"]))
    fam = family(entry.get("family", "sd"))
    engine = TorchEngine(fam.export_module(component, {fam.SOURCE_MODEL[component]: model}),
                         _DTYPES[entry.get("precision", "fp32")], device, compile)
    engine.output_names = tuple(t["name"] for t in entry["spec"]["outputs"])
    return engine
