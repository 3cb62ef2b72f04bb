"""Drop-in diffusers pipelines per model family (:mod:`.sd`, :mod:`.sdxl`) and their engine-backed shims.

:func:`pipeline_class` picks the drop-in class an artifact needs from the family its manifest records, so tools
load any artifact the same way:

>>> pipeline_class("out/sdxl").__name__                                      # doctest: +SKIP
'AcceleratedStableDiffusionXLPipeline'
>>> pipeline_class("out/sdxl", "image-to-image").from_pretrained("out/sdxl")  # doctest: +SKIP
"""
from __future__ import annotations

TASKS = ("text-to-image", "image-to-image", "inpainting")   # the order of each family's DROP_INS


def pipeline_class(artifact, task: str = "text-to-image"):
    """The drop-in pipeline class for ``artifact`` (a directory made by ``diffaccel optimize``) and ``task``."""
    import importlib

    from diffaccel.optimize.artifact.manifest import Manifest
    from diffaccel.optimize.families import family

    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of: {', '.join(TASKS)}")
    fam = family(Manifest.load(artifact).get("pipeline", {}).get("family", "sd"))
    drop_ins = tuple(fam.DROP_INS) + (None,) * (len(TASKS) - len(fam.DROP_INS))
    drop_in = drop_ins[TASKS.index(task)]
    if drop_in is None:
        served = [t for t, d in zip(TASKS, drop_ins) if d]
        raise ValueError(f"{artifact} holds a {fam.TITLE}, which serves {', '.join(served)} only, not {task}")
    module, _, name = drop_in.partition(":")
    return getattr(importlib.import_module(module), name)
