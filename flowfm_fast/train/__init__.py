"""Joint training loop and atomic checkpoints."""
from .checkpoint import CheckpointError, find_checkpoint, read_checkpoint, save_checkpoint
from .loop import TrainConfig, TrainResult, batch_indices, build_model, load_trained, lr_factor, train_flowfm

__all__ = ["CheckpointError", "TrainConfig", "TrainResult", "batch_indices", "build_model", "find_checkpoint",
           "load_trained", "lr_factor", "read_checkpoint", "save_checkpoint", "train_flowfm"]
