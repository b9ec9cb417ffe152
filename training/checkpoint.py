"""The training engine's checkpoints: the one weights-only reader is utils/checkpoint_file.py (shared with
export/ and evaluation/, which do not import training/); its names are the engine's too."""
from utils.checkpoint_file import CHECKPOINT_NAME, CheckpointError, load_checkpoint, load_tensor_file

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "load_checkpoint", "load_tensor_file"]
