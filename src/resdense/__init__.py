"""resdense: ResNet and DenseNet exactly as the papers define them, their plain twins, the
papers' training recipes, and the experiments that show why shortcut connections work.

From Python: :func:`create_model` (``pretrained=RUN_DIR`` for trained weights), :func:`load`
(a trained model that predicts class names), :func:`train` and :func:`run_study`."""

from . import train  # the training package, callable: resdense.train(config, **settings) trains a run
from .analysis.complexity import model_info
from .api import StudyResult, TrainedModel, TrainResult, load, run_study
from .errors import CheckpointError, ConfigError, DataError, UserError
from .models import create_model, list_models, model_description

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "DataError", "StudyResult", "TrainResult", "TrainedModel", "UserError",
           "__version__", "create_model", "list_models", "load", "model_description", "model_info", "run_study",
           "train"]
