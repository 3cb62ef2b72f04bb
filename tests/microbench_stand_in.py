"""A stand-in microbench child for tests/test_openvino_peer.py: ``python -m tests.microbench_stand_in CONFIG VARIANT
OUT [--build-only]`` writes a record without loading any model (a ``peer/*`` variant answers "skipped"; the n-th
timed run of a variant gives n x its base latency, counted in files under $STAND_IN_DIR)."""
import json
import os
import sys
from pathlib import Path


def main(argv) -> None:
    _config, name, out, *flags = argv
    if name.startswith("peer/"):
        record = {"variant": name, "skipped": "not installed here"}
    elif flags:
        record = {"variant": name, "setup_seconds": 0.5}
    else:                                  # pass n times the variant at n x its base latency
        runs = Path(os.environ["STAND_IN_DIR"], name.replace("/", "_"))
        n = int(runs.read_text()) + 1 if runs.is_file() else 1
        runs.write_text(str(n))
        base = {"slow/fp32": 0.04, "fast/int8": 0.01}[name]
        record = {"variant": name, "setup_seconds": 0.1, "samples": [base * n] * 3, "facts": {"own_pid": os.getpid()}}
    Path(out).write_text(json.dumps(record))


if __name__ == "__main__":
    main(sys.argv[1:])
