"""torch.hub entry points: one per registered resdense model, generated from the registry.

    model = torch.hub.load("path/to/resdense", "resnet56", source="local")
    model = torch.hub.load("path/to/resdense", "resnet56", source="local", pretrained="runs/resnet56")

Every entry takes the keyword arguments of ``resdense.create_model`` (``num_classes``,
``in_chans``, builder settings, ``pretrained=`` a run directory or an exported .safetensors file).
Works from a clone without installing: resdense is imported from ``src/`` beside this file.
"""

import sys as _sys
from pathlib import Path as _Path

dependencies = ["torch"]

_SRC = str(_Path(__file__).resolve().parent / "src")
if _SRC not in _sys.path:
    _sys.path.insert(0, _SRC)

import resdense as _resdense  # noqa: E402  (after the path above)


def _entry(name):
    """The hub entry for model ``name``: ``create_model(name, **kwargs)``, documented by its sentence."""

    def entry(**kwargs):
        return _resdense.create_model(name, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = (f"{_resdense.model_description(name)}\n\nKeyword arguments: those of "
                     f"resdense.create_model({name!r}, ...), e.g. num_classes, in_chans, pretrained=RUN_DIR.")
    return entry


globals().update({_name: _entry(_name) for _name in _resdense.list_models()})
