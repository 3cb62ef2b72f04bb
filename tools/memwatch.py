"""Run a command and report the peak resident memory of it and its children, sampled from outside every 0.2 s.

``/usr/bin/time -v`` reads the kernel's high-water mark, which ``optimize`` resets at every stage to record per-stage
peaks (``/proc/self/clear_refs``), so it reports the last stage's peak only; this watcher does not depend on it.

    python tools/memwatch.py -- diffaccel optimize random:sd15 -o runs/sd15 --precision int8
"""
from __future__ import annotations

import subprocess
import sys
import time

import psutil


def main(argv: list) -> int:
    cmd = argv[argv.index("--") + 1:] if "--" in argv else argv
    proc = subprocess.Popen(cmd)
    root, peak, t0 = psutil.Process(proc.pid), 0, time.time()
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [root, *root.children(recursive=True)])
        except psutil.Error:
            rss = 0
        peak = max(peak, rss)
        time.sleep(0.2)
    print(f"memwatch: exit {proc.returncode}, {time.time() - t0:.1f} s, peak RSS {peak / 1e9:.2f} GB "
          f"(sampled every 0.2 s)", file=sys.stderr)
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
