"""Analyses of models: complexity here; gradient flow, responses, lesions and reuse beside it."""

from .complexity import ModelInfo, StageRow, count_params, model_info, profile

__all__ = ["ModelInfo", "StageRow", "count_params", "model_info", "profile"]
