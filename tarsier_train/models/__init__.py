"""Build or load a VLM + processor of any family (`families.py`): the tiny local builders, or a local HF directory."""

from tarsier_train.models.load import load_model, load_processor, local_model_dir
from tarsier_train.models.tarsier1 import tiny_tarsier1_dir
from tarsier_train.models.tiny import tiny_qwen_vl_dir

__all__ = ["load_model", "load_processor", "local_model_dir", "tiny_qwen_vl_dir", "tiny_tarsier1_dir"]
