"""diffaccel.optimize.export.onnx_export."""
