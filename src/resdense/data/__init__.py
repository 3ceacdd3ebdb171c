"""Datasets as uint8 tensors: Fashion-MNIST, MNIST, CIFAR-10/100, image folders, synthetic.

``load_dataset(name)`` gives train / validation splits in memory, their statistics, and a
test split that is read only when asked for (see :mod:`.datasets`).
"""

from .datasets import (
    DATASETS,
    DatasetSpec,
    DatasetSplits,
    ImageSet,
    channel_stats,
    check_available,
    dataset_names,
    load_dataset,
    search_dirs,
    split_indices,
)
from .download import cache_dir
from .folder import BadImageWarning
from .loader import Augment, TensorLoader
from .synthetic import make_synthetic

__all__ = [
    "Augment", "DATASETS", "BadImageWarning", "TensorLoader", "DatasetSpec", "DatasetSplits", "ImageSet",
    "cache_dir", "channel_stats", "check_available", "dataset_names", "load_dataset", "make_synthetic",
    "search_dirs", "split_indices",
]
