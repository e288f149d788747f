"""Resume discovery and Hugging Face export."""

from tarsier_train.checkpoint.resume import find_latest_checkpoint, resolve_resume

__all__ = ["find_latest_checkpoint", "resolve_resume"]
