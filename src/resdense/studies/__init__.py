"""Studies: the papers' claims as runs, result rows, decided claims and reports.

A study is a spec (:class:`StudySpec`: its arms, claims and figures) registered by name;
importing this package registers every spec.
"""

from . import degradation, efficiency, remedies, shortcuts  # noqa: F401 - register the specs
from .engine import run_study
from .report import build_report, load_study
from .spec import STUDIES, StudyConfig, StudySpec, get_study

__all__ = ["STUDIES", "StudyConfig", "StudySpec", "build_report", "get_study", "load_study", "run_study"]
