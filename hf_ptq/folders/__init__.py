"""Output folders written safely: checked before any work, staged, swapped into place atomically, recoverable
after a crash (see `staging.py`)."""

from .staging import recover_folder, staged_folder
from .targets import check_output_folder, is_model_file

__all__ = ["check_output_folder", "is_model_file", "recover_folder", "staged_folder"]
