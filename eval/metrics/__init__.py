"""diffaccel.eval.metrics.images."""
