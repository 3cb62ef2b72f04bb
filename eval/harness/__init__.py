"""diffaccel.eval.harness.evaluate."""
