"""Study runners: each produces one JSON row per run, and a report drawn from those rows."""

from .degradation import PRESETS, StudyConfig, run_study
from .report import build_report

__all__ = ["PRESETS", "StudyConfig", "build_report", "run_study"]
