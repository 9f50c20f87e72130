"""Joint training loop, atomic checkpoints and torchrun (DDP) support."""
from .checkpoint import CheckpointError, find_checkpoint, read_checkpoint, read_grids, save_checkpoint, write_grids
from .distributed import World, current_world, init_from_env
from .loop import TrainConfig, TrainResult, batch_indices, build_model, load_trained, lr_factor, train_flowfm

__all__ = ["CheckpointError", "TrainConfig", "TrainResult", "World", "batch_indices", "build_model",
           "current_world", "find_checkpoint", "init_from_env", "load_trained", "lr_factor", "read_checkpoint",
           "read_grids", "save_checkpoint", "train_flowfm", "write_grids"]
