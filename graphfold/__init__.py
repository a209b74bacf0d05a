"""graphfold: remove the depth a CNN does not need from its ONNX graph, exactly by default."""
from __future__ import annotations

from graphfold._version import __version__
from graphfold.api import check, fold, fold_file, inspect
from graphfold.errors import GraphfoldError, UsageError, ValidationError
from graphfold.options import ApproxOptions, Options
from graphfold.report import Report
from graphfold.validate import ValidationResult

__all__ = ["__version__", "fold", "fold_file", "inspect", "check", "Options", "ApproxOptions", "Report",
           "ValidationResult",
           "GraphfoldError", "UsageError", "ValidationError"]
