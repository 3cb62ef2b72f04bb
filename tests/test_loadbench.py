"""The serving loop: with a fake engine (threads, real clock, fast) and a short real run on random:tiny."""
import json
import threading
import time

import numpy as np
import pytest
from PIL import Image

from diffaccel.eval.loadbench.batching import Request
from diffaccel.eval.loadbench.runner import LoadBench, SweepConfig
from diffaccel.eval.loadbench.loop import LoadConfig, poisson_arrivals, serve
from diffaccel.optimize.artifact.errors import ShapeError

from .helpers import assert_one_line_error, run_cli


def _fake_engine(seconds_per_batch=0.005, log=None):
    lock = threading.Lock()

    def run_batch(batch):
        with lock:                               # a second concurrent call would be a bug in the loop
            if log is not None:
                log.append([r.id for r in batch])
            time.sleep(seconds_per_batch)
            return [Image.new("RGB", (8, 8), (r.id % 256, 0, 0)) for r in batch]
    return run_batch


def _assert_accounting(run, requested=None):
    reqs, batches = run["requests"], run["batches"]
    served = [r for r in reqs if r["done"] is not None]
    if requested is not None:
        assert len(reqs) == requested
    assert sorted(r["id"] for r in reqs) == sorted({r["id"] for r in reqs})        # no request twice
    assert all(r["images_received"] == 1 for r in served)                         # one image each
    assert all(r["images_received"] == 0 for r in reqs if r["done"] is None)
    assert sum(b["size"] for b in batches) == len(served)
    for r in served:
        assert r["arrival"] <= r["dispatch"] <= r["done"]
        assert r["latency"] == pytest.approx(r["wait"] + r["service"], abs=1e-9)
        b = batches[[x["id"] for x in batches].index(r["batch_id"])]
        assert (r["dispatch"], r["done"], r["batch_size"]) == (b["start"], b["end"], b["size"])
    for a, b in zip(batches, batches[1:]):                                       # one worker: no overlap
        assert a["end"] <= b["start"] and a["id"] + 1 == b["id"]
    by_batch = {}
    for r in sorted(served, key=lambda r: r["arrival"]):
        by_batch.setdefault(r["batch_id"], []).append(r["id"])
    order = [i for b in sorted(by_batch) for i in by_batch[b]]
    assert order == [r["id"] for r in sorted(served, key=lambda r: r["arrival"])]  # FIFO within and across


def test_closed_loop_with_fake_engine():
    log = []
    cfg = LoadConfig(rate=None, concurrency=3, requests=20, max_batch=4, timeout_ms=20)
    run = serve(_fake_engine(log=log), cfg, None, ["a", "b"])
    _assert_accounting(run, requested=20)
    assert max(len(b) for b in log) <= 3                          # never more than the clients in flight
    for client in range(3):                                        # closed loop: next request after the reply
        mine = sorted((r for r in run["requests"] if r["client"] == client), key=lambda r: r["arrival"])
        assert all(b["arrival"] >= a["done"] for a, b in zip(mine, mine[1:]))
    assert [r["prompt"] for r in sorted(run["requests"], key=lambda r: r["id"])][:3] == ["a", "b", "a"]


def test_open_loop_batches_fill_under_a_burst():
    cfg = LoadConfig(rate=2000.0, rate_relative=False, requests=12, max_batch=4, timeout_ms=1000)
    run = serve(_fake_engine(0.02), cfg, 2000.0, ())
    _assert_accounting(run, requested=12)
    assert [b["size"] for b in run["batches"]] == [4, 4, 4]        # 12 arrivals in ~6 ms: every batch fills


def test_time_limit_leaves_the_rest_unserved_without_hanging():
    cfg = LoadConfig(rate=None, concurrency=4, requests=100, max_batch=1, timeout_ms=0, time_limit_s=0.3)
    t0 = time.perf_counter()
    run = serve(_fake_engine(0.1), cfg, None, ())
    assert time.perf_counter() - t0 < 2.0 and run["hit_time_limit"]
    _assert_accounting(run)
    served = sum(r["done"] is not None for r in run["requests"])
    assert 1 <= served <= 4 and len(run["requests"]) > served


def test_engine_error_reaches_the_caller():
    def broken(batch):
        raise ShapeError("height=100 cannot be served")

    with pytest.raises(ShapeError, match="height=100"):
        serve(broken, LoadConfig(rate=None, concurrency=2, requests=5), None, ())


def test_poisson_arrivals_are_seeded_and_bounded():
    a, b = poisson_arrivals(4.0, 10_000, None, seed=3), poisson_arrivals(4.0, 10_000, None, seed=3)
    assert np.array_equal(a, b) and np.mean(np.diff(a)) == pytest.approx(0.25, rel=0.05)
    assert poisson_arrivals(4.0, None, 2.0, seed=0).max() <= 2.0


@pytest.mark.parametrize("kw,needle", [(dict(rate=-1.0), "rate -1.0"), (dict(rate=1.0, concurrency=2), "not both"),
                                       (dict(requests=None), "bound the run"), (dict(max_batch=0), "max batch 0"),
                                       (dict(timeout_ms=-5), "timeout -5 ms"), (dict(steps=0), "steps 0")])
def test_load_config_validation(kw, needle):
    with pytest.raises(ValueError, match=needle):
        LoadConfig(**kw)


# ---- real engines ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tiny_ort_ts):
    return tiny_ort_ts


def test_real_run_on_tiny_every_image_returned_to_its_request(tiny):
    bench = LoadBench(tiny, LoadConfig(steps=2))
    bench.calibrate(2)
    cfg = LoadConfig(rate=None, concurrency=3, requests=8, max_batch=2, timeout_ms=100, steps=2)
    run, images = bench.run(cfg, keep_images=True)
    _assert_accounting(run, requested=8)
    m = run["metrics"]
    assert m["served"] == 8 and m["unserved"] == 0 and m["batches"] == len(run["batches"])
    assert m["throughput_img_min"] == pytest.approx(8 / m["wall_s"] * 60)
    assert m["wall_s"] == pytest.approx(max(r["done"] for r in run["requests"]))
    assert 0 < m["utilization"] <= 1 and sum(int(b) * n for b, n in m["batch_sizes"].items()) == 8
    assert m["capacity_model_img_min"] == pytest.approx(max(b / s for b, s in bench.calibration.items()) * 60)
    assert all(r["image_size"] == [64, 64] for r in run["requests"])
    paired = next(r for r in run["requests"] if r["batch_size"] == 2)
    alone = bench.run_batch([Request(0, 0.0, paired["prompt"], paired["seed"])])[0]
    assert np.abs(np.asarray(alone, np.int16) - np.asarray(images[paired["id"]], np.int16)).max() <= 2


def test_cli_sweep_writes_results_and_picks_by_slo(tiny, tmp_path, capsys):
    out = tmp_path / "bench"
    code, stdout, err = run_cli(capsys, "bench", tiny, "-o", out, "--requests", "4", "--steps", "2", "--rate", "8x",
                                "--sweep-max-batch", "1,2", "--batch-timeout", "20", "--slo-p95", "60")
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["bench.json", "bench.md", "bench.png"]
    result = json.loads((out / "bench.json").read_text())
    assert result["schema_version"] == 1 and len(result["runs"]) == len(result["table"]) == 2
    for run in result["runs"]:
        _assert_accounting(run, requested=4)
    best = max(range(2), key=lambda i: result["table"][i]["throughput_img_min"])
    assert result["slo"]["met"] and result["slo"]["choice"] == best
    assert "SLO p95 <= 60 s: choose rate 8x" in stdout and "bench.png" in (out / "bench.md").read_text()


def _one_line_error(capsys, *argv, needle):
    code, _, err = run_cli(capsys, "bench", *argv)
    assert_one_line_error(code, err, needle)


def test_cli_missing_artifact(tmp_path, capsys):
    _one_line_error(capsys, str(tmp_path / "nope"), "-o", str(tmp_path / "b"),
                    needle="is not a directory")
    _one_line_error(capsys, str(tmp_path), "-o", str(tmp_path / "b"), needle="has no manifest.json")
    assert not (tmp_path / "b").exists()


def test_cli_bad_input(tiny, tmp_path, capsys):
    b = str(tmp_path / "b")
    _one_line_error(capsys, str(tiny), "-o", b, "--rate=-2", needle="bad rate '-2'")
    _one_line_error(capsys, str(tiny), "-o", b, "--concurrency", "2", "--sweep-rates", "1,2",
                    needle="use --rate instead")
    _one_line_error(capsys, str(tiny), "-o", str(tiny), needle="not the artifact")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    _one_line_error(capsys, str(tiny), "-o", str(tmp_path / "other"), needle="not a benchmark folder")
    assert not (tmp_path / "b").exists() and (tmp_path / "other" / "notes.txt").exists()


def test_sweep_config_limits():
    assert len(SweepConfig(rates=("1", "2x"), max_batches=(1, 2), timeouts_ms=(0, 50)).points(LoadConfig())) == 8
    with pytest.raises(ValueError, match="at most 64"):
        SweepConfig(rates=tuple(str(r) for r in range(1, 9)), max_batches=tuple(range(1, 10)))
    with pytest.raises(ValueError, match="SLO"):
        SweepConfig(slo_p95_s=0)
