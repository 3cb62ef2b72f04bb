"""Helpers shared by the test files (plain functions and tiny in-code models; the fixtures are in conftest.py).

Build settings the tests share, so that equal settings hit the session's artifact cache (``artifacts`` in conftest):
``FAST`` picks the legacy exporter where the exporter is not under test (15x faster on the tiny model), ``QUICK`` the
smallest calibration that still covers several denoising steps.
"""
from __future__ import annotations

import shutil

import torch

FAST = dict(exporter="torchscript")
QUICK = dict(calib_size=2, calib_steps=3)


def psnr(a, b) -> float:
    """PSNR in dB of two image arrays in [0, 1] (inf when equal)."""
    import numpy as np

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---- builds that start from a session artifact -----------------------------------------------------------------
def build_over(base, out, config, src="random:tiny", must_run=("quantize", "engine")):
    """``optimize(src, out, config)`` into a copy of the artifact ``base`` (built from ``src`` with the same export
    settings): the stages whose settings are unchanged (assets, export) are skipped, as when a user re-runs
    ``diffaccel optimize`` into an existing OUT, and the others run in full. Fails unless every stage in ``must_run``
    ran, so a test never checks a stale stage's files. Returns the manifest."""
    from diffaccel.optimize import optimize
    from diffaccel.optimize.stages.base import Reporter

    class Ran(Reporter):
        def __init__(self):
            self.ran = []

        def stage_end(self, name, seconds, skipped, reason="", **_):
            if not skipped:
                self.ran.append(name)

    shutil.copytree(base, out)
    rec = Ran()
    manifest = optimize(src, out, config, reporter=rec)
    assert set(must_run) <= set(rec.ran), (must_run, rec.ran)
    return manifest


# ---- the command line -----------------------------------------------------------------------------------------
def run_cli(capsys, *argv):
    """Run ``diffaccel ARGV...`` in this process: (exit code, stdout, stderr)."""
    from diffaccel.optimize.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *needles):
    """Bad input: exit code 2, one stderr line starting ``diffaccel: error:``, no traceback, each needle in it."""
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("diffaccel: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], (n, lines[0])


# ---- tiny stand-ins for learned metrics (never downloaded) ------------------------------------------------------
class FakeInception(torch.nn.Module):
    """Channel means and stds as 'features'; refuses to run without return_features=True, like the real file."""

    def forward(self, x, return_features: bool = False):
        if not return_features:
            raise RuntimeError("logits requested")
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1)


class FakeLpips(torch.nn.Module):
    def forward(self, x, y):
        return ((x - y) ** 2).mean(dim=(1, 2, 3)).reshape(-1, 1, 1, 1)


def save_fake_metric_models(folder):
    """TorchScript files of FakeInception and FakeLpips in ``folder``: (inception.pt, lpips.pt)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.jit.script(FakeInception()).save(str(folder / "inception.pt"))
    torch.jit.script(FakeLpips()).save(str(folder / "lpips.pt"))
    return folder / "inception.pt", folder / "lpips.pt"


def make_tiny_clip(folder):
    """A random tiny CLIP model + processor saved like a Hugging Face folder (offline)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from diffaccel.optimize.sources.tokenizer import word_tokenizer

    tok = word_tokenizer(max_length=16)
    small = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=1)
    cfg = CLIPConfig(text_config=dict(small, vocab_size=len(tok), max_position_embeddings=16,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                      pad_token_id=tok.pad_token_id),
                     vision_config=dict(small, image_size=32, patch_size=8), projection_dim=16)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(cfg).eval()
    model.save_pretrained(str(folder))
    ip = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=ip, tokenizer=tok).save_pretrained(str(folder))
    return folder
