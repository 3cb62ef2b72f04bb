"""The server serves SDXL artifacts through their own drop-in, with the images `diffaccel generate` makes, and
refuses classifier-free guidance on a U-Net built without it (a 4xx at acceptance, not a failed job)."""
import dataclasses

import numpy as np
import pytest

from .helpers import FAST
from .serve_helpers import png_pixels

SDXL = "random:tiny-xl"


@pytest.fixture(scope="module")
def xl_models(artifacts):
    from diffaccel.engines.serving.models import load_models

    return load_models([artifacts(SDXL, "onnxruntime", **FAST)], threads=1)


def _work(model, **kw):
    return {"model": model, "prompt": "a red circle", "negative_prompt": None, "n": 1, "height": 64, "width": 64,
            "steps": 2, "scheduler": "default", "guidance_scale": 5.0, "seed": 3, **kw}


def test_sdxl_artifact_is_served_by_its_drop_in_with_generates_pixels(xl_models):
    """A job without a negative prompt (or an empty one) gets the image of a plain call (negative_prompt=None:
    SDXL's zeroed unconditional half); one with a negative prompt does not share its engine call."""
    import torch

    from diffaccel.engines.serving.models import batch_key
    from diffaccel.engines.serving.worker import run_batch

    (name, model), = xl_models.items()
    assert type(model.pipe).__name__ == "AcceleratedStableDiffusionXLPipeline"
    assert model.pipe.config.force_zeros_for_empty_prompt
    (seed, png), = run_batch(xl_models, {}, [_work(name)])[0]
    alone = model.pipe("a red circle", num_inference_steps=2, guidance_scale=5.0, height=64, width=64,
                       generator=torch.Generator().manual_seed(seed), output_type="pil").images[0]
    assert np.array_equal(png_pixels(png), np.asarray(alone.convert("RGB")))
    with_empty = _work(name, negative_prompt="")
    assert batch_key(with_empty) == batch_key(_work(name))      # "" and None are the same request ...
    other = _work(name, negative_prompt="blurry")
    assert batch_key(other) != batch_key(_work(name))          # ... a real negative prompt is not


def test_guidance_off_model_refuses_cfg_requests_with_a_4xx(xl_models):
    from diffaccel.engines.serving.config import ServeConfig
    from diffaccel.engines.serving.models import RequestError, resolve
    from diffaccel.engines.serving.schemas import JobInput

    (name, model), = xl_models.items()
    turbo = {name: dataclasses.replace(model, default_guidance=0.0, max_guidance=0.0)}
    cfg = ServeConfig()
    assert resolve(JobInput(prompt="a red circle"), turbo, {}, cfg)["guidance_scale"] == 0.0
    with pytest.raises(RequestError, match="guidance_scale=5 needs classifier-free guidance.*allowed: 0-1") as e:
        resolve(JobInput(prompt="a red circle", guidance_scale=5), turbo, {}, cfg)
    assert e.value.status == 400 and e.value.param == "guidance_scale"
    assert resolve(JobInput(prompt="a red circle", guidance_scale=5), xl_models, {}, cfg)["guidance_scale"] == 5
