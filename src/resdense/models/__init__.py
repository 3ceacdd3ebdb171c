"""Model families; importing this package registers every named model."""

from . import densenet, resnet, vgg  # noqa: F401  (registration side effect)
from ._registry import PaperFigures, create_model, list_models, model_description, model_entry, register_model
from .blocks import ResidualBlock
from .densenet import DenseNet
from .layers import ClassifierModel
from .resnet import ResNet
from .vgg import VGG

__all__ = [
    "ClassifierModel", "DenseNet", "PaperFigures", "ResNet", "ResidualBlock", "VGG",
    "create_model", "list_models", "model_description", "model_entry", "register_model",
]
