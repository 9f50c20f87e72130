"""Evaluation: linear probe, fine-tuning, label subsets."""
from .finetune import finetune, predict
from .probe import encode_windows, label_subset, linear_probe, probe_scores

__all__ = ["encode_windows", "finetune", "label_subset", "linear_probe", "predict", "probe_scores"]
