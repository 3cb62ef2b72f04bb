"""``diffaccel bench --url`` against a real server on the loopback (uvicorn in a thread, random:tiny engines):
request mixes, open and closed loop, per-class figures, 429s under overload, the capacity plan; mix/trace parsing.
``diffaccel bench ARTIFACT --vs-server ROUNDS``: the embedded server in a subprocess beside the in-process loop."""
import json

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("uvicorn", reason="the serve extra is not installed: pip install -e '.[serve]'")

from diffaccel.eval.loadbench.http_report import capacity_plan  # noqa: E402
from diffaccel.eval.loadbench.mix import RequestMix, read_trace  # noqa: E402

from .helpers import assert_one_line_error, run_cli  # noqa: E402
from .serve_helpers import live, models  # noqa: E402,F401  (fixtures)

MIX = {"classes": [{"name": "short", "weight": 3, "steps": 2, "prompt_words": 4},
                   {"name": "long", "weight": 1, "steps": 4, "prompt_words": 40, "scheduler": "euler"}]}


def test_closed_loop_jobs_with_a_mix_report_each_class(live, tmp_path, capsys):
    url = live(max_batch=4, max_wait_ms=20)
    (tmp_path / "mix.json").write_text(json.dumps(MIX))
    code, out, err = run_cli(capsys, "bench", "--url", url, "-o", tmp_path / "b", "--mix", tmp_path / "mix.json",
                             "--concurrency", 3, "--requests", 12, "--slo-p95", 60, "--target-rate", 10,
                             "--price-per-hour", 2)
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    run = result["runs"][0]
    assert {r["class"] for r in run["requests"]} == {"short", "long"} and len(run["requests"]) == 12
    assert all(r["status"] == "succeeded" and r["run_s"] > 0 and r["latency"] >= r["queue_s"] for r in
               run["requests"])
    classes = run["metrics"]["classes"]
    assert classes["short"]["served"] + classes["long"]["served"] == 12
    for g in classes.values():
        assert g["e2e"]["p50"] <= g["e2e"]["p95"] <= g["e2e"]["p99"] and g["queue"]["p50"] is not None
    plan = result["plan"]
    assert plan["met"] and plan["replicas"] >= 1 and plan["cost_per_1000_images"] > 0
    assert "capacity plan" in out and "short" in out and "long" in out
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0 and "Request mix" in (tmp_path / "b" / "bench.md") \
        .read_text()


def test_open_loop_overload_gets_429s_and_no_lost_requests(live, tmp_path, capsys):
    url = live(max_batch=2, max_wait_ms=0, queue_limit=2)
    code, _, err = run_cli(capsys, "bench", "--url", url, "-o", tmp_path / "b", "--mode", "sync", "--arrivals",
                           "constant", "--rate", 200, "--requests", 30, "--steps", 2)
    assert code == 0, err
    recs = json.loads((tmp_path / "b" / "bench.json").read_text())["runs"][0]["requests"]
    served = [r for r in recs if r["status"] == "succeeded"]
    refused = [r for r in recs if r["error"] == "429"]
    assert len(served) + len(refused) == 30 and refused and served          # each answered: image or 429
    assert all(r["retry_after"] >= 1 for r in refused)
    assert max(r["batch_size"] for r in served) <= 2


def test_trace_arrivals_pick_their_class(live, tmp_path, capsys):
    url = live(max_wait_ms=0)
    (tmp_path / "mix.json").write_text(json.dumps(MIX))
    (tmp_path / "trace.txt").write_text("0.0 long\n0.05 short\n# a comment\n0.1\n")
    code, _, err = run_cli(capsys, "bench", "--url", url, "-o", tmp_path / "b", "--mix", tmp_path / "mix.json",
                           "--arrivals", "trace", "--trace", tmp_path / "trace.txt")
    assert code == 0, err
    recs = json.loads((tmp_path / "b" / "bench.json").read_text())["runs"][0]["requests"]
    assert [r["class"] for r in recs][:2] == ["long", "short"] and len(recs) == 3


def test_bad_http_bench_input_fails_in_one_line(tmp_path, capsys):
    (tmp_path / "mix.json").write_text(json.dumps({"classes": [{"name": "a", "stepz": 3}]}))
    code, _, err = run_cli(capsys, "bench", "--url", "http://127.0.0.1:9", "-o", tmp_path / "b", "--mix",
                           tmp_path / "mix.json")
    assert_one_line_error(code, err, "stepz", "allowed: name, weight")
    code, _, err = run_cli(capsys, "bench", "--url", "ftp://x", "-o", tmp_path / "b")
    assert_one_line_error(code, err, "http://")
    code, _, err = run_cli(capsys, "bench", "--url", "http://127.0.0.1:9", "-o", tmp_path / "b", "--mode", "x")
    assert_one_line_error(code, err, "sync, jobs")
    code, _, err = run_cli(capsys, "bench", "-o", tmp_path / "b")
    assert_one_line_error(code, err, "--url")
    code, _, err = run_cli(capsys, "bench", tmp_path, "-o", tmp_path / "b", "--vs-server", 2, "--rate", 2,
                           "--sweep-max-batch", "1,2")
    assert_one_line_error(code, err, "--vs-server runs closed-loop clients", "drop --rate, --sweep-max-batch")
    code, _, err = run_cli(capsys, "bench", tmp_path, "-o", tmp_path / "b", "--vs-server", 0)
    assert_one_line_error(code, err, "--vs-server 0", ">= 1")
    code, _, err = run_cli(capsys, "bench", "--url", "http://127.0.0.1:9", "-o", tmp_path / "b", "--vs-server", 2)
    assert_one_line_error(code, err, "--vs-server", "drop --url")


@pytest.mark.slow
def test_vs_server_times_the_embedded_server_beside_the_in_process_loop(tiny_ort_ts, tmp_path, capsys):
    code, out, err = run_cli(capsys, "bench", tiny_ort_ts, "-o", tmp_path / "b", "--vs-server", 2, "--requests", 4,
                             "--concurrency", 2, "--max-batch", 2, "--batch-timeout", 20, "--steps", 2,
                             "--threads", 1)
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "bench.json").read_text())
    rounds = result["rounds"]
    assert result["benchmark"] == "server-overhead" and len(rounds) == 2
    for r in rounds:
        assert r["http"]["served"] == r["http"]["requests"] == 4 and r["local"]["img_min"] > 0
        assert r["http"]["p50_s"] > r["http"]["run_p50_s"] > 0 and r["http"]["outside_queue_p50_s"] > 0
        assert 1 <= r["local"]["mean_batch"] <= 2 and 1 <= r["http"]["mean_batch"] <= 2
    assert result["throughput_ratio"] == pytest.approx(sum(r["http"]["img_min"] for r in rounds)
                                                       / sum(r["local"]["img_min"] for r in rounds), abs=1e-4)
    assert "HTTP / in-process throughput" in out and "round 2:" in err
    assert (tmp_path / "b" / "bench.png").stat().st_size > 0 and "in-process" in (tmp_path / "b" / "bench.md") \
        .read_text()


def test_a_server_that_does_not_start_fails_naming_its_last_words(tmp_path):
    from diffaccel.eval.loadbench.loop import LoadConfig
    from diffaccel.eval.loadbench.overhead import serve_in_child
    from diffaccel.optimize.artifact.errors import DiffaccelError

    with pytest.raises(DiffaccelError, match=r"diffaccel serve exited .*: .*no manifest.json"):
        serve_in_child(tmp_path, tmp_path, LoadConfig(rate=None, concurrency=2), threads=1)


def test_mix_trace_and_plan_units(tmp_path):
    mix = RequestMix.parse(MIX)
    picks = [c.name for c in mix.sample(400, seed=1)]
    assert 0.65 < picks.count("short") / 400 < 0.85                       # weights 3:1
    assert len(mix.by_name("long").prompt(0, ["a red circle"]).split()) == 40
    with pytest.raises(ValueError, match="weight"):
        RequestMix.parse({"classes": [{"weight": 0}]})
    (tmp_path / "t").write_text("0.5 a\nx\n")
    with pytest.raises(ValueError, match="SECONDS"):
        read_trace(tmp_path / "t")
    rows = [{"load": "a", "throughput_img_min": 60.0, "p95_s": 1.0, "errors": 0, "images_per_request": 2.0},
            {"load": "b", "throughput_img_min": 100.0, "p95_s": 1.0, "errors": 3, "images_per_request": 2.0}]
    plan = capacity_plan(rows, 2.0, target_rps=1.0, price_per_hour=3.0, measured_replicas=2)
    assert plan["per_replica_img_min"] == 30.0 and plan["replicas"] == 4      # 120 images/min at 30 each
    assert plan["cost_per_1000_images"] == pytest.approx(4 * 3.0 / 7200 * 1000)
    assert not capacity_plan(rows, 0.5)["met"]
