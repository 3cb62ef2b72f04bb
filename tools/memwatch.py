"""Run a command and report the peak resident memory of it and its children: sampled from outside every 0.2 s (the
whole process tree at once; the peak of all resident pages, and apart the peaks of anonymous pages and of
file-backed ones: weights memory-mapped from safetensors or ONNX external data are file-backed pages, which the
kernel can drop and re-read under pressure, where anonymous ones must fit), and the kernel's high-water mark of the largest single process (``ru_maxrss`` of the
waited children, what ``/usr/bin/time -v`` reports; ``optimize`` no longer resets it, see docs/memory.md).

    python tools/memwatch.py -- diffaccel optimize random:sd15 -o runs/sd15 --precision int8
"""
from __future__ import annotations

import resource
import subprocess
import sys
import time

import psutil


def main(argv: list) -> int:
    cmd = argv[argv.index("--") + 1:] if "--" in argv else argv
    proc = subprocess.Popen(cmd)
    root, peak, anon, filed, t0 = psutil.Process(proc.pid), 0, 0, 0, time.time()
    while proc.poll() is None:
        try:
            infos = [p.memory_info() for p in [root, *root.children(recursive=True)]]
        except psutil.Error:
            infos = []
        rss, shared = sum(i.rss for i in infos), sum(getattr(i, "shared", 0) for i in infos)
        peak, anon, filed = max(peak, rss), max(anon, rss - shared), max(filed, shared)
        time.sleep(0.2)
    largest = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    print(f"memwatch: exit {proc.returncode}, {time.time() - t0:.1f} s, peak RSS {peak / 1e9:.2f} GB "
          f"(process tree, sampled every 0.2 s: anonymous peak {anon / 1e9:.2f} GB, file-backed peak "
          f"{filed / 1e9:.2f} GB); largest process's high-water mark {largest / 1e9:.2f} GB",
          file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
