"""Load a VLM and its processor from a local Hugging Face directory (never from a hub)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin


def local_model_dir(path: str) -> str:
    """A user's local HF model directory; fails early, naming the key, if it is not one."""
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"model.path={path!r} is not a local Hugging Face model directory (no config.json). "
            "tarsier-train never downloads at run time: download the model first, then pass its folder."
        )
    return str(directory)


def load_processor(model_dir: str) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def load_model(model_dir: str, dtype: str = "float32", attn_implementation: str = "sdpa") -> PreTrainedModel:
    return AutoModelForImageTextToText.from_pretrained(
        model_dir, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
    )
