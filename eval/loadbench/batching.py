"""The dynamic-batching policy now lives with the server that uses it (:mod:`diffaccel.engines.serving.batching`);
the load benchmark imports it from there, and this module keeps the old import path working."""
from diffaccel.engines.serving.batching import BatchPolicy, BatchQueue, FakeClock, Request, simulate

__all__ = ["BatchPolicy", "BatchQueue", "FakeClock", "Request", "simulate"]
