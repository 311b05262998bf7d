"""Evaluation: dataset loaders, metrics and reports. Not needed at serving time."""

from .data import load_jsonl
from .metrics import ClassifyReport, classification_report

__all__ = ["ClassifyReport", "classification_report", "load_jsonl"]
