"""diffaccel.eval.loadbench.loop."""
