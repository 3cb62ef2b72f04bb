"""Prometheus text exposition (format 0.0.4) of the server's counters, gauges and histograms, with no client library.

>>> m = Metrics(max_batch=2)
>>> m.observe_batch(2, 0.5); m.count("diffaccel_images_total", 2)
>>> text = m.render({"diffaccel_queue_depth": 0})
>>> 'diffaccel_batch_size_bucket{le="2"} 1' in text, "diffaccel_images_total 2" in text
(True, True)
"""
from __future__ import annotations

import bisect
import collections
import threading

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
# Every series, in the order /metrics lists them: kind, name, help text.
SERIES = """
gauge      diffaccel_queue_depth               Jobs waiting in the queue
gauge      diffaccel_jobs_running              Jobs in the engine call now
gauge      diffaccel_queue_limit               Jobs the queue holds before answering 429
gauge      diffaccel_worker_heartbeat_age_seconds  Seconds since the engine worker last reported
counter    diffaccel_images_total              Images generated and stored
counter    diffaccel_jobs_total                Jobs that ended, by status
counter    diffaccel_requests_rejected_total   Requests refused, by reason
counter    diffaccel_http_requests_total       HTTP responses, by status code
counter    diffaccel_webhook_deliveries_total  Webhook delivery attempts, by outcome
counter    diffaccel_worker_restarts_total     Engine threads started again after one died
counter    diffaccel_jobs_quarantined_total    Jobs failed at start-up because the server died running them too often
histogram  diffaccel_batch_size                Images per engine call
histogram  diffaccel_batch_seconds             Seconds per engine call
histogram  diffaccel_job_queue_seconds         Seconds a job waited before its engine call
histogram  diffaccel_job_run_seconds           Seconds of a job's engine call
histogram  diffaccel_job_latency_seconds       Seconds from accepting a job to storing its images
"""
HELP = {name: (kind, text) for kind, name, text in (row.split(None, 2) for row in SERIES.strip().splitlines())}


def _labels(labels: tuple) -> str:
    return "{" + ",".join(f'{k}="{v}"' for k, v in labels) + "}" if labels else ""


class _Histogram:
    def __init__(self, buckets):
        self.buckets, self.counts, self.sum, self.n = tuple(buckets), [0] * len(buckets), 0.0, 0

    def observe(self, v: float) -> None:
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.sum += v
        self.n += 1

    def lines(self, name: str) -> list:
        out, acc = [], 0
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.sum:.6f}", f"{name}_count {self.n}"]
        return out


class Metrics:
    """Thread-safe counters and histograms; gauges are passed to :meth:`render` as they are now."""

    def __init__(self, max_batch: int):
        self._lock = threading.Lock()
        self._counters: "dict[str, collections.Counter]" = collections.defaultdict(collections.Counter)
        # images per call are counted in buckets 1..max_batch; every other histogram holds seconds
        self._hist = {name: _Histogram(range(1, max_batch + 1) if name == "diffaccel_batch_size" else LATENCY_BUCKETS)
                      for name, (kind, _) in HELP.items() if kind == "histogram"}

    def count(self, name: str, value: float = 1, **labels) -> None:
        with self._lock:
            self._counters[name][tuple(sorted(labels.items()))] += value

    def observe(self, name: str, value: float) -> None:
        with self._lock:
            self._hist[name].observe(value)

    def observe_batch(self, images: int, seconds: float) -> None:
        with self._lock:
            self._hist["diffaccel_batch_size"].observe(images)
            self._hist["diffaccel_batch_seconds"].observe(seconds)

    def value(self, name: str, **labels) -> float:
        with self._lock:
            return self._counters[name][tuple(sorted(labels.items()))]

    def render(self, gauges: dict) -> str:
        lines = []
        with self._lock:
            for name, (kind, text) in HELP.items():
                lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
                if kind == "gauge":
                    lines.append(f"{name} {gauges.get(name, 0):g}")
                elif kind == "counter":
                    series = self._counters.get(name) or {(): 0}
                    lines += [f"{name}{_labels(k)} {v:g}" for k, v in sorted(series.items())]
                else:
                    lines += self._hist[name].lines(name)
        return "\n".join(lines) + "\n"
