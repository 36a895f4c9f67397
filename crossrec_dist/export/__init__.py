"""Export: per-region adapters with a manifest, merged models, ONNX, and the serving API."""
