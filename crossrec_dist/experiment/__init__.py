"""The whole pipeline from one recipe, with a report built from the run's own metrics.json files."""
