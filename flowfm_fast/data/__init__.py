"""Data: HAPT from the registry package, user .npy/.npz windows, synthetic windows, augmentation."""
from .arrays import DataError, load_windows
from .augment import AugmentConfig, augment, random_rotations
from .hapt import ACTIVITIES, HAPT, TEST_SUBJECTS, load_hapt
from .synthetic import make_synthetic
from .windows import Standardizer, WindowSet

__all__ = ["ACTIVITIES", "AugmentConfig", "DataError", "HAPT", "Standardizer", "TEST_SUBJECTS", "WindowSet",
           "augment", "load_hapt", "load_windows", "make_synthetic", "random_rotations"]
