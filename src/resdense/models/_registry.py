"""The model registry: every named model is a registered function that fills a spec.

A registered function builds one variant of a family (``resnet56`` passes depth 56 to the
CIFAR ResNet builder). Its entry also carries the metadata the tools need without building
the model: the default input size and the figures the paper reports.
"""

from __future__ import annotations

import difflib
import fnmatch
import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import torch.nn as nn

from ..errors import UnknownModelError
from .layers import ClassifierModel, UnknownSettingError, keyword_settings


@dataclass(frozen=True)
class PaperFigures:
    """What the paper reports for a model, to print beside what we measure.

    ``macs`` is the paper's "FLOPs" (which count multiply-adds). ``macs_kwargs`` names the
    builder arguments under which our count is comparable (e.g. the paper's stride placement).
    """

    params: float | None = None
    macs: float | None = None
    macs_kwargs: dict[str, Any] = field(default_factory=dict)
    error: float | None = None
    error_label: str = ""
    source: str = ""


@dataclass(frozen=True)
class ModelEntry:
    name: str
    fn: Callable[..., nn.Module]
    input_size: tuple[int, int, int]
    paper: PaperFigures | None
    family: str


class _Registry:
    """Name -> entry; refuses duplicates so a typo cannot silently shadow a model."""

    def __init__(self) -> None:
        self._entries: dict[str, ModelEntry] = {}

    def add(self, entry: ModelEntry) -> None:
        if entry.name in self._entries:
            raise ValueError(f"model {entry.name!r} is registered twice")
        self._entries[entry.name] = entry

    def get(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except KeyError:
            close = difflib.get_close_matches(name, self._entries, n=5, cutoff=0.5)
            hint = f"did you mean {', '.join(close)}?" if close else "see `resdense list`."
            raise UnknownModelError(f"unknown model {name!r}: {hint}") from None

    def names(self) -> list[str]:
        return sorted(self._entries, key=_natural_key)


def _natural_key(name: str) -> list[Any]:
    """Sort 'resnet20' before 'resnet110'."""
    import re

    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


_REGISTRY = _Registry()


def register_model(
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    paper: PaperFigures | None = None,
    family: str = "",
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: register ``fn`` under its own name."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        _REGISTRY.add(ModelEntry(fn.__name__, fn, tuple(input_size), paper, family or fn.__module__.rsplit(".", 1)[-1]))
        return fn

    return wrap


def model_entry(name: str) -> ModelEntry:
    """The registry entry for ``name`` (raises :class:`UnknownModelError`)."""
    return _REGISTRY.get(name)


def create_model(name: str, pretrained: Any = None, **kwargs: Any) -> nn.Module:
    """Build a registered model. Keyword arguments set to ``None`` are dropped, so callers can
    forward optional command-line values without knowing each builder's defaults.

    ``pretrained`` (a run directory, an ``import`` output or an exported ``.safetensors`` file)
    loads that checkpoint's weights, with its builder arguments under ``kwargs``; a checkpoint of
    another model is a :class:`~resdense.errors.CheckpointError`. The model keeps what the
    checkpoint knows in ``pretrained_cfg`` (``classes``, ``mean``, ``std``, ``input_size``).

    A setting the model does not take (or that its spec fixes) raises a
    :class:`~resdense.errors.ConfigError` naming the model and the settings it does take."""
    entry = _REGISTRY.get(name)
    if pretrained is not None:
        return _create_pretrained(name, pretrained, kwargs)
    try:
        model = entry.fn(**{k: v for k, v in kwargs.items() if v is not None})
    except UnknownSettingError as e:
        if not (isinstance(e.target, type) and issubclass(e.target, ClassifierModel)):
            raise  # a block's or layer's setting: its own message says whose
        # The registered function's own arguments (depth, bc ...) are settings too.
        accepted = dict.fromkeys((*keyword_settings(entry.fn), *e.accepted))
        raise UnknownSettingError(name, e.unknown, e.fixed, accepted, e.target) from None
    model.model_name = name
    return model


# Sphinx roles (:func:`~a.b`), literals (``x``) and plain back-quotes, kept as their text.
_ROLE = re.compile(r":\w+:`~?(?:[\w.]*\.)?([^`]+)`")
_LITERAL = re.compile(r"`{1,2}([^`]+)`{1,2}")


def plain_text(doc: str) -> str:
    """``doc``'s first paragraph as one line of plain text: lines joined, Sphinx markup removed."""
    paragraph = " ".join(line.strip() for line in doc.strip().split("\n\n")[0].splitlines())
    return _LITERAL.sub(r"\1", _ROLE.sub(r"\1", paragraph)).strip()


def model_description(name: str) -> str:
    """One plain sentence about model ``name``: its registered function's docstring (first
    paragraph, without markup), or, where it has none, what its registry entry says."""
    entry = _REGISTRY.get(name)
    text = plain_text(inspect.getdoc(entry.fn) or "")
    if not text:
        size = "x".join(map(str, entry.input_size))
        source = f" as in {entry.paper.source}" if entry.paper is not None and entry.paper.source else ""
        text = f"A {entry.family} network for {size} inputs{source}"
    return text if text.endswith(".") else text + "."


def _create_pretrained(name: str, source: Any, kwargs: dict[str, Any]) -> nn.Module:
    from ..api import pretrained_weights
    from ..train.checkpoint import load_weights

    builder_kwargs, weights, meta = pretrained_weights(name, source, kwargs)
    model = create_model(name, **builder_kwargs)
    load_weights(model, weights, source=str(source))
    model.pretrained_cfg = {k: meta.get(k) for k in ("classes", "mean", "std", "input_size")}
    return model


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, in natural order; a pattern
    without wildcards matches anywhere in the name (``densenet`` finds ``cifar_densenet``)."""
    if not any(ch in pattern for ch in "*?["):
        pattern = f"*{pattern}*"
    return [n for n in _REGISTRY.names() if fnmatch.fnmatchcase(n, pattern)]
