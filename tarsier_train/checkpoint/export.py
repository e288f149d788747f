"""Hugging Face export: from a live model, or (CLI) from any Lightning checkpoint of a run."""

from __future__ import annotations

import argparse
import tempfile
import logging
from pathlib import Path

import torch
from peft import inject_adapter_in_model
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from omegaconf import OmegaConf
from transformers import PreTrainedModel, ProcessorMixin

from tarsier_train.models.controls import build_model, merge_adapters
from tarsier_train.models.load import MODEL_DTYPES

log = logging.getLogger(__name__)

MODEL_PREFIX = "model."  # recipes hold the HF model as `self.model`


def export_hf(model: PreTrainedModel, processor: ProcessorMixin, output_dir: str | Path, dtype: str | None = None
              ) -> Path:
    """save_pretrained of model + processor, its weights in `dtype` (e.g. bfloat16; None: as they are, fp32 where
    they trained); LoRA adapters are merged into the model first. Both happen in place, so the export is a plain
    Hugging Face model that loads without peft."""
    output_dir = Path(output_dir)
    merge_adapters(model)
    if dtype is not None:
        model.to(getattr(torch, dtype))
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    return output_dir


def export_full_state_dict(model: PreTrainedModel, state_dict: dict[str, torch.Tensor], processor: ProcessorMixin,
                           output_dir: str | Path, dtype: str | None = None) -> Path:
    """Save a gathered (unsharded) state dict of `model`'s architecture, e.g. of an FSDP2-sharded model: rebuilt
    without memory (meta), adapters injected as in `model`, the weights assigned, adapters merged by export_hf."""
    with torch.device("meta"):
        plain = type(model)._from_config(model.config)
        for adapter in getattr(model, "peft_config", {}).values():
            inject_adapter_in_model(adapter, plain)
    plain.load_state_dict(state_dict, strict=True, assign=True)
    plain.tie_weights()
    return export_hf(plain, processor, output_dir, dtype)


def checkpoint_state_dict(checkpoint: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) module state dict of a Lightning checkpoint file or of a sharded DCP directory
    (trainer=fsdp), consolidated on CPU."""
    if not checkpoint.is_dir():
        return torch.load(checkpoint, map_location="cpu", weights_only=False)["state_dict"]
    with tempfile.TemporaryDirectory() as scratch:
        consolidated = Path(scratch) / "consolidated.pt"
        dcp_to_torch_save(checkpoint, consolidated)
        return torch.load(consolidated, map_location="cpu", weights_only=False)["state_dict"]


def export_checkpoint(checkpoint: str | Path, output_dir: str | Path, dtype: str | None = None) -> Path:
    """Rebuild the run's model from its saved config, load the checkpoint's weights, save_pretrained in `dtype`
    (None: the dtype the run loaded its model in, model.dtype)."""
    from hydra.utils import instantiate

    from tarsier_train.models import load_processor

    checkpoint = Path(checkpoint)
    config_path = checkpoint.parent.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: export expects <run_dir>/checkpoints/<name>.ckpt "
                                "(a file, or a sharded checkpoint directory)")
    cfg = OmegaConf.load(config_path)
    model_dir = instantiate(cfg.model.dir)
    dtype = dtype or cfg.model.dtype
    # the trained structure (adapters included) that the weights fit, built in the dtype to save: the fp32 masters
    # are rounded once, on loading
    model = build_model(model_dir, dtype, cfg.model.attn_implementation, cfg.model.trainable, cfg.model.lora)
    state = checkpoint_state_dict(checkpoint)
    weights = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    model.load_state_dict(weights, strict=True)
    return export_hf(model, load_processor(model_dir), output_dir, dtype)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export a tarsier-train checkpoint as a Hugging Face model dir.")
    parser.add_argument("checkpoint", help="<run_dir>/checkpoints/step-NNNNNN.ckpt")
    parser.add_argument("--output", required=True, help="directory to write the HF model + processor to")
    parser.add_argument("--dtype", choices=MODEL_DTYPES, default=None,
                        help="dtype of the saved weights (default: the run's model.dtype)")
    args = parser.parse_args(argv)
    print(f"exported to {export_checkpoint(args.checkpoint, args.output, args.dtype)}")


if __name__ == "__main__":
    main()
