"""Winning back what quantization costs: training data for fine-tuning (this module needs no torch), and, with the
``[finetune]`` extra, quantization-aware fine-tuning that matches the C core.

``import medquant`` never imports this package; ``medquant.finetune`` itself imports neither torch nor
sentence-transformers (the modules that need them import them when called).
"""
from .export import ExportConfig, TrainingExport, export_training_data, medquad_training_data
from .train import FinetuneConfig, FinetuneResult, finetune

__all__ = ["ExportConfig", "FinetuneConfig", "FinetuneResult", "TrainingExport", "export_training_data", "finetune",
           "medquad_training_data"]
