"""Build or load a VLM + processor: the tiny local builder, or a local HF directory."""

from tarsier_train.models.load import load_model, load_processor, local_model_dir
from tarsier_train.models.tiny import tiny_qwen2_vl_dir

__all__ = ["load_model", "load_processor", "local_model_dir", "tiny_qwen2_vl_dir"]
