"""diffaccel.engines.backends."""
