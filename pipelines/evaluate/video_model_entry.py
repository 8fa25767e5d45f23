"""MLflow models-from-code entry point of the ExVideo pyfunc model: MLflow copies this file into the logged model
and runs it on load, so the model is plain readable code rather than a pickled object."""

import mlflow

from pipelines.evaluate.video_model import ExVideoModel

mlflow.models.set_model(ExVideoModel())
