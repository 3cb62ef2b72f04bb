"""diffaccel.optimize.artifact."""
