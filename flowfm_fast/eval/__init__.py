"""Evaluation: linear probe, fine-tuning, label subsets, generation metrics."""
from .finetune import finetune, finetune_per_class, predict
from .generation import (frechet_distance, frechet_distance_from_features, load_feature_classifier, mmd_rbf,
                         reconstruction_error, sensor_fid, train_feature_classifier)
from .probe import encode_windows, label_subset, linear_probe, per_class_subset, probe_per_class, probe_scores

__all__ = ["encode_windows", "finetune", "finetune_per_class", "frechet_distance", "frechet_distance_from_features", "label_subset",
           "linear_probe", "load_feature_classifier", "mmd_rbf", "per_class_subset", "predict", "probe_per_class",
           "probe_scores",
           "reconstruction_error", "sensor_fid", "train_feature_classifier"]
