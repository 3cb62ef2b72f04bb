"""diffaccel.optimize.stages.base."""
