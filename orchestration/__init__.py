"""Workflows that chain the stages, and the `exvideo` command line."""
