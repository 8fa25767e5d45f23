"""Experiments that run the project's own stages end to end (see docs/miniature_experiment.md)."""
