"""The recommender model: config, presets, losses."""
