"""``diffaccel serve``: the command's argparse wiring, registered by the main CLI (:func:`register`). Everything the
server needs it finds itself: each model's default guidance and limit in its manifest, the scheduler names next to
the pipelines. Heavy imports stay inside the command."""
from __future__ import annotations

import os
import sys

from diffaccel.optimize.artifact.errors import DiffaccelError

SECRET_ENV = "DIFFACCEL_WEBHOOK_SECRET"


def register(sub) -> None:
    p = sub.add_parser(
        "serve", help="serve artifacts over HTTP: sync calls, durable jobs, batching",
        description="Serve one or more artifacts over HTTP: OpenAI-compatible POST /v1/images/generations, durable "
                    "jobs (POST /v1/jobs, progress, events, cancel, webhooks), /health, /metrics and a playground "
                    "at /. Embedded by default (one process, SQLite job store); --ray runs it on Ray Serve.",
        epilog="Example: diffaccel serve engines/tiny --port 8000   then open http://127.0.0.1:8000/  "
               "(docs/serving.md)")
    p.add_argument("artifacts", nargs="+", metavar="OUT[@cache=SPEC]",
                   help="artifact folder(s) made by diffaccel optimize; requests pick one with \"model\": FOLDER-NAME "
                        "(FOLDER-NAME@SPEC for one served with a step cache: OUT@cache=SPEC or --cache)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--db", default="diffaccel-jobs.sqlite", help="SQLite job store (default ./diffaccel-jobs.sqlite);"
                                                                 " jobs left queued or running resume from it")
    p.add_argument("--max-batch", type=int, default=4, help="images per engine call (default 4)")
    p.add_argument("--max-wait-ms", type=float, default=50.0, help="how long the oldest job waits for a batch to "
                                                                   "fill (default 50; 0: never wait)")
    p.add_argument("--queue-limit", type=int, default=64, help="queued jobs before 429 + Retry-After (default 64)")
    p.add_argument("--steps", type=int, default=20, help="default denoising steps (default 20)")
    p.add_argument("--max-steps", type=int, default=150)
    p.add_argument("--max-images", type=int, default=4, help="most images per request (n; default 4)")
    p.add_argument("--webhook-secret", default=None, help=f"Standard Webhooks secret whsec_... (or ${SECRET_ENV}); "
                                                          "without one, webhooks are refused")
    p.add_argument("--webhook-allow", action="append", default=[], metavar="HOST|CIDR",
                   help="a webhook target to allow besides public addresses (repeatable), e.g. 10.0.0.0/8 or "
                        "hooks.internal; loopback, private, link-local and metadata addresses are refused otherwise")
    p.add_argument("--max-attempts", type=int, default=2, help="runs a crash may cut off before a job is failed "
                                                               "instead of run again at start-up (default 2)")
    p.add_argument("--heartbeat-timeout", type=float, default=120.0, metavar="S",
                   help="readiness fails when the engine has not reported for this long (default 120 s; longer "
                        "than one denoising step of the slowest model)")
    p.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads per engine")
    p.add_argument("--provider", default=None, help="ONNX Runtime provider (default: the one built for)")
    p.add_argument("--cache", default=None, metavar="SPEC",
                   help="step cache for every OUT built with --step-cache that has no @cache= of its own: "
                        "deepcache[:interval=N][,branch=B] or off; per deployment, not per request (docs/serving.md)")
    r = p.add_argument_group("Ray Serve (scale-out)")
    r.add_argument("--ray", action="store_true", help="run on Ray Serve (joins the cluster at $RAY_ADDRESS or starts "
                                                      "a local one); needs pip install -e \".[ray]\"")
    r.add_argument("--replicas", type=int, default=1)
    r.add_argument("--autoscale", default=None, metavar="MIN-MAX", help="autoscale on ongoing requests")
    r.add_argument("--gpus-per-replica", type=float, default=0.0)
    r.add_argument("--cpus-per-replica", type=float, default=1.0)
    p.set_defaults(func=_cmd_serve)


def serve_config(args):
    from diffaccel.engines.serving.config import ServeConfig

    try:
        return ServeConfig(db=args.db, max_batch=args.max_batch, max_wait_ms=args.max_wait_ms,
                           queue_limit=args.queue_limit, default_steps=args.steps, max_steps=args.max_steps,
                           max_images=args.max_images, threads=args.threads,
                           webhook_secret=args.webhook_secret or os.environ.get(SECRET_ENV) or None,
                           webhook_allow=tuple(args.webhook_allow), max_attempts=args.max_attempts,
                           heartbeat_timeout_s=args.heartbeat_timeout)
    except ValueError as e:
        raise DiffaccelError(str(e)) from None


def _cmd_serve(args) -> int:
    from diffaccel.engines.serving.build import build_service, missing_extra
    from diffaccel.engines.serving.models import cache_paths

    hint = missing_extra()
    if hint:
        raise DiffaccelError(hint)
    cfg = serve_config(args)
    args.artifacts = cache_paths(args.artifacts, args.cache)    # bad folders and caches fail here, in one line
    if args.ray:
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise DiffaccelError('diffaccel serve --ray needs Ray Serve: pip install -e ".[ray]"')
        from diffaccel.engines.serving.ray_app import RayOptions, run_ray

        try:
            opts = RayOptions.parse(args.replicas, args.autoscale, args.gpus_per_replica, args.cpus_per_replica)
        except ValueError as e:
            raise DiffaccelError(str(e)) from None
        return run_ray(args.artifacts, cfg, opts, args.host, args.port, args.provider)
    import uvicorn

    from diffaccel.engines.serving.app import create_app

    service = build_service(args.artifacts, cfg, args.provider)
    print(f"serving {', '.join(service.models)} on http://{args.host}:{args.port}/ (jobs in {cfg.db_path}; "
          f"batch up to {cfg.max_batch}, wait {cfg.max_wait_ms:g} ms, queue limit {cfg.queue_limit})",
          file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=args.host, port=args.port, log_level="warning",
                                           timeout_graceful_shutdown=5))
    service.on_fatal = lambda: setattr(server, "should_exit", True)   # a supervisor restarts what exits non-zero
    server.run()
    if service.watchdog.fatal:
        print(f"diffaccel: error: {service.watchdog.fatal}; exiting so that a supervisor restarts the server",
              file=sys.stderr)
        return 3
    return 0
