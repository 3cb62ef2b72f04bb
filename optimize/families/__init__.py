"""diffaccel.optimize.families."""
