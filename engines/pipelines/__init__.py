"""diffaccel.engines.pipelines.sd."""
