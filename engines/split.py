"""A ``--step-cache`` artifact's U-Net: three graphs (``head``, ``deep``, ``tail``; the split is
:mod:`diffaccel.optimize.families.unet_split`'s) behind the engine protocol. Called like any engine it runs the whole
step, head -> deep -> tail, which equals the unsplit U-Net; the drop-ins' step cache
(:mod:`diffaccel.engines.pipelines.cache`) calls :meth:`SplitEngine.shallow` on cached steps: head -> tail with the
stored ``feature``, the deep graph skipped. Each part runs in batch chunks its engine serves.
"""
from __future__ import annotations

from diffaccel.optimize.artifact.errors import ArtifactError
from diffaccel.optimize.artifact.specs import ComponentSpec


class SplitEngine:
    """The U-Net's step over its three part engines (``parts``: part -> (engine, spec)); ``record``: the manifest's
    ``step_cache`` (method, branch, graph names)."""

    def __init__(self, parts: dict, spec: ComponentSpec, record: dict):
        self.parts, self.spec, self.record = parts, spec, record
        self.input_names = tuple(t.name for t in spec.inputs)
        self.output_names = tuple(t.name for t in spec.outputs)
        self.calls = {p: 0 for p in parts}      # runs of each part (what the tests and benchmarks count)

    @classmethod
    def from_components(cls, root, components: dict, record: dict, spec: ComponentSpec, load_engine,
                        **options) -> "SplitEngine":
        """Load the parts named in ``record["graphs"]`` from the manifest's ``components`` with ``load_engine``
        (:func:`diffaccel.engines.base.load_engine`, which loads a split entry through :func:`load`)."""
        missing = [c for c in record["graphs"].values() if c not in components]
        if missing:
            raise ArtifactError(f"{root} has no engine for {', '.join(missing)} (the split U-Net's parts); rebuild "
                                "with diffaccel optimize --step-cache")
        if options.get("spin") is None:     # ONNX Runtime's threads spin after a run by default: the next part's
            options["spin"] = False         # session then waits for cores (a tinyshapes step: 43 ms spinning, 8 not)
        parts = {}
        for part, name in record["graphs"].items():
            entry = components[name]
            parts[part] = (load_engine(entry["backend"], root, name, entry, **options),
                           ComponentSpec.from_dict(name, entry["spec"]))
        return cls(parts, spec, record)

    @property
    def branch(self) -> int:
        return int(self.record["branch"])

    @property
    def device(self):
        return self.parts["head"][0].device

    def run(self, part: str, available: dict) -> dict:
        """One part on the tensors it takes out of ``available`` (in batch chunks its spec serves)."""
        from diffaccel.engines.pipelines.shims import run_chunked

        engine, spec = self.parts[part]
        self.calls[part] += 1
        return run_chunked(engine, spec, {t.name: available[t.name] for t in spec.inputs})

    def full(self, inputs: dict) -> tuple:
        """(outputs, feature): the whole step, and the deep part's output a cache keeps."""
        head = self.run("head", inputs)
        feature = self.run("deep", {**inputs, **head})["feature"]
        return self.run("tail", {**inputs, **head, "feature": feature}), feature

    def shallow(self, inputs: dict, feature) -> dict:
        """A cached step: head -> tail with ``feature`` from an earlier full step (the deep graph is not run)."""
        return self.run("tail", {**inputs, **self.run("head", inputs), "feature": feature})

    def __call__(self, **inputs) -> dict:
        return self.full(inputs)[0]


def load(root, component: str, entry: dict, load_engine, **options) -> SplitEngine:
    """The engine of a split U-Net's manifest ``entry`` (its ``step_cache`` record names the parts)."""
    from diffaccel.optimize.artifact.manifest import Manifest

    return SplitEngine.from_components(root, Manifest.load(root).components, entry["step_cache"],
                                       ComponentSpec.from_dict(component, entry["spec"]), load_engine, **options)
