"""Evaluation of generated videos: weight-free and encoder-based metrics, HTML reports and MLflow tracking."""
