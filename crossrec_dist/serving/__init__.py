"""Serving an exported bundle: the engine (mixed-region batches), the HTTP server, batch inference."""
