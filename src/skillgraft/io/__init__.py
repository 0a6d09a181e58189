"""Checkpoint I/O: lazy readers for Hugging Face model directories and atomic, streaming writers.

Nothing here loads a whole model: tensors are read one at a time through safetensors' mmap.
"""

from skillgraft.io.checkpoint import Checkpoint
from skillgraft.io.writer import CheckpointWriter, SafetensorsWriter, atomic_path

__all__ = ["Checkpoint", "CheckpointWriter", "SafetensorsWriter", "atomic_path"]
