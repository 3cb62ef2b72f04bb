"""``diffaccel bench --url``: drive a running server (embedded or Ray) over HTTP and record every request.

Synchronous mode posts ``/v1/images/generations`` and times the answer; job mode posts ``/v1/jobs`` and follows the
job's event stream to ``completed``. Arrivals are open-loop (Poisson, constant or a trace file: requests are sent on
time whatever the server does, so an overloaded server shows as 429s and latency) or closed-loop (``concurrency``
clients, each sending the next request when its previous one ends; a 429 makes it wait ``Retry-After``). Times are
client-side seconds since the run started; ``queue_s``, ``run_s`` and ``batch_size`` are what the server reports.
"""
from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import statistics
import time

from diffaccel.eval.loadbench.mix import RequestMix, arrivals, read_trace

MODES = ("sync", "jobs")


@dataclasses.dataclass(frozen=True)
class HttpLoadConfig:
    url: str
    mode: str = "jobs"
    arrivals: str = "poisson"             # poisson | constant | trace (with ``trace``)
    rate: "float | None" = 1.0            # requests/s, or with rate_relative a multiple of the measured capacity
    rate_relative: bool = True
    concurrency: "int | None" = None
    requests: "int | None" = 48
    duration_s: "float | None" = None
    trace: "str | None" = None
    steps: int = 10
    guidance: "float | None" = None
    seed: int = 0
    request_timeout_s: float = 300.0
    time_limit_s: float = 600.0

    def __post_init__(self):
        if not str(self.url).startswith(("http://", "https://")):
            raise ValueError(f"--url {self.url!r} must start with http:// or https://")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}; allowed: {', '.join(MODES)}")
        if self.arrivals == "trace" and self.trace is None:
            raise ValueError("trace arrivals need a trace file")
        if self.concurrency is None and self.arrivals != "trace" and self.rate is None:
            raise ValueError("give a rate, a number of concurrent clients or a trace")
        if self.requests is None and self.duration_s is None and self.arrivals != "trace":
            raise ValueError("bound the run with a number of requests, a duration, or both")


def _record(i: int, cls, send: float) -> dict:
    return {"id": i, "class": cls.name, "images": cls.n, "send": send, "done": None, "latency": None,
            "code": None, "status": None, "queue_s": None, "run_s": None, "batch_size": None, "error": None,
            "retry_after": None}


def _fill(rec: dict, metrics: "dict | None") -> None:
    if metrics:
        rec.update(queue_s=metrics.get("queue_s"), run_s=metrics.get("run_s"), batch_size=metrics.get("batch_size"))


async def _sync(client, rec: dict, body: dict, cfg) -> None:
    r = await client.post("/v1/images/generations", json=body,
                          headers={"Prefer": f"wait={int(cfg.request_timeout_s)}"})
    rec["code"] = r.status_code
    if r.status_code == 200:
        rec["status"] = "succeeded"
        _fill(rec, r.json().get("metrics"))
    elif r.status_code == 202:
        rec["status"], rec["error"] = "timeout", "timeout"
    else:
        _refused(rec, r)


def _refused(rec: dict, r) -> None:
    rec["status"] = "refused"
    rec["error"] = "429" if r.status_code == 429 else f"{r.status_code // 100}xx"
    if r.status_code == 429:
        rec["retry_after"] = float(r.headers.get("Retry-After", "1"))


async def _job(client, rec: dict, body: dict, cfg) -> None:
    r = await client.post("/v1/jobs", json=body)
    rec["code"] = r.status_code
    if r.status_code != 202:
        return _refused(rec, r)
    job_id, event = r.json()["id"], None
    async with client.stream("GET", f"/v1/jobs/{job_id}/events") as s:
        async for line in s.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "completed":
                data = json.loads(line[6:])
                rec["status"] = data["status"]
                rec["error"] = None if data["status"] == "succeeded" else data["status"]
                _fill(rec, data.get("metrics"))
                return
    rec["status"], rec["error"] = "lost", "stream ended"


async def _one(client, cfg, rec: dict, body: dict, t0: float) -> dict:
    import httpx

    try:
        await (_sync if cfg.mode == "sync" else _job)(client, rec, body, cfg)
    except httpx.TimeoutException:
        rec["status"], rec["error"] = "timeout", "timeout"
    except httpx.HTTPError as e:
        rec["status"], rec["error"] = "error", f"connection: {type(e).__name__}"
    rec["done"] = time.perf_counter() - t0
    rec["latency"] = rec["done"] - rec["send"]
    return rec


class HttpBench:
    """One client session against ``cfg.url`` with a request mix; :meth:`run` does one load test."""

    def __init__(self, cfg: HttpLoadConfig, mix: "RequestMix | None" = None, prompts=()):
        self.cfg, self.mix = cfg, mix or RequestMix()
        self.prompts = tuple(prompts) or ("a small red circle at the top left on a navy background",)

    def _client(self):
        import httpx

        return httpx.AsyncClient(base_url=self.cfg.url, timeout=self.cfg.request_timeout_s,
                                 limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def _body(self, i: int, cls) -> dict:
        return cls.body(i, self.cfg.seed + 1000 * i, self.prompts, self.cfg.steps, self.cfg.guidance)

    async def _calibrate(self, repeats: int) -> float:
        """Seconds per request of the first class, one at a time (the batch-1 service time as the client sees
        it); the median of ``repeats`` after one warm-up."""
        cls, out = self.mix.classes[0], []
        async with self._client() as client:
            for k in range(repeats + 1):
                t0 = time.perf_counter()
                rec = await _one(client, self.cfg, _record(-1 - k, cls, 0.0), self._body(10**6 + k, cls), t0)
                if rec["status"] != "succeeded":
                    raise RuntimeError(f"calibration request failed: {rec['error']} (HTTP {rec['code']})")
                out.append(rec["latency"])
        return statistics.median(out[1:])

    def calibrate(self, repeats: int = 3) -> float:
        return asyncio.run(self._calibrate(repeats))

    def run(self, cfg: "HttpLoadConfig | None" = None) -> dict:
        """Requests, wall time and whether the time limit cut the run."""
        return asyncio.run(self._run(cfg or self.cfg))

    async def _run(self, cfg) -> dict:
        t0, records = time.perf_counter(), []
        async with self._client() as client:
            try:
                await asyncio.wait_for(self._closed(client, cfg, t0, records) if cfg.concurrency is not None
                                       else self._open(client, cfg, t0, records), cfg.time_limit_s)
                hit = False
            except asyncio.TimeoutError:
                hit = True
        ended = [r["done"] for r in records if r["done"] is not None]
        return {"requests": sorted(records, key=lambda r: r["id"]), "wall_s": max(ended, default=0.0),
                "hit_time_limit": hit}

    def _schedule(self, cfg) -> list:
        """[(time, class)] for open-loop arrivals."""
        if cfg.arrivals == "trace":
            return [(t, self.mix.by_name(name) if name else c) for (t, name), c in
                    zip(read_trace(cfg.trace), self.mix.sample(len(read_trace(cfg.trace)), cfg.seed))]
        times = arrivals(cfg.arrivals, cfg.rate, cfg.requests, cfg.duration_s, cfg.seed)
        return list(zip(times, self.mix.sample(len(times), cfg.seed)))

    async def _open(self, client, cfg, t0, records) -> None:
        tasks = []
        for i, (t, cls) in enumerate(self._schedule(cfg)):
            delay = t - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            rec = _record(i, cls, time.perf_counter() - t0)
            records.append(rec)
            tasks.append(asyncio.create_task(_one(client, cfg, rec, self._body(i, cls), t0)))
        await asyncio.gather(*tasks)

    async def _closed(self, client, cfg, t0, records) -> None:
        counter = iter(range(10**9))
        classes = self.mix.sample(cfg.requests or 100_000, cfg.seed)

        async def worker():
            while True:
                i = next(counter)
                now = time.perf_counter() - t0
                if (cfg.requests is not None and i >= cfg.requests) or \
                        (cfg.duration_s is not None and now >= cfg.duration_s):
                    return
                cls = classes[i % len(classes)]
                rec = _record(i, cls, now)
                records.append(rec)
                await _one(client, cfg, rec, self._body(i, cls), t0)
                if rec["retry_after"]:
                    await asyncio.sleep(min(rec["retry_after"], 5.0))

        await asyncio.gather(*(worker() for _ in range(cfg.concurrency)))


def rate_rps(cfg: HttpLoadConfig, seconds_per_request: "float | None") -> "float | None":
    if cfg.rate is None or cfg.concurrency is not None or cfg.arrivals == "trace":
        return None
    if not cfg.rate_relative:
        return cfg.rate
    if not seconds_per_request or not math.isfinite(seconds_per_request):
        raise ValueError("a relative rate (e.g. 1x) needs a calibration")
    return cfg.rate / seconds_per_request


def _load_label(cfg: HttpLoadConfig, rps: "float | None") -> str:
    if cfg.concurrency is not None:
        return f"{cfg.concurrency} closed-loop clients"
    if cfg.arrivals == "trace":
        return f"trace {cfg.trace}"
    rel = f" ({cfg.rate:g}x capacity)" if cfg.rate_relative else ""
    return f"{cfg.arrivals} {rps:.2f} req/s{rel}"


def run_http_bench(cfg: HttpLoadConfig, mix: "RequestMix | None" = None, prompts=(), rates=(),
                   calib_repeats: int = 3, slo_p95_s=None, target_rps=None, price_per_hour=None,
                   measured_replicas: int = 1, on_run=None) -> dict:
    """Calibrate (when a rate is relative), run one load test per rate in ``rates`` (one run without), and return
    the full record with per-class metrics, the table and, with ``slo_p95_s``, the capacity plan."""
    from diffaccel.optimize.artifact.manifest import now

    from diffaccel.eval.harness.host import describe, host_info
    from diffaccel.eval.loadbench.http_report import capacity_plan, summarize, table_row
    from diffaccel.eval.loadbench.loop import parse_rate

    bench = HttpBench(cfg, mix, prompts)
    points = [dataclasses.replace(cfg, rate=v, rate_relative=rel) for v, rel in map(parse_rate, rates)] or [cfg]
    needs_calibration = any(p.rate_relative and p.concurrency is None and p.arrivals != "trace" for p in points)
    spr = bench.calibrate(calib_repeats) if needs_calibration else None
    runs = []
    for i, p in enumerate(points):
        rps = rate_rps(p, spr)
        raw = bench.run(dataclasses.replace(p, rate=rps, rate_relative=False) if rps else p)
        point = {"load": _load_label(p, rps), "rate_rps": rps, "concurrency": p.concurrency}
        runs.append({"point": point, "metrics": summarize(raw), "requests": raw["requests"]})
        if on_run is not None:
            on_run(i, len(points), runs[-1])
    table = [table_row(r["point"], r["metrics"]) for r in runs]
    host = host_info()
    return {"schema_version": 1, "benchmark": "http-load", "created": now(),
            "config": dataclasses.asdict(cfg), "mix": {"classes": [dataclasses.asdict(c) for c in bench.mix.classes]},
            "seconds_per_request": spr, "host": host, "host_text": describe(host), "table": table, "runs": runs,
            "plan": capacity_plan(table, slo_p95_s, target_rps, price_per_hour, measured_replicas)
            if slo_p95_s else None}
