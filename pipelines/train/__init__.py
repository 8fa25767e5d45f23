"""Post-tuning of the ExVideo temporal modules with Ray Train on cached latent shards."""

from pipelines.train.config import TrainConfig
from pipelines.train.run import TrainResult, run_training

__all__ = ["TrainConfig", "TrainResult", "run_training"]
