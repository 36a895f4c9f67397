"""Stages: thin tasks on the shared engine (what to train, its loss, what to save)."""
