"""``diffaccel serve OUT --ray``: the same FastAPI app on Ray Serve, engines scaled out over replicas.

Two deployments. ``Engine`` replicas (``--replicas N`` or ``--autoscale MIN-MAX`` on ongoing requests, ``num_cpus``
and ``num_gpus`` per replica) hold the engines and batch with ``@serve.batch`` (max batch and wait: the server's
policy); inside a batch, only compatible jobs share a pipeline call, so each job keeps its solo image. ``Api`` is
the ingress (``@serve.ingress(app)``, one replica): it owns the durable SQLite job store and the queue, and hands
each job to the engine replicas through a deployment handle, up to ``in_flight`` at once.

Durability: an engine replica that dies takes nothing with it (its jobs' calls fail and are sent again, seeded, so
the images are the same); the ingress replica, if it dies, is restarted by Ray Serve on the node that holds the
SQLite file and re-enqueues what was queued or running, as the embedded server does after a crash.
"""
from __future__ import annotations

import collections
import dataclasses
import logging
import math
import threading

from diffaccel.engines.serving.batching import BatchPolicy
from diffaccel.engines.serving.models import batch_key
from diffaccel.engines.serving.worker import Worker

log = logging.getLogger(__name__)
RETRIES = 3
_REPLICA: dict = {}           # the Api replica's service factory (set in its constructor, read by the app lifespan)


@dataclasses.dataclass(frozen=True)
class RayOptions:
    replicas: int = 1
    autoscale: "tuple[int, int] | None" = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    @classmethod
    def parse(cls, replicas, autoscale, gpus, cpus) -> "RayOptions":
        span = None
        if autoscale:
            lo, _, hi = str(autoscale).partition("-")
            if not (lo.isdigit() and hi.isdigit() and 0 <= int(lo) <= int(hi) and int(hi) >= 1):
                raise ValueError(f"--autoscale {autoscale!r} must be MIN-MAX with 0 <= MIN <= MAX, MAX >= 1, e.g. 1-4")
            span = (int(lo), int(hi))
        return cls(replicas, span, gpus, cpus)

    def __post_init__(self):
        if isinstance(self.replicas, bool) or not isinstance(self.replicas, int) or self.replicas < 1:
            raise ValueError(f"--replicas {self.replicas!r} must be an integer >= 1")
        for name in ("gpus_per_replica", "cpus_per_replica"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
                raise ValueError(f"--{name.replace('_', '-')} {v!r} must be a number >= 0")

    def deployment_options(self, max_batch: int) -> dict:
        opts = {"ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
                "max_ongoing_requests": max(2 * max_batch, 4)}
        if self.autoscale:
            lo, hi = self.autoscale
            opts["autoscaling_config"] = {"min_replicas": lo, "max_replicas": hi, "initial_replicas": max(lo, 1),
                                          "target_ongoing_requests": max_batch}
        else:
            opts["num_replicas"] = self.replicas
        return opts

    @property
    def most_replicas(self) -> int:
        return self.autoscale[1] if self.autoscale else self.replicas


class RemoteWorker(Worker):
    """Hands each queued job (FIFO) to the engine replicas; ``in_flight`` dispatcher threads, one job each. Progress
    is reported when the call returns (the engine runs in another process)."""

    NAME = "diffaccel-dispatch"

    def __init__(self, call, in_flight: int, models, schedulers, policy, on_start, on_progress, on_done):
        self.THREADS = in_flight
        super().__init__(models, schedulers, BatchPolicy(1, 0.0), on_start, on_progress, on_done)
        self._call = call

    def _run(self, batch: list) -> list:
        it = batch[0]
        for attempt in range(1, RETRIES + 1):
            try:
                out = self._call(it.work, self.beat)
                break
            except Exception as e:              # a replica died or was restarted: send the job again (seeded)
                if attempt == RETRIES or not _replica_lost(e):
                    raise
                log.warning("engine replica lost during job %s (%s); sending it again", it.id, type(e).__name__)
        it.engine_batch, it.engine_attempts, it.step = out["batch_size"], attempt, it.work["steps"]
        return [out["images"]]


def _replica_lost(e: BaseException) -> bool:
    import ray.exceptions as rex

    lost = tuple(getattr(rex, n) for n in ("RayActorError", "ActorDiedError", "ActorUnavailableError",
                                           "WorkerCrashedError") if hasattr(rex, n))
    return isinstance(e, lost) or type(e).__name__ in ("RayServeException", "DeploymentUnavailableError")


def _group_and_run(models, schedulers, works: list) -> list:
    """Run a Ray batch as one pipeline call per compatible group; per work: {"images", "batch_size"}."""
    from diffaccel.engines.serving.worker import run_batch

    groups = collections.OrderedDict()
    for i, w in enumerate(works):
        groups.setdefault(batch_key(w), []).append(i)
    out = [None] * len(works)
    for idx in groups.values():
        images = run_batch(models, schedulers, [works[i] for i in idx])
        size = sum(works[i]["n"] for i in idx)
        for i, imgs in zip(idx, images):
            out[i] = {"images": imgs, "batch_size": size}
    return out


def _replica_service():
    return _REPLICA["factory"]()


def deployments(cfg, opts: RayOptions):
    """The ``Engine`` and ``Api`` deployment classes for this config (Ray imported here, not at module import)."""
    return _engine_deployment(cfg, opts), _api_deployment()


def _engine_deployment(cfg, opts: RayOptions):
    """``Engine``: the replicas that own the engines, batching with ``@serve.batch`` by the server's policy."""
    import asyncio

    from ray import serve

    @serve.deployment(**opts.deployment_options(cfg.max_batch))
    class Engine:
        def __init__(self, paths, threads, provider):
            from diffaccel.engines.pipelines.schedulers import served
            from diffaccel.engines.serving.models import load_models

            self.models, self.schedulers = load_models(paths, threads=threads, provider=provider), served()
            self._lock = asyncio.Lock()           # one engine call at a time per replica

        @serve.batch(max_batch_size=cfg.max_batch, batch_wait_timeout_s=cfg.max_wait_ms / 1000.0)
        async def generate(self, works: list) -> list:
            async with self._lock:
                return await asyncio.to_thread(_group_and_run, self.models, self.schedulers, works)

    return Engine


def _api_deployment():
    """``Api``: the HTTP app (the embedded server's, mounted with ``@serve.ingress``) over a service whose worker
    sends each batch to the ``Engine`` deployment."""
    from ray import serve

    from diffaccel.engines.serving.app import create_app

    app = create_app(None, service_factory=_replica_service)

    @serve.deployment(ray_actor_options={"num_cpus": 0.1}, max_ongoing_requests=10_000)
    @serve.ingress(app)
    class Api:
        def __init__(self, engine, paths, scfg, provider, in_flight):
            def factory():
                from diffaccel.engines.serving.models import load_models
                from diffaccel.engines.serving.service import Service

                def call(work, beat):
                    response = engine.generate.remote(work)
                    while True:              # beat while the replica works: readiness reads the heartbeat
                        try:
                            return response.result(timeout_s=1.0)
                        except TimeoutError:
                            beat()

                def worker(models, scheds, policy, on_start, on_progress, on_done):
                    return RemoteWorker(call, in_flight, models, scheds, policy, on_start, on_progress, on_done)

                return Service(scfg, load_models(paths, threads=1, provider=provider), worker=worker)
            from diffaccel.engines.serving import ray_app   # the module itself: this class was pickled by value

            ray_app._REPLICA["factory"] = factory

        def check_health(self):
            """Ray Serve's health check: a replica whose service gave up (or whose dispatch threads died) is
            restarted by Ray, as a supervisor restarts the embedded server."""
            service = app.state.service
            problems = service.watchdog.live_problems() if service is not None else []
            if problems:
                raise RuntimeError("; ".join(problems))

    return Api


def build_app(paths, cfg, opts: RayOptions, provider=None):
    """The Ray Serve application (bound deployments) for ``serve.run``: only data (paths, configs) travels into the
    replicas; each finds its schedulers and guidance itself, as the embedded server does."""
    Engine, Api = deployments(cfg, opts)
    engine = Engine.bind([str(p) for p in paths], cfg.threads, provider)
    in_flight = opts.most_replicas * cfg.max_batch * 2
    return Api.bind(engine, [str(p) for p in paths], cfg, provider, in_flight)


def run_ray(paths, cfg, opts: RayOptions, host, port, provider=None) -> int:
    """Start (or join, with RAY_ADDRESS) a Ray cluster, run the app on Ray Serve's proxy at host:port, block until
    SIGINT or SIGTERM, then shut Serve and Ray down (a local Ray's processes with them)."""
    import signal

    import ray
    from ray import serve

    ray.init(ignore_reinit_error=True, include_dashboard=False)
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(paths, cfg, opts, provider), name="diffaccel", route_prefix="/")
    print(f"serving on Ray Serve at http://{host}:{port}/ ({opts.most_replicas} engine replica(s) at most); "
          "Ctrl-C stops", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass
    serve.shutdown()
    ray.shutdown()
    return 0
