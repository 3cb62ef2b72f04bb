"""diffaccel.eval.report.write."""
