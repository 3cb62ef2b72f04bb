"""Peak RSS of the calibration step alone (write_range_cache, min-max) on an exported U-Net at 512x512, batch 2, for N
samples: run one process per N, e.g. `for n in 2 8 32; do python tools/calib_memory.py $n OUT/unet/export/model.onnx; done`
(SD 1.5-shaped inputs: 4 latent channels, 77 x 768 text states)."""
import resource, sys, time, tempfile
from pathlib import Path
import torch
from diffaccel.optimize.quant.calibration import write_range_cache
from diffaccel.optimize.quant.ort_static import QUANT_OPS
n = int(sys.argv[1]); src = Path(sys.argv[2])
g = torch.Generator().manual_seed(0)
samples = [{"sample": torch.randn(2, 4, 64, 64, generator=g), "timestep": torch.full((2,), 999.0 - 100 * i),
            "encoder_hidden_states": torch.randn(2, 77, 768, generator=g)} for i in range(n)]
t = time.perf_counter()
with tempfile.TemporaryDirectory() as d:
    write_range_cache(src, samples, QUANT_OPS, Path(d) / "ranges", external=True)
print(f"{n} samples: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB, {time.perf_counter() - t:.0f} s", flush=True)
