"""Training runs: configuration, recipes, the trainer, checkpoints, fine-tuning.

The package is also callable: ``resdense.train(config, **settings)`` trains one run and returns a
:class:`~resdense.api.TrainResult` (see :func:`resdense.api.train`). Being the package and the
call at once keeps every import form working (``import resdense.train.runner as runner``), which
a function bound to the same name on ``resdense`` would break.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class _TrainingPackage(types.ModuleType):
    """This package's module type: calling it trains a run."""

    def __call__(self, config: Any = None, **kwargs: Any) -> Any:
        from ..api import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _TrainingPackage
