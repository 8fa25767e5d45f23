"""Post-tuning of the ExVideo temporal modules with Ray Train on cached latent shards.

Public API: TrainConfig, run_training, TrainResult. Imported on first use: Ray Train's controller unpickles the
training config, and importing this package for it should not also import torch, diffusers and MLflow.
"""

import importlib

_EXPORTS = {"TrainConfig": "config", "TrainResult": "run", "run_training": "run"}


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"pipelines.train.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'pipelines.train' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
