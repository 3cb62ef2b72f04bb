"""The OpenAPI document is a contract: a schema-driven fuzzer (schemathesis, every phase, positive and negative data)
and a hand-written hostile set run against a real ``diffaccel serve`` on the loopback. No answer may be a 5xx or fall
outside the document; afterwards the engine is alive, ``/health/ready`` is true, and a generation gives the same image
as before the run.

Bounded for CI; the closing-note run scales it up: ``DIFFACCEL_FUZZ_EXAMPLES=120 DIFFACCEL_FUZZ_HOSTILE=2000 pytest
tests/test_serve_contract.py -s`` prints the request counts. ``positive_data_acceptance`` is the one schemathesis
check left out: whether a schema-valid body can be served depends on the served engines (sizes within their range
and in multiples of their latent grid, scheduler x step counts), which JSON Schema cannot state; each such refusal is
a documented 400 with the error body, which the other checks hold the server to.
"""
import base64
import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed: pip install -e '.[serve]'")
httpx = pytest.importorskip("httpx", reason="the serve extra is not installed: pip install -e '.[serve]'")
pytest.importorskip("schemathesis", reason="the contract fuzzer is not installed: pip install -e '.[test]'")

from diffaccel.engines.serving.process import ServerProcess  # noqa: E402

from .hostile import Contract, requests  # noqa: E402

EXAMPLES = int(os.environ.get("DIFFACCEL_FUZZ_EXAMPLES", "12"))
HOSTILE = int(os.environ.get("DIFFACCEL_FUZZ_HOSTILE", "400"))
SECRET = "whsec_" + base64.b64encode(b"contract-test-secret-012").decode()
ARGS = ["--max-steps", "4", "--steps", "2", "--max-images", "2", "--queue-limit", "16", "--max-wait-ms", "0",
        "--threads", "1", "--webhook-secret", SECRET]


@pytest.fixture(scope="module")
def server(tiny_ort_ts, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("contract")
    with open(tmp / "server.log", "wb") as log, ServerProcess([tiny_ort_ts], tmp / "jobs.sqlite", ARGS, log=log,
                                                               env={"OMP_NUM_THREADS": "1"}) as s:
        yield s


def _generate(url: str) -> str:
    r = httpx.post(f"{url}/v1/images/generations", json={"prompt": "a red circle", "seed": 11, "steps": 2},
                   headers={"prefer": "wait=60"}, timeout=90)
    assert r.status_code == 200, r.text
    return hashlib.sha256(base64.b64decode(r.json()["data"][0]["b64_json"])).hexdigest()


def test_fuzzing_finds_no_5xx_and_nothing_outside_the_document(server, tmp_path, capsys):
    before = _generate(server.url)
    report = tmp_path / "st.json"
    st = Path(sys.executable).with_name("st")
    run = subprocess.run([str(st), "run", f"{server.url}/openapi.json", "--checks", "all", "--exclude-checks",
                          "positive_data_acceptance", "--max-examples", str(EXAMPLES), "--seed", "7",
                          "--workers", "1", "--request-timeout", "60", "--report", "json",
                          "--report-json-path", str(report), "--suppress-health-check", "all"],
                         capture_output=True, text=True, timeout=1500, cwd=tmp_path)
    tail = "\n".join(run.stdout.splitlines()[-60:])
    assert run.returncode == 0, tail
    generated = int(next(m for m in _numbers(run.stdout, r"(\d+) generated")))
    assert generated >= 11 * min(EXAMPLES, 10), tail           # every operation was exercised

    doc = httpx.get(f"{server.url}/openapi.json").json()
    contract, rng = Contract(doc), random.Random(25)
    job = httpx.post(f"{server.url}/v1/jobs", json={"prompt": "a blue star", "steps": 2}).json()
    schedulers = doc["components"]["schemas"]["JobCreate"]["properties"]["scheduler"]["anyOf"][0]["enum"]
    broken, codes = [], {}
    with httpx.Client(base_url=server.url, timeout=60) as client:
        for method, path, headers, body in requests(rng, HOSTILE, job["id"], schedulers):
            r = client.request(method, path, headers={"content-type": "application/json", **headers}, content=body)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            problem = contract.problem(method, path, r.status_code, r.headers, r.content)
            if problem:
                broken.append((problem, body[:120]))
    assert not broken, broken[:5]
    assert not [c for c in codes if c >= 500], codes
    ready = httpx.get(f"{server.url}/health/ready")
    assert ready.status_code == 200 and ready.json()["worker_restarts"] == 0, ready.text
    assert server.proc.poll() is None                           # the process never died
    assert _generate(server.url) == before                      # the same image as before the run
    metrics = httpx.get(f"{server.url}/metrics").text
    assert not [line for line in metrics.splitlines() if line.startswith('diffaccel_http_requests_total{code="5')]
    with capsys.disabled():
        print(f"\ncontract fuzz: schemathesis {generated} cases; hostile {HOSTILE} requests {sorted(codes.items())}")


def _numbers(text: str, pattern: str):
    import re

    return re.findall(pattern, text)


def test_the_document_lists_every_status_with_the_real_error_body(server):
    doc = httpx.get(f"{server.url}/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(doc)          # the 422 shape this server never sends
    ops = doc["paths"]
    want = {("/v1/images/generations", "post"): {"200", "202", "400", "409", "413", "429", "500"},
            ("/v1/jobs", "post"): {"202", "400", "413", "422", "429"}, ("/v1/jobs/{job_id}", "get"): {"200", "404",
                                                                                                       "413"},
            ("/health/ready", "get"): {"200", "413", "503"}}
    for (path, method), codes in want.items():
        assert set(ops[path][method]["responses"]) == codes, (path, ops[path][method]["responses"].keys())
    err = ops["/v1/jobs"]["post"]["responses"]["429"]["content"]["application/json"]["schema"]
    assert err == {"$ref": "#/components/schemas/ErrorResponse"}
    props = doc["components"]["schemas"]["JobCreate"]["properties"]
    assert props["n"]["maximum"] == 2 and props["steps"]["anyOf"][0]["maximum"] == 4   # this server's limits
    assert props["model"]["anyOf"][0]["enum"] == [Path(server.argv[4]).name]
    r = httpx.request("OPTIONS", f"{server.url}/v1/jobs")
    assert r.status_code == 405 and {"GET", "POST"} <= set(r.headers["allow"].replace(" ", "").split(","))
