"""diffaccel.optimize.quant."""
