"""Load a VLM and its processor from a local Hugging Face directory (never from a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin


# The dtype weights load in (model.dtype) and are exported in; what trains is fp32 whatever this is.
ModelDtype = Literal["float32", "bfloat16", "float16"]
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)


def local_model_dir(path: str | None, key: str = "model.path") -> str:
    """A local HF model directory, or a tarsier-train run directory (its HF export, <run_dir>/hf); fails
    early, naming the key, if it is neither."""
    if not path:
        raise ValueError(f"{key} is not set: pass a local Hugging Face model directory, or init_from=<run dir>")
    directory = Path(path).expanduser()
    if not (directory / "config.json").is_file() and (directory / "config.yaml").is_file():
        export = directory / "hf"
        if not (export / "config.json").is_file():
            raise FileNotFoundError(
                f"{key}={path!r} is a run directory without a Hugging Face export (did the run finish?). Export a "
                f"checkpoint: python -m tarsier_train.checkpoint.export {directory}/checkpoints/step-NNNNNN.ckpt "
                f"--output {export}"
            )
        directory = export
    if not (directory / "config.json").is_file():
        raise FileNotFoundError(
            f"{key}={path!r} is not a local Hugging Face model directory (no config.json) nor a run directory. "
            "tarsier-train never downloads at run time: download the model first, then pass its folder."
        )
    return str(directory)


def load_processor(model_dir: str) -> ProcessorMixin:
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def load_model(model_dir: str, dtype: str = "float32", attn_implementation: str = "sdpa") -> PreTrainedModel:
    return AutoModelForImageTextToText.from_pretrained(
        model_dir, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
    )
