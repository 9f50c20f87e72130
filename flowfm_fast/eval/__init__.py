"""Evaluation: linear probe, fine-tuning, label subsets, generation metrics."""
from .finetune import finetune, predict
from .generation import (frechet_distance, frechet_distance_from_features, load_feature_classifier, mmd_rbf,
                         reconstruction_error, sensor_fid, train_feature_classifier)
from .probe import encode_windows, label_subset, linear_probe, probe_scores

__all__ = ["encode_windows", "finetune", "frechet_distance", "frechet_distance_from_features", "label_subset",
           "linear_probe", "load_feature_classifier", "mmd_rbf", "predict", "probe_scores",
           "reconstruction_error", "sensor_fid", "train_feature_classifier"]
