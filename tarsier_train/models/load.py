"""Load a VLM and its processor from a local Hugging Face directory (never from a hub)."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import torch
from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor, PreTrainedModel, ProcessorMixin

from tarsier_train.models.convert import plain_model_dir
from tarsier_train.models.families import family_of
from tarsier_train.models.tarsier1 import is_tarsier1_dir, load_tarsier1_model, load_tarsier1_processor


# The dtype weights load in (model.dtype) and are exported in; what trains is fp32 whatever this is.
ModelDtype = Literal["float32", "bfloat16", "float16"]
MODEL_DTYPES: tuple[str, ...] = get_args(ModelDtype)


def local_model_dir(path: str | None, key: str = "model.path", converted_dir: str | None = None) -> str:
    """A local HF model directory, or a tarsier-train run directory (its HF export, <run_dir>/hf); fails
    early, naming the key, if it is neither. With converted_dir, a released Tarsier2 directory (LLaVA-wrapped
    Qwen2-VL) is read as its plain Qwen2-VL conversion, made once under converted_dir (`convert.py`)."""
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
    return str(directory) if converted_dir is None else plain_model_dir(directory, converted_dir)


def load_processor(model_dir: str) -> ProcessorMixin:
    if is_tarsier1_dir(model_dir):  # its processor class is ours: AutoProcessor would give a bare tokenizer
        return load_tarsier1_processor(model_dir)
    return AutoProcessor.from_pretrained(model_dir, local_files_only=True)


def load_model(model_dir: str, dtype: str = "float32", attn_implementation: str = "sdpa") -> PreTrainedModel:
    """The model of a local directory of any family (`families.py`); a directory of another architecture fails
    here, naming its model_type."""
    if is_tarsier1_dir(model_dir):  # model_type "llava": AutoModel would build LLaVA without the separators
        return load_tarsier1_model(model_dir, dtype, attn_implementation)
    config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    if family_of(config).name == "tarsier1":
        raise ValueError(f"{model_dir}: a LLaVA directory that is not Tarsier1 (architectures "
                         f"{config.architectures}); tarsier-train trains Tarsier1's LLaVA layout only")
    return AutoModelForImageTextToText.from_pretrained(
        model_dir, local_files_only=True, dtype=getattr(torch, dtype), attn_implementation=attn_implementation,
    )
