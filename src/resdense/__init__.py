"""resdense: ResNet and DenseNet exactly as the papers define them, their plain twins, the
papers' training recipes, and the experiments that show why shortcut connections work."""

from .analysis.complexity import model_info
from .errors import UserError
from .models import create_model, list_models

__version__ = "0.1.0"

__all__ = ["UserError", "create_model", "list_models", "model_info", "__version__"]
